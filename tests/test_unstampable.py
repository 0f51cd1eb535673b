"""A PDF that cannot be stamped is found at queue time, not by the relay
when the copies are due: refused with the reason, or (with
``copies.unstampable = "send-unmarked"``) sent unmarked with the copy id in
the message."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path

import pytest
from freezegun import freeze_time
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from config.errors import InputError
from config.settings import Settings
from release.copies import issue_copies
from release.copy_ids import find_copy_id
from release.manifest import DocumentSpec, load_manifest
from release.pdf_text import text_pdf
from release.service import ReleaseService, Services, trial_stamp
from tests.test_copies import QUEUED_AT, copies_in_outbox, pdf_bundle, relay_for

GOOD = text_pdf([["National report, page 1"], ["page 2"]])
NULL_MEDIABOX = GOOD.replace(b"/MediaBox [ 0.0 0.0 595 842 ]", b"/MediaBox null                 ")


def _poison(folder: Path) -> Path:
    manifest = pdf_bundle(folder)
    assert NULL_MEDIABOX != GOOD
    (folder / "national-report.pdf").write_bytes(NULL_MEDIABOX)
    return manifest


def _queue(services: Services, manifest: Path) -> object:
    with freeze_time(QUEUED_AT):
        return ReleaseService(services, actor="comms").queue(load_manifest(manifest))


def test_an_unstampable_pdf_is_refused_at_queue(services: Services, tmp_path: Path) -> None:
    manifest = _poison(tmp_path / "b")
    with pytest.raises(InputError) as info:
        _queue(services, manifest)
    message = str(info.value)
    assert "national-report.pdf cannot be stamped" in message
    assert "ValueError" in message and "MediaBox" in message
    assert "copies.unstampable" in message and "\n" not in message
    assert list(services.vault.keys("")) == []


def test_send_unmarked_queues_it_and_the_relay_sends_it_unmarked(
        settings: Settings, services: Services, tmp_path: Path) -> None:
    manifest = _poison(tmp_path / "b")
    lenient = dataclasses.replace(services, copies_unstampable="send-unmarked")
    release = _queue(lenient, manifest)
    with freeze_time(QUEUED_AT + timedelta(minutes=1)):
        assert issue_copies(lenient, release.id, actor="t") == 3  # type: ignore[attr-defined]
        relay_for(lenient, settings).run_once()
    messages = copies_in_outbox(settings)
    assert len(messages) == 3
    for message in messages:
        copy_id = str(message["X-Embargo-Copy-Id"])
        assert copy_id.startswith("CPY-")
        body = message.get_body(("plain",))
        assert body is not None and copy_id in body.get_content()
        attached = {a.get_filename(): a.get_content() for a in message.iter_attachments()}
        assert attached["national-report.pdf"] == NULL_MEDIABOX  # unmarked, as it was
        letter = next(v for k, v in attached.items() if k != "national-report.pdf")
        assert find_copy_id(letter) == copy_id  # the good PDFs are still stamped


def test_a_pdf_that_is_not_a_pdf_is_refused(services: Services, tmp_path: Path) -> None:
    manifest = pdf_bundle(tmp_path / "b")
    (tmp_path / "b" / "letters" / "force-2.pdf").write_bytes(b"this is a text file\n")
    with pytest.raises(InputError, match=r"force-2\.pdf cannot be stamped"):
        _queue(services, manifest)


_TOKENS = [b"null", b"-1", b"99999999999", b"<<", b">>", b"[", b"]", b"/Parent", b"0 R",
           b"1 0 R", b"/Kids [", b"stream", b"endobj", b"/Length 0", b"/Filter /FlateDecode",
           b"\x00", b"(", b"/Type /Pages", b"/Count 7", b"/Resources 5 0 R"]


@hsettings(max_examples=300, deadline=None, derandomize=True,
           suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.floats(0, 1), st.sampled_from(_TOKENS), st.integers(0, 12)),
                min_size=1, max_size=6),
       st.floats(0.2, 1.0))
def test_mutated_pdfs_are_stamped_or_refused_never_a_crash(
        tmp_path: Path, edits: list[tuple[float, bytes, int]], keep: float) -> None:
    data = bytearray(GOOD)
    for where, token, drop in edits:
        at = int(where * len(data))
        data[at:at + drop] = token
    data = data[:max(8, int(len(data) * keep))]
    path = tmp_path / "mutant.pdf"
    path.write_bytes(bytes(data))
    doc = DocumentSpec(path=path, filename="mutant.pdf", kind="report", organisation=None,
                       content_type="application/pdf", size=len(data))
    try:
        digest = trial_stamp(doc, "00:01 BST THURSDAY 4 SEPTEMBER 2014", unstampable="refuse")
    except InputError as exc:
        assert "mutant.pdf cannot be stamped" in str(exc) and "\n" not in str(exc)
    else:
        assert digest is not None and len(digest) == 64
