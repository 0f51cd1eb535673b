"""The queue manifest: every check runs here, before anything is sealed."""

from __future__ import annotations

import hashlib
import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from config.errors import InputError
from release.manifest import check_email, load_manifest, safe_filename
from tests.conftest import write_bundle

Edit = Callable[[Path, Path], None]


def replace_in(manifest: Path, old: str, new: str) -> None:
    text = manifest.read_text()
    assert old in text, f"{old!r} is not in the manifest"
    manifest.write_text(text.replace(old, new, 1))


def append(manifest: Path, text: str) -> None:
    manifest.write_text(manifest.read_text() + "\n" + textwrap.dedent(text))


def minimal(folder: Path, body: str) -> Path:
    """A manifest with one report file and ``body`` appended."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.txt").write_text("report\n")
    manifest = folder / "manifest.toml"
    manifest.write_text(textwrap.dedent(body))
    return manifest


# -- the good case ------------------------------------------------------------------
def test_bundle_reads_back(tmp_path: Path) -> None:
    manifest = write_bundle(tmp_path / "b")
    spec = load_manifest(manifest)
    assert spec.title == "Core business: a test inspection"
    assert spec.publish_on == "2014-09-04"
    assert spec.at is None and spec.zone is None
    assert spec.owner == "press@inspectorate.example"
    assert [d.filename for d in spec.documents] == [
        "national-report.txt", "force-1.txt", "force-2.txt", "force-3.txt"]
    assert [d.kind for d in spec.documents] == ["report", "letter", "letter", "letter"]
    assert [d.organisation for d in spec.documents] == [None, "Force 1", "Force 2", "Force 3"]
    for doc in spec.documents:
        assert doc.path.is_file()
        assert doc.size == doc.path.stat().st_size
        assert doc.content_type == "text/plain"
    assert [(r.name, r.email, r.organisation) for r in spec.recipients] == [
        (f"Liaison {i}", f"liaison{i}@force{i}.police.example", f"Force {i}") for i in (1, 2, 3)]
    assert spec.warnings == ()


def test_command_line_values_override_the_file(tmp_path: Path) -> None:
    manifest = write_bundle(tmp_path / "b", extra='at = "09:30"\nzone = "Europe/Paris"')
    spec = load_manifest(manifest)
    assert (spec.publish_on, spec.at, spec.zone) == ("2014-09-04", "09:30", "Europe/Paris")
    spec = load_manifest(manifest, publish_on="Thursday 11 September 2014", at="00:05",
                         zone="Europe/London")
    assert (spec.publish_on, spec.at, spec.zone) == (
        "Thursday 11 September 2014", "00:05", "Europe/London")


def test_publish_on_may_come_from_the_command_line_only(tmp_path: Path) -> None:
    manifest = write_bundle(tmp_path / "b")
    replace_in(manifest, 'publish_on = "2014-09-04"', "")
    with pytest.raises(InputError, match="publish"):
        load_manifest(manifest)
    assert load_manifest(manifest, publish_on="2014-09-04").publish_on == "2014-09-04"


def test_paths_are_relative_to_the_manifest_not_the_cwd(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = write_bundle(tmp_path / "b")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    spec = load_manifest(Path(os.path.relpath(manifest, elsewhere)))
    data = (tmp_path / "b" / "letters" / "force-2.txt").read_bytes()
    assert spec.documents[2].path.read_bytes() == data
    assert hashlib.sha256(spec.documents[2].path.read_bytes()).digest() == hashlib.sha256(
        data).digest()


def test_name_and_content_type_may_be_given(tmp_path: Path) -> None:
    manifest = minimal(tmp_path / "m", """\
        title = "T"
        publish_on = "2099-01-01"
        [[documents]]
        path = "report.txt"
        kind = "report"
        name = "National report.pdf"
        content_type = "application/pdf"
        """)
    doc = load_manifest(manifest).documents[0]
    assert (doc.filename, doc.content_type) == ("National report.pdf", "application/pdf")


def test_unknown_extension_is_octet_stream(tmp_path: Path) -> None:
    manifest = minimal(tmp_path / "m", """\
        title = "T"
        publish_on = "2099-01-01"
        [[documents]]
        path = "report.txt"
        kind = "report"
        name = "report.zzzunknown"
        """)
    assert load_manifest(manifest).documents[0].content_type == "application/octet-stream"


def test_empty_document_is_accepted(tmp_path: Path) -> None:
    manifest = write_bundle(tmp_path / "b", report_bytes=b"")
    assert load_manifest(manifest).documents[0].size == 0


# -- file names with path parts -------------------------------------------------------
@pytest.mark.parametrize(("name", "expected"), [
    ("../../x.txt", "x.txt"),
    ("/etc/x.txt", "x.txt"),
    ("..\\..\\x.txt", "x.txt"),
    ("C:\\Users\\comms\\x.txt", "x.txt"),
    ("letters/kent.pdf", "kent.pdf"),
    ("  spaced name.pdf  ", "spaced name.pdf"),
])
def test_safe_filename_keeps_only_the_last_part(name: str, expected: str) -> None:
    assert safe_filename(name) == expected


@pytest.mark.parametrize("name", ["..", ".", "../", "/", "", "   ", "a/..",
                                  "tab\there.pdf", "nul\x00.pdf", "manifest.json",
                                  "Manifest.JSON", ".htaccess", "x/.hidden.pdf",
                                  "é" * 128 + ".pdf"])
def test_safe_filename_refuses_names_with_nothing_left(name: str) -> None:
    with pytest.raises(InputError):
        safe_filename(name)


def test_name_with_path_parts_is_stored_as_its_last_part(tmp_path: Path) -> None:
    manifest = write_bundle(tmp_path / "b")
    replace_in(manifest, 'path = "letters/force-1.txt"',
               'path = "letters/force-1.txt"\nname = "../../x.txt"')
    assert load_manifest(manifest).documents[1].filename == "x.txt"


def test_path_outside_the_manifest_folder_keeps_only_its_name(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.txt").write_text("appendix\n")
    manifest = write_bundle(tmp_path / "deep" / "b")
    replace_in(manifest, 'path = "letters/force-1.txt"', 'path = "../../outside/x.txt"')
    doc = load_manifest(manifest).documents[1]
    assert doc.filename == "x.txt"
    assert doc.path.read_text() == "appendix\n"


# -- e-mail addresses --------------------------------------------------------------------
@pytest.mark.parametrize("email", [
    "liaison@kent.police.example", "o'brien@force.police.example", "a.b+c@x-y.example",
    "  padded@force.example  ",
])
def test_valid_email(email: str) -> None:
    assert check_email(email, "here") == email.strip()


@pytest.mark.parametrize("email", [
    "not-an-email", "a@b", "a b@c.example", "@force.example", "x@-bad.example",
    "x@bad-.example", "x@@force.example", "x@force..example", "", "x@force.example\n@y.example",
    "a" * 320 + "@force.example",
])
def test_invalid_email(email: str) -> None:
    with pytest.raises(InputError, match="not a valid email"):
        check_email(email, "here")


# -- bad manifests: one clear InputError each -------------------------------------------
def _missing_file(folder: Path, manifest: Path) -> None:
    (folder / "letters" / "force-2.txt").unlink()


def _folder_as_document(folder: Path, manifest: Path) -> None:
    (folder / "letters" / "force-2.txt").unlink()
    (folder / "letters" / "force-2.txt").mkdir()


def _same_name(folder: Path, manifest: Path) -> None:
    (folder / "other").mkdir()
    (folder / "other" / "force-1.txt").write_text("another\n")
    append(manifest, """\
        [[documents]]
        path = "other/force-1.txt"
        kind = "report"
        """)


def _same_name_other_case(folder: Path, manifest: Path) -> None:
    (folder / "FORCE-1.TXT").write_text("another\n")
    append(manifest, """\
        [[documents]]
        path = "FORCE-1.TXT"
        kind = "report"
        """)


def _same_name_given(folder: Path, manifest: Path) -> None:
    replace_in(manifest, 'path = "letters/force-2.txt"',
               'path = "letters/force-2.txt"\nname = "force-1.txt"')


def _bad_email(folder: Path, manifest: Path) -> None:
    replace_in(manifest, "liaison2@force2.police.example", "liaison2-at-force2")


def _bad_owner(folder: Path, manifest: Path) -> None:
    replace_in(manifest, "press@inspectorate.example", "press office")


def _twice_listed(folder: Path, manifest: Path) -> None:
    replace_in(manifest, "liaison2@force2.police.example", "LIAISON1@force1.police.example")


def _empty_title(folder: Path, manifest: Path) -> None:
    replace_in(manifest, 'title = "Core business: a test inspection"', 'title = ""')


def _blank_title(folder: Path, manifest: Path) -> None:
    replace_in(manifest, 'title = "Core business: a test inspection"', 'title = "   "')


def _no_title(folder: Path, manifest: Path) -> None:
    replace_in(manifest, 'title = "Core business: a test inspection"', "")


def _title_not_text(folder: Path, manifest: Path) -> None:
    replace_in(manifest, 'title = "Core business: a test inspection"', "title = 42")


def _unknown_top_key(folder: Path, manifest: Path) -> None:
    replace_in(manifest, 'owner = "press', 'colour = "red"\nowner = "press')


def _unknown_document_key(folder: Path, manifest: Path) -> None:
    replace_in(manifest, 'kind = "report"', 'kind = "report"\nsecret = true')


def _unknown_recipient_key(folder: Path, manifest: Path) -> None:
    replace_in(manifest, 'name = "Liaison 2"', 'name = "Liaison 2"\nphone = "01632 960000"')


def _bad_kind(folder: Path, manifest: Path) -> None:
    replace_in(manifest, 'kind = "report"', 'kind = "annex"')


def _letter_without_organisation(folder: Path, manifest: Path) -> None:
    replace_in(manifest, 'organisation = "Force 2"\n', "")


def _no_report(folder: Path, manifest: Path) -> None:
    replace_in(manifest, 'kind = "report"', 'kind = "letter"\norganisation = "Force 1"')


def _no_documents(folder: Path, manifest: Path) -> None:
    text = manifest.read_text()
    head = text.split("[[documents]]")[0]
    manifest.write_text(head)


def _not_toml(folder: Path, manifest: Path) -> None:
    manifest.write_text('title = "unterminated\n')


def _manifest_missing(folder: Path, manifest: Path) -> None:
    manifest.unlink()


def _publish_on_not_text(folder: Path, manifest: Path) -> None:
    replace_in(manifest, 'publish_on = "2099-01-01"', "publish_on = 2099-01-01")


BAD: dict[str, tuple[Edit, tuple[str, ...]]] = {
    "missing file": (_missing_file, ("force-2.txt", "does not exist")),
    "folder as document": (_folder_as_document, ("force-2.txt", "not a regular file")),
    "same name": (_same_name, ("force-1.txt", "two documents")),
    "same name, other case": (_same_name_other_case, ("force-1.txt", "two documents")),
    "same name given": (_same_name_given, ("force-1.txt", "two documents")),
    "bad email": (_bad_email, ("liaison2-at-force2", "recipient 2")),
    "bad owner": (_bad_owner, ("press office", "owner")),
    "recipient twice": (_twice_listed, ("liaison1@force1.police.example", "twice")),
    "empty title": (_empty_title, ("title", "empty")),
    "blank title": (_blank_title, ("title", "empty")),
    "no title": (_no_title, ("title", "required")),
    "title not text": (_title_not_text, ("title", "text")),
    "unknown top-level key": (_unknown_top_key, ("colour", "unknown")),
    "unknown document key": (_unknown_document_key, ("secret", "document 1")),
    "unknown recipient key": (_unknown_recipient_key, ("phone", "recipient 2")),
    "bad kind": (_bad_kind, ("annex",)),
    "letter without organisation": (_letter_without_organisation,
                                    ("organisation", "document 3")),
    "no report": (_no_report, ("report",)),
    "no documents": (_no_documents, ("documents",)),
    "not TOML": (_not_toml, ("not valid TOML",)),
    "manifest missing": (_manifest_missing, ("manifest.toml", "does not exist")),
    "publish_on not text": (_publish_on_not_text, ("publish_on",)),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_manifest_is_one_clear_error(tmp_path: Path, case: str) -> None:
    edit, needles = BAD[case]
    folder = tmp_path / "b"
    manifest = write_bundle(folder, publish_on="2099-01-01")
    edit(folder, manifest)
    with pytest.raises(InputError) as info:
        load_manifest(manifest)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle.lower() in message.lower(), message


def test_unreadable_file(tmp_path: Path) -> None:
    folder = tmp_path / "b"
    manifest = write_bundle(folder, publish_on="2099-01-01")
    target = folder / "letters" / "force-3.txt"
    target.chmod(0)
    try:
        if os.access(target, os.R_OK):
            pytest.skip("running as a user who can read mode-000 files (root)")
        with pytest.raises(InputError, match=r"force-3\.txt.*not readable"):
            load_manifest(manifest)
    finally:
        target.chmod(0o644)


def test_manifest_that_is_a_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="folder"):
        load_manifest(tmp_path)


# -- warnings -----------------------------------------------------------------------------
def test_letter_without_a_recipient_is_a_warning(tmp_path: Path) -> None:
    manifest = write_bundle(tmp_path / "b")
    replace_in(manifest, 'organisation = "Force 3"\n', 'organisation = "Force 33"\n')
    spec = load_manifest(manifest)
    assert len(spec.documents) == 4
    assert len(spec.warnings) == 1
    assert "force-3.txt" in spec.warnings[0] and "Force 3" in spec.warnings[0]


def test_no_recipients_at_all_warns_for_each_letter(tmp_path: Path) -> None:
    manifest = write_bundle(tmp_path / "b")
    text = manifest.read_text()
    manifest.write_text(text.split("[[recipients]]")[0])
    spec = load_manifest(manifest)
    assert spec.recipients == ()
    assert len(spec.warnings) == 3
