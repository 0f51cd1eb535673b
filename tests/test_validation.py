"""Input refused at the door: the one text validator (release/text.py), and
the manifest checks that stop a release which would fail (or poison a
notice) later from being queued at all."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest

from config.errors import InputError
from jobs.cli import main
from release.manifest import load_manifest
from release.text import FILENAME_MAX_BYTES, clean_filename, clean_text
from tests.conftest import write_bundle


def replace_in(manifest: Path, old: str, new: str) -> None:
    text = manifest.read_text(encoding="utf-8")
    assert old in text, f"{old!r} is not in the manifest"
    manifest.write_text(text.replace(old, new, 1), encoding="utf-8")


# -- the validator ----------------------------------------------------------------------
@pytest.mark.parametrize(("value", "problem"), [
    ("Core\r\nBcc: everyone@example.com", "control character (U+000D)"),
    ("nul\x00title", "control character (U+0000)"),
    ("del\x7f", "control character (U+007F)"),
    ("c1\x85next line", "line separator"),
    ("\ufeffTitle", "byte-order mark"),
    ("line\u2028separator", "line separator"),
    ("evil\u202etxt.exe", "bidirectional override"),
    ("lone\ud800surrogate", "surrogate"),
    ("tab\there", "control character (U+0009)"),
])
def test_clean_text_refuses_what_no_field_may_hold(value: str, problem: str) -> None:
    with pytest.raises(InputError, match="title") as info:
        clean_text(value, field="title", max_len=500)
    assert problem in str(info.value)
    assert "\n" not in str(info.value)


def test_clean_text_normalises_to_nfc_and_strips() -> None:
    decomposed = "  Cafe\u0301 report "
    assert clean_text(decomposed, field="title", max_len=500) == "Café report"
    assert unicodedata.is_normalized("NFC", clean_text(decomposed, field="t", max_len=50))


def test_clean_text_length_boundary() -> None:
    assert clean_text("x" * 200, field="organisation", max_len=200) == "x" * 200
    with pytest.raises(InputError, match="201 characters"):
        clean_text("x" * 201, field="organisation", max_len=200)
    # Counted after NFC: 200 composed characters typed decomposed still fit.
    assert len(clean_text("e\u0301" * 200, field="organisation", max_len=200)) == 200


def test_clean_text_refuses_non_text_and_empty() -> None:
    with pytest.raises(InputError, match="must be text, not int"):
        clean_text(42, field="title", max_len=10)
    with pytest.raises(InputError, match="must not be empty"):
        clean_text("   ", field="title", max_len=10)
    assert clean_text("  ", field="note", max_len=10, required=False) == ""


def test_clean_filename_byte_boundary() -> None:
    ok = "a" * (FILENAME_MAX_BYTES - 4) + ".pdf"
    assert clean_filename(ok, field="name") == ok
    with pytest.raises(InputError, match="256 bytes"):
        clean_filename("a" * (FILENAME_MAX_BYTES - 3) + ".pdf", field="name")
    # Bytes, not characters: 128 two-byte letters are 256 bytes.
    with pytest.raises(InputError, match="bytes in UTF-8"):
        clean_filename("é" * 126 + ".pdf", field="name")
    assert clean_filename("é" * 125 + ".pdf", field="name")


@pytest.mark.parametrize("name", ["manifest.json", "MANIFEST.json", ".staging", ".part-x",
                                  ".htaccess"])
def test_clean_filename_refuses_reserved_and_hidden_names(name: str) -> None:
    with pytest.raises(InputError, match=r"reserved|dot"):
        clean_filename(name, field="name")


# -- the manifest -----------------------------------------------------------------------
def _bundle(tmp_path: Path) -> Path:
    return write_bundle(tmp_path / "b", publish_on="2099-01-01")


def test_crlf_title_is_refused_at_queue(tmp_path: Path) -> None:
    manifest = _bundle(tmp_path)
    replace_in(manifest, 'title = "Core business: a test inspection"',
               'title = "Core business\\r\\nBcc: all@evil.example"')
    with pytest.raises(InputError, match="'title' contains a control character"):
        load_manifest(manifest)


@pytest.mark.parametrize(("old", "new", "needle"), [
    ('title = "Core business: a test inspection"', 'title = "nul\\u0000here"', "'title'"),
    ('title = "Core business: a test inspection"', 'title = "\\ufeffbom"', "byte-order mark"),
    ('name = "Liaison 1"', 'name = "Officer\\n- Click here: https://evil.example/login"',
     "recipient 1: 'name'"),
    ('organisation = "Force 2"\n', 'organisation = "Force\\u007f2"\n', "'organisation'"),
])
def test_control_characters_in_any_field_are_refused(tmp_path: Path, old: str, new: str,
                                                     needle: str) -> None:
    manifest = _bundle(tmp_path)
    replace_in(manifest, old, new)
    with pytest.raises(InputError, match="contains") as info:
        load_manifest(manifest)
    assert needle in str(info.value)


def test_organisation_at_the_database_limit(tmp_path: Path) -> None:
    manifest = _bundle(tmp_path)
    replace_in(manifest, 'organisation = "Force 2"\n', f'organisation = "{"O" * 200}"\n')
    assert load_manifest(manifest).documents[2].organisation == "O" * 200
    replace_in(manifest, f'organisation = "{"O" * 200}"\n', f'organisation = "{"O" * 201}"\n')
    with pytest.raises(InputError, match="201 characters"):
        load_manifest(manifest)


def test_a_document_named_manifest_json_is_refused(tmp_path: Path) -> None:
    manifest = _bundle(tmp_path)
    replace_in(manifest, 'path = "letters/force-1.txt"',
               'path = "letters/force-1.txt"\nname = "manifest.json"')
    with pytest.raises(InputError, match=r"document 2: .*reserved"):
        load_manifest(manifest)


def test_a_hidden_document_name_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "b"
    manifest = _bundle(tmp_path)
    (folder / ".secret.txt").write_text("x\n")
    replace_in(manifest, 'path = "letters/force-1.txt"', 'path = ".secret.txt"')
    with pytest.raises(InputError, match=r"document 2: .*dot"):
        load_manifest(manifest)


def test_a_264_byte_file_name_is_refused_at_queue(tmp_path: Path) -> None:
    manifest = _bundle(tmp_path)
    long_name = "r" * 260 + ".pdf"  # 264 bytes: fails every publish attempt if let in
    replace_in(manifest, 'path = "letters/force-1.txt"',
               f'path = "letters/force-1.txt"\nname = "{long_name}"')
    with pytest.raises(InputError, match="264 bytes"):
        load_manifest(manifest)


def test_names_differing_only_in_case_collide(tmp_path: Path) -> None:
    manifest = _bundle(tmp_path)
    replace_in(manifest, 'path = "letters/force-2.txt"',
               'path = "letters/force-2.txt"\nname = "FORCE-1.txt"')
    with pytest.raises(InputError, match=r"two documents.*case"):
        load_manifest(manifest)


def test_content_type_must_be_a_media_type(tmp_path: Path) -> None:
    manifest = _bundle(tmp_path)
    replace_in(manifest, 'kind = "report"',
               'kind = "report"\ncontent_type = "text/plain; x=1\\r\\nBcc: a@b.example"')
    with pytest.raises(InputError, match="content_type"):
        load_manifest(manifest)


def test_a_path_part_longer_than_the_file_system_allows(tmp_path: Path) -> None:
    manifest = _bundle(tmp_path)
    replace_in(manifest, 'path = "letters/force-1.txt"', f'path = "letters/{"x" * 300}.txt"')
    with pytest.raises(InputError, match="longer than 255 bytes"):
        load_manifest(manifest)


def test_flags_go_through_the_same_validator(tmp_path: Path) -> None:
    manifest = _bundle(tmp_path)
    with pytest.raises(InputError, match="--at contains a control character"):
        load_manifest(manifest, at="00:01\x00")
    with pytest.raises(InputError, match="--zone contains a control character"):
        load_manifest(manifest, zone="Europe/London\n")


def test_deep_nesting_is_one_line(tmp_path: Path) -> None:
    manifest = _bundle(tmp_path)
    text = manifest.read_text()
    manifest.write_text(text.replace('owner = "', "x = " + "[" * 1000 + "]" * 1000
                                     + '\nowner = "', 1))
    with pytest.raises(InputError, match="nest"):
        load_manifest(manifest)
    manifest.write_text(text.replace('owner = "', "x = " + "[" * 10 + "]" * 10
                                     + '\nowner = "', 1))
    with pytest.raises(InputError, match="nest"):
        load_manifest(manifest)


# -- through the command line: one line, a status that is not 1 --------------------------
@pytest.mark.parametrize("body", [
    "x = " + "[" * 1000 + "]" * 1000,
    'title = "a"\n[[documents]]\npath = "' + "p" * 300 + '/x.pdf"\nkind = "report"',
])
def test_command_line_gives_one_line_not_a_traceback(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str) -> None:
    manifest = tmp_path / "m.toml"
    manifest.write_text('publish_on = "2099-01-01"\n' + body + "\n")
    status = main(["--data-dir", str(tmp_path / "var"), "queue", str(manifest)])
    err = capsys.readouterr().err
    assert status not in (0, 1)
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


# -- a display name is text in the notice, never a link --------------------------------------
def _published_notice(name: str, filename: str = "report.pdf") -> tuple[str, str]:
    from datetime import UTC, datetime

    from release.notices import compose
    from release.records import Document, OutboxMessage, Recipient, Release

    instant = datetime(2014, 9, 3, 23, 1, tzinfo=UTC)
    recipient = Recipient(id="rcp_1", position=0, name=name, email="o@force.example",
                          organisation="Force 1")
    release = Release(id="rel_1", slug="s", title="Core business", state="published",
                      instant=instant, zone="Europe/London", wall="2014-09-04T00:01",
                      documents=[Document(id="doc_1", position=0, kind="report",
                                          organisation=None, filename=filename,
                                          content_type="application/pdf", size=1, sha256="0",
                                          public_url="https://www.example/r/report.pdf")],
                      recipients=[recipient])
    row = OutboxMessage(message_id="<m1@embargo>", release_id="rel_1", recipient_id="rcp_1",
                        purpose="published", to_addr="o@force.example", created_at=instant)
    message = compose(row, release, recipient, sender="Press <press@example>")
    parts = {p.get_content_subtype(): p.get_payload(decode=True).decode()
             for p in message.walk() if p.get_content_maintype() == "text"}
    return parts["plain"], parts["html"]


def test_a_display_name_is_never_turned_into_a_link() -> None:
    # A row stored before the validator existed may hold a newline in a name.
    plain, html_part = _published_notice("Officer\n- Click here: https://evil.example/login")
    assert "https://evil.example/login" in plain  # as text
    assert 'href="https://evil.example' not in html_part
    assert "- Click here: https://evil.example/login" in html_part  # escaped text
    assert '<a href="https://www.example/r/report.pdf">' in html_part  # ours still is a link


def test_a_file_name_that_looks_like_a_link_is_not_one() -> None:
    _, html_part = _published_notice("Officer", filename="x: https://evil.example/a")
    assert 'href="https://evil.example' not in html_part


def test_markup_in_a_name_is_escaped() -> None:
    _, html_part = _published_notice('<a href="https://evil.example">Officer</a>')
    assert "<a href=\"https://evil.example\">" not in html_part
    assert "&lt;a href=&quot;https://evil.example&quot;&gt;" in html_part


def test_cancel_reason_and_reschedule_flags_are_validated(services: object, bundle: Path) -> None:
    from release.service import ReleaseService, Services

    assert isinstance(services, Services)
    service = ReleaseService(services, actor="t")
    release = service.queue(load_manifest(bundle, publish_on="2099-01-01"))
    with pytest.raises(InputError, match="--zone contains a control character"):
        service.reschedule(release.id, publish_on="2099-01-02", at=None, zone="UTC\x00")
    with pytest.raises(InputError, match="--reason contains a control character"):
        service.cancel(release.id, reason="withdrawn\r\nBcc: x@evil.example")
    assert service.get(release.id).state == "queued"
