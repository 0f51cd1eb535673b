"""Pre-embargo copies: sent before the embargo and never at or after it,
once per officer, marked and traceable."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any, cast

import pytest
from aiosmtpd.controller import Controller
from freezegun import freeze_time
from pypdf import PdfReader
from sqlalchemy import select

from config.errors import InputError
from config.settings import Settings
from jobs.mail import FileMailTransport
from jobs.relay import OutboxRelay
from release.copies import DocumentOpener, issue_copies
from release.keys import load_private_key
from release.manifest import load_manifest
from release.pdf_text import text_pdf
from release.records import Copy, OutboxMessage
from release.service import ReleaseService, Services
from tests.conftest import SEED_INSTANT, FakeClock, Inbox, free_port, write_bundle

ROOT = Path(__file__).resolve().parent.parent
JUST_BEFORE = SEED_INSTANT - timedelta(microseconds=1)
CUTOFF = SEED_INSTANT - timedelta(seconds=60)  # copies.cutoff: the last moment a copy may start
QUEUED_AT = datetime(2014, 9, 1, 9, 0, tzinfo=UTC)


def pdf_bundle(folder: Path, letters: int = 3) -> Path:
    """The test bundle with a three-page PDF report and PDF letters."""
    manifest = write_bundle(folder, letters=letters)
    (folder / "national-report.pdf").write_bytes(text_pdf(
        [[f"National report, page {n}"] for n in range(1, 4)]))
    for i in range(1, letters + 1):
        (folder / "letters" / f"force-{i}.pdf").write_bytes(text_pdf(
            [[f"Letter to Force {i}"], ["Findings continued"]]))
    text = manifest.read_text().replace(".txt", ".pdf")
    manifest.write_text(text)
    return manifest


def queue(services: Services, manifest: Path, *, now: datetime = QUEUED_AT,
          copies_at: str | None = None, max_lead: timedelta | None = None) -> Any:
    queuing = dataclasses.replace(services, clock=FakeClock(now), copies_max_lead=max_lead)
    return ReleaseService(queuing, actor="comms").queue(
        load_manifest(manifest, copies_at=copies_at))


def relay_for(services: Services, settings: Settings, transport: Any = None) -> OutboxRelay:
    return OutboxRelay(services, transport or FileMailTransport(settings.outbox_dir),
                       sender="Press office <press@inspectorate.example>", worker="relay",
                       opener=DocumentOpener(services, load_private_key(settings.keys_dir)))


def copies_in_outbox(settings: Settings) -> list[EmailMessage]:
    return [cast(EmailMessage, message_from_bytes(p.read_bytes(), policy=policy.default))
            for p in sorted(settings.outbox_dir.glob("*.copy.*.eml"))]


# -- when copies go ----------
@pytest.mark.parametrize("copies_at", ["2014-09-04 00:01", "2014-09-04 00:02",
                                       "2014-09-03T23:01:00Z"])
def test_copies_at_or_after_the_embargo_are_refused(services: Services, bundle: Path,
                                                    copies_at: str) -> None:
    with pytest.raises(InputError, match="before the embargo"):
        queue(services, bundle, copies_at=copies_at)


def test_copies_must_start_before_the_cutoff(services: Services, bundle: Path) -> None:
    with pytest.raises(InputError, match="too close to the embargo"):
        queue(services, bundle, copies_at="2014-09-04 00:00:00")  # exactly 60 s before
    release = queue(services, bundle, copies_at="2014-09-03 23:59:59")
    assert release.copies_at.utc == CUTOFF - timedelta(seconds=1)


def test_no_copies_by_default_when_the_embargo_is_too_close(services: Services,
                                                            bundle: Path) -> None:
    close = queue(services, bundle, now=CUTOFF)
    assert close.copies_at is None
    just_in_time = queue(services, bundle, now=CUTOFF - timedelta(microseconds=1))
    assert just_in_time.copies_at.utc == CUTOFF - timedelta(microseconds=1)


def test_max_lead_is_enforced(services: Services, bundle: Path) -> None:
    with pytest.raises(InputError, match="more than 1d 00:00:00 before the embargo"):
        queue(services, bundle, copies_at="2014-09-03 00:00", max_lead=timedelta(hours=24))
    ok = queue(services, bundle, copies_at="2014-09-03 00:01", max_lead=timedelta(hours=24))
    assert ok.copies_at.utc == SEED_INSTANT - timedelta(hours=24)


def test_default_is_now_or_max_lead_before(services: Services, bundle: Path) -> None:
    assert queue(services, bundle).copies_at.utc == QUEUED_AT
    limited = queue(services, bundle, max_lead=timedelta(hours=24))
    assert limited.copies_at.utc == SEED_INSTANT - timedelta(hours=24)


def test_copy_time_in_a_gap_is_refused(services: Services, bundle: Path,
                                       tmp_path: Path) -> None:
    manifest = write_bundle(tmp_path / "spring", publish_on="2015-03-30")
    with pytest.raises(InputError, match="does not exist"):
        queue(services, manifest, copies_at="2015-03-29 01:30")


# -- never at or after the instant ----------
def test_copies_issued_and_sent_one_microsecond_before_the_cutoff(
        settings: Settings, services: Services) -> None:
    release = queue(services, pdf_bundle(settings.data_dir.parent / "b"),
                    copies_at="2014-09-03 12:00")
    with freeze_time(CUTOFF - timedelta(microseconds=1)):
        assert issue_copies(services, release.id, actor="t") == 3
        assert issue_copies(services, release.id, actor="t") == 0  # once
        assert relay_for(services, settings).run_once() == 3
    assert len(copies_in_outbox(settings)) == 3


@pytest.mark.parametrize("when", [CUTOFF, JUST_BEFORE, SEED_INSTANT])
def test_no_copy_is_started_at_or_after_the_cutoff(settings: Settings, services: Services,
                                                   when: datetime) -> None:
    release = queue(services, pdf_bundle(settings.data_dir.parent / "b"),
                    copies_at="2014-09-03 12:00")
    with freeze_time(CUTOFF - timedelta(microseconds=1)):
        assert issue_copies(services, release.id, actor="t") == 3
    with freeze_time(when):
        assert relay_for(services, settings).run_once() == 0
    assert copies_in_outbox(settings) == []
    with services.sessions() as session:
        rows = list(session.scalars(select(OutboxMessage)))
    assert all(r.given_up_at is not None and "embargo lifted" in (r.last_error or "")
               for r in rows)


def test_copies_not_issued_at_the_cutoff(settings: Settings, services: Services,
                                          bundle: Path) -> None:
    release = queue(services, bundle, copies_at="2014-09-03 12:00")
    with freeze_time(CUTOFF):
        assert issue_copies(services, release.id, actor="t") == 0
    with freeze_time(SEED_INSTANT):
        assert issue_copies(services, release.id, actor="t") == 0
    assert ReleaseService(services, actor="t").access_list(release.id)[1] == []
    events = [e.action for e in ReleaseService(services, actor="t").get(release.id).events]
    assert "copies_skipped" in events


def test_copies_wait_for_their_time(settings: Settings, services: Services,
                                    bundle: Path) -> None:
    release = queue(services, bundle, copies_at="2014-09-03 12:00")
    with freeze_time(datetime(2014, 9, 3, 10, 59, 59, 999999, tzinfo=UTC)):  # 11:59:59 BST
        assert issue_copies(services, release.id, actor="t") == 0
    with freeze_time(datetime(2014, 9, 3, 11, 0, tzinfo=UTC)):
        assert issue_copies(services, release.id, actor="t") == 3


# -- what officers receive ----------
def test_copy_message_marked_and_pdf_stamped_on_every_page(settings: Settings,
                                                           services: Services) -> None:
    release = queue(services, pdf_bundle(settings.data_dir.parent / "b"))
    with freeze_time(QUEUED_AT + timedelta(minutes=1)):
        issue_copies(services, release.id, actor="t")
        relay_for(services, settings).run_once()
    messages = {str(m["To"]): m for m in copies_in_outbox(settings)}
    assert sorted(messages) == [f"liaison{i}@force{i}.police.example" for i in (1, 2, 3)]
    message = messages["liaison2@force2.police.example"]
    assert str(message["Subject"]).startswith("EMBARGOED UNTIL 00:01 BST THURSDAY 4 SEPTEMBER "
                                              "2014")
    copy_id = str(message["X-Embargo-Copy-Id"])
    body = message.get_body(("plain",))
    assert body is not None
    text = body.get_content()
    assert "00:01 BST Thursday 4 September 2014 (23:01 UTC Wednesday 3 September)" in text
    assert "must not be published" in text and copy_id in text
    attachments = {a.get_filename(): a.get_content() for a in message.iter_attachments()}
    assert sorted(attachments) == ["force-2.pdf", "national-report.pdf"]
    for name, data in attachments.items():
        reader = PdfReader(io.BytesIO(data))
        assert reader.metadata is not None
        assert reader.metadata["/EmbargoCopyId"] == copy_id
        for page in reader.pages:
            assert "EMBARGOED UNTIL 00:01 BST THURSDAY 4 SEPTEMBER 2014" in page.extract_text()
            assert copy_id in page.extract_text()
        assert len(reader.pages) == (3 if name == "national-report.pdf" else 2)
    # Each officer's copy id is their own.
    assert len({str(m["X-Embargo-Copy-Id"]) for m in messages.values()}) == 3


def test_non_pdf_documents_go_unchanged_with_the_id_in_headers(
        settings: Settings, services: Services, bundle: Path) -> None:
    release = queue(services, bundle)
    with freeze_time(QUEUED_AT + timedelta(minutes=1)):
        issue_copies(services, release.id, actor="t")
        relay_for(services, settings).run_once()
    message = copies_in_outbox(settings)[0]
    original = (bundle.parent / "national-report.txt").read_bytes()
    attached = {a.get_filename(): a.get_content() for a in message.iter_attachments()}
    assert attached["national-report.txt"].encode() == original
    assert str(message["X-Embargo-Copy-Id"]).startswith("CPY-")


# -- trace and the access list ----------
def test_welsh_and_accented_text_survives_the_mail_encoding(
        settings: Settings, services: Services, tmp_path: Path) -> None:
    """Titles, names, organisations and file names outside ASCII reach the
    reader intact: RFC 2047 headers, RFC 2231 file names, UTF-8 bodies."""
    manifest = write_bundle(tmp_path / "cy", letters=1)
    letter = tmp_path / "cy" / "letters" / "llythyr-i'r-gŵr.txt"
    (tmp_path / "cy" / "letters" / "force-1.txt").rename(letter)
    manifest.write_text(manifest.read_text(encoding="utf-8")
                        .replace("Core business: a test inspection",
                                 "Adolygiad o wasanaethau llyfrgell — Gŵyl Dewi")
                        .replace("force-1.txt", letter.name)
                        .replace('"Force 1"', '"Cyngor Sir Ynys Môn"')
                        .replace("Liaison 1", "Siân Ffrancon-Jones"), encoding="utf-8")
    release = queue(services, manifest)
    with freeze_time(QUEUED_AT + timedelta(minutes=1)):
        issue_copies(services, release.id, actor="t")
        OutboxRelay(services, FileMailTransport(settings.outbox_dir),
                    sender="Swyddfa’r Wasg <press@inspectorate.example>", worker="relay",
                    opener=DocumentOpener(services, load_private_key(settings.keys_dir))
                    ).run_once()
    raw = next(settings.outbox_dir.glob("*.copy.*.eml")).read_bytes()
    assert raw.isascii()  # every non-ASCII character travels encoded
    message = copies_in_outbox(settings)[0]
    assert str(message["Subject"]).endswith(": Adolygiad o wasanaethau llyfrgell — Gŵyl Dewi")
    assert message["From"].addresses[0].display_name == "Swyddfa’r Wasg"
    body = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert body is not None and html is not None
    assert "Dear Siân Ffrancon-Jones," in body.get_content()
    assert "with the letter to Cyngor Sir Ynys Môn." in body.get_content()
    assert "Gŵyl Dewi" in html.get_content()
    attached = {a.get_filename(): a.get_content() for a in message.iter_attachments()}
    assert attached[letter.name].encode() == letter.read_bytes()


def test_trace_from_a_leaked_pdf_and_from_a_copy_id(settings: Settings,
                                                    services: Services) -> None:
    release = queue(services, pdf_bundle(settings.data_dir.parent / "b"))
    with freeze_time(QUEUED_AT + timedelta(minutes=1)):
        issue_copies(services, release.id, actor="t")
        relay_for(services, settings).run_once()
    message = next(m for m in copies_in_outbox(settings)
                   if str(m["To"]) == "liaison3@force3.police.example")
    leaked = next(a.get_content() for a in message.iter_attachments()
                  if a.get_filename() == "national-report.pdf")
    leak_file = settings.data_dir.parent / "found-on-a-website.pdf"
    leak_file.write_bytes(leaked)
    found = ReleaseService(services, actor="t").trace(str(leak_file), leak_file.read_bytes())
    assert (found.name, found.email, found.organisation) == (
        "Liaison 3", "liaison3@force3.police.example", "Force 3")
    assert found.sent_at is not None
    by_id = ReleaseService(services, actor="t").trace(str(message["X-Embargo-Copy-Id"]).lower())
    assert by_id == found
    # And through the command line, from the file alone.
    cli = subprocess.run([sys.executable, "-m", "jobs.cli", "--data-dir", str(settings.data_dir),
                          "trace", str(leak_file)], cwd=ROOT, capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert "Liaison 3 <liaison3@force3.police.example>, Force 3" in cli.stdout
    missing = subprocess.run([sys.executable, "-m", "jobs.cli", "--data-dir",
                              str(settings.data_dir), "trace", "CPY-0000-0000-0000"],
                             cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode != 0 and "no copy CPY-0000-0000-0000" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_access_list_matches_what_was_sent(settings: Settings, services: Services) -> None:
    release = queue(services, pdf_bundle(settings.data_dir.parent / "b"))
    with freeze_time(QUEUED_AT + timedelta(minutes=1)):
        issue_copies(services, release.id, actor="t")
        relay_for(services, settings).run_once()
    _, rows = ReleaseService(services, actor="t").access_list(release.id)
    sent = {str(m["X-Embargo-Copy-Id"]): m for m in copies_in_outbox(settings)}
    assert {r.copy_id for r in rows} == set(sent)
    for row in rows:
        message = sent[row.copy_id]
        assert str(message["To"]) == row.email
        assert sorted(a.get_filename() or "" for a in message.iter_attachments()) == sorted(
            row.documents)
        assert row.sent_at is not None
    events = ReleaseService(services, actor="t").get(release.id).events
    assert sorted(e.details["copy_id"] for e in events
                  if e.action == "copy_sent") == sorted(sent)
    cli = subprocess.run([sys.executable, "-m", "jobs.cli", "--data-dir", str(settings.data_dir),
                          "access-list", release.id, "--json"], cwd=ROOT, capture_output=True,
                         text=True)
    assert cli.returncode == 0, cli.stderr
    assert {r["copy_id"] for r in json.loads(cli.stdout)} == set(sent)


# -- changes after copies went ----------
def test_reschedule_and_cancel_notify_exactly_the_copy_holders(
        settings: Settings, services: Services, tmp_path: Path) -> None:
    release = queue(services, write_bundle(tmp_path / "b", letters=3))
    clock = FakeClock(QUEUED_AT + timedelta(minutes=1))
    now_services = dataclasses.replace(services, clock=clock)
    assert issue_copies(now_services, release.id, actor="t") == 3
    relay = relay_for(now_services, settings)
    # Officer 3's copy is not delivered (their server is down, say).
    with services.sessions() as session, session.begin():
        for row in session.scalars(select(OutboxMessage)):
            if row.to_addr.startswith("liaison3"):
                row.next_attempt_at = clock.now() + timedelta(days=30)
    assert relay.run_once() == 2
    service = ReleaseService(now_services, actor="comms")
    service.reschedule(release.id, publish_on="2014-09-05", at=None, zone=None)
    clock.set(clock.now() + timedelta(minutes=1))
    assert relay.run_once() == 3  # all three hold (or are about to hold) a copy
    names = sorted(p.name.split(".")[1] for p in settings.outbox_dir.glob("*.eml"))
    assert names.count("copy") == 2
    assert sum(n.startswith("rescheduled") for n in names) == 3
    service.cancel(release.id, reason="withdrawn")
    clock.set(clock.now() + timedelta(minutes=1))
    assert relay.run_once() == 2  # only officers who actually received a copy
    withdrawn = [message_from_bytes(p.read_bytes()) for p in
                 settings.outbox_dir.glob("*.withdrawn*.eml")]
    assert sorted(str(m["To"]) for m in withdrawn) == [
        "liaison1@force1.police.example", "liaison2@force2.police.example"]
    with services.sessions() as session:
        pending = session.scalars(select(OutboxMessage).where(
            OutboxMessage.to_addr.startswith("liaison3"),
            OutboxMessage.purpose == "copy")).one()
    assert pending.given_up_at is not None and pending.delivered_at is None
    assert relay.run_once() == 0


# -- across a crash, to a real SMTP server ----------
def test_one_copy_per_officer_across_a_scheduler_crash(settings: Settings, services: Services,
                                                       tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "EMBARGO_MAIL_TRANSPORT": "smtp", "EMBARGO_MAIL_SMTP_HOST": "127.0.0.1",
           "EMBARGO_MAIL_SMTP_PORT": str(port), "EMBARGO_MAIL_SMTP_SECURITY": "none",
           "EMBARGO_SCHEDULER_POLL_SECONDS": "0.1"}
    instant = (datetime.now(UTC) + timedelta(minutes=10)).replace(microsecond=0)
    release = ReleaseService(services, actor="comms").queue(load_manifest(
        pdf_bundle(tmp_path / "b"), publish_on=instant.isoformat()))

    def copies_in(inbox: Inbox) -> list[Any]:
        return [m for m in inbox.messages if m["X-Embargo-Copy-Id"]]

    def run() -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "--data-dir",
                                 str(settings.data_dir), "run"], cwd=ROOT, env=env, text=True,
                                stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
        assert proc.stderr is not None
        while (line := proc.stderr.readline()) and "running" not in line:
            pass  # log lines may come first (this node's rehearsal alert)
        assert "running" in line
        return proc

    first = run()
    try:  # copies are issued at once; the mail server is down, so none is delivered
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with services.sessions() as session:
                rows = list(session.scalars(select(OutboxMessage).where(
                    OutboxMessage.purpose == "copy")))
            if len(rows) == 3 and all(r.attempts >= 1 for r in rows):
                break
            time.sleep(0.05)
        assert len(rows) == 3 and all(r.delivered_at is None for r in rows)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        for _ in range(2):  # restart, and restart again
            second = run()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and len(copies_in(inbox)) < 3:
                time.sleep(0.05)
            time.sleep(0.5)
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=15) == 0
    finally:
        controller.stop()
    to = sorted(str(m["To"]) for m in copies_in(inbox))  # not the owner's rehearsal alert
    assert to == [f"liaison{i}@force{i}.police.example" for i in (1, 2, 3)]
    with services.sessions() as session:
        copies = list(session.scalars(select(Copy).where(Copy.release_id == release.id)))
    assert len(copies) == 3 and all(c.sent_at is not None for c in copies)


def test_publication_notices_go_before_waiting_copies(settings: Settings, services: Services,
                                                      tmp_path: Path) -> None:
    """Copies carry attachments and are slow; a release that has just been
    published must not wait behind another release's copies."""
    from release.publishing import Publisher

    later = queue(services, write_bundle(tmp_path / "later", letters=2, publish_on="2014-09-05"))
    now_release = queue(services, write_bundle(tmp_path / "now", letters=2))
    at = dataclasses.replace(services, clock=FakeClock(SEED_INSTANT))
    with freeze_time(QUEUED_AT + timedelta(minutes=1)):
        assert issue_copies(services, later.id, actor="t") == 2
    assert Publisher(at, load_private_key(settings.keys_dir), claimant="p").publish(
        now_release.id).status == "published"
    order: list[str] = []

    class Recording(FileMailTransport):
        def send(self, message: EmailMessage) -> str:
            order.append(str(message["Subject"]).split(":")[0])
            return super().send(message)

    relay = OutboxRelay(at, Recording(settings.outbox_dir), sender="e@x.example", worker="r",
                        opener=DocumentOpener(at, load_private_key(settings.keys_dir)))
    assert relay.run_once() == 5  # 2 published + 1 owner summary + 2 copies
    assert order[:3] == ["Published", "Published", "Release published"]
    assert all(o.startswith("EMBARGOED UNTIL") for o in order[3:])


def test_a_release_without_recipients_has_no_copies_job(services: Services,
                                                        tmp_path: Path) -> None:
    manifest = write_bundle(tmp_path / "b", letters=0)
    assert queue(services, manifest).copies_at is None
