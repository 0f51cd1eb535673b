"""Notices never silently lost (issue 12, defects 3-5): a refused recipient
fails at once and can be resent; an outage longer than the old retry budget
still delivers; a message that cannot be built fails alone; copy files go
with a cancellation; the owner's summary says what happened."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import select, update

from config.errors import StateError
from config.settings import Settings
from jobs.cli import main
from jobs.mail import FileMailTransport, SmtpMailTransport
from jobs.relay import OutboxRelay
from release import audit, sealing
from release.copies import DocumentOpener, issue_copies
from release.keys import load_private_key
from release.pdf_text import text_pdf
from release.presenting import notice_state
from release.records import AuditEvent, Copy, OutboxMessage, Release
from release.service import ReleaseService, Services
from release.vault_keys import dek_key, document_key
from tests.conftest import SEED_INSTANT, FakeClock, Inbox, free_port, write_bundle
from tests.test_copies import QUEUED_AT, pdf_bundle, queue, relay_for
from tests.test_notify import published  # noqa: F401 - a fixture

BAD = "liaison2@force2.police.example"


class Refusing(Inbox):
    """Refuses RCPT to the addresses in ``refuse`` with a 550."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse = {BAD}

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: Any) -> str:
        if address in self.refuse:
            return f"550 5.1.1 <{address}>: no such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"


def rows_of(services: Services, **where: Any) -> list[OutboxMessage]:
    with services.sessions() as session:
        query = select(OutboxMessage).order_by(OutboxMessage.id)
        for key, value in where.items():
            query = query.where(getattr(OutboxMessage, key) == value)
        return list(session.scalars(query))


def actions(services: Services, action: str) -> list[dict[str, Any]]:
    with services.sessions() as session:
        return [json.loads(e.details) for e in session.scalars(
            select(AuditEvent).where(AuditEvent.action == action))]


def body(message: Any) -> str:
    text: bytes = message.get_payload()[0].get_payload(decode=True)
    return text.decode()


def test_a_550_recipient_fails_after_one_attempt_is_alerted_and_resent(
        published: Services, capsys: pytest.CaptureFixture[str],  # noqa: F811
        settings: Settings) -> None:
    port = free_port()
    inbox = Refusing()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        relay = OutboxRelay(published, SmtpMailTransport("127.0.0.1", port, security="none"),
                            sender="e@x.example", worker="relay")
        assert relay.run_once() == 4  # two officers, the summary, the alert
        bad = rows_of(published, to_addr=BAD)[0]
        assert bad.attempts == 1 and bad.failed_at is not None and bad.delivered_at is None
        assert notice_state(bad) == "failed"
        assert bad.last_error and "550" in bad.last_error and "no such user" in bad.last_error
        failed = actions(published, "notice_failed")
        assert [f["to"] for f in failed] == [BAD] and "550" in failed[0]["reason"]
        published.clock.set(SEED_INSTANT + timedelta(days=1))  # type: ignore[attr-defined]
        assert relay.run_once() == 0  # no retry of a permanent failure
        by_to = {str(m["To"]): m for m in inbox.messages}
        assert BAD not in by_to
        alert = by_to["press@inspectorate.example"]
        alerts = [m for m in inbox.messages if ".alert-" in m["Message-ID"]]
        assert len(alerts) == 1 and BAD in str(alerts[0]["Subject"])
        assert "550" in body(alerts[0]) and f"embargo resend {bad.id}" in body(alerts[0])
        summary = next(m for m in inbox.messages if ".owner_summary." in m["Message-ID"])
        assert "delivered 2, failed 1" in body(summary)
        assert f"Liaison 2 <{BAD}>: " in body(summary) and "no such user" in body(summary)
        assert "being notified" not in body(summary)
        assert alert is not None

        with pytest.raises(StateError):  # a delivered notice is not resent
            ReleaseService(published, actor="comms").resend(
                str(rows_of(published, purpose="published")[0].id))
        inbox.refuse.clear()  # the address is fixed at the server
        again = ReleaseService(published, actor="comms").resend(str(bad.id))
        assert [r.number for r in again] == [bad.id]
        assert relay.run_once() == 1
        assert relay.run_once() == 0
    finally:
        controller.stop()
    to_bad = [m for m in inbox.messages if str(m["To"]) == BAD]
    assert len(to_bad) == 1 and to_bad[0]["Message-ID"] == bad.message_id
    assert [r["to"] for r in actions(published, "notice_resent")] == [BAD]
    with published.sessions() as session:
        assert audit.verify(session).ok


def test_resend_to_another_address_from_the_command_line(
        published: Services, settings: Settings,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    inbox = Refusing()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        relay = OutboxRelay(published, SmtpMailTransport("127.0.0.1", port, security="none"),
                            sender="e@x.example", worker="relay")
        relay.run_once()
        bad = rows_of(published, to_addr=BAD)[0]
        argv = ["--data-dir", str(settings.data_dir)]
        assert main([*argv, "resend", str(bad.id), "--to", "fixed@force2.police.example"]) == 0
        assert "fixed@force2.police.example" in capsys.readouterr().out
        assert main([*argv, "resend", str(bad.id)]) != 0  # pending again, not resendable
        # The command ran on the real clock: the relay's clock moves there too.
        published.clock.set(datetime.now(UTC) + timedelta(seconds=1))  # type: ignore[attr-defined]
        assert relay.run_once() == 1
        assert main([*argv, "show", bad.release_id]) == 0
        out = capsys.readouterr().out
        assert "fixed@force2.police.example" in out and "delivered" in out
    finally:
        controller.stop()
    fixed = [m for m in inbox.messages if str(m["To"]) == "fixed@force2.police.example"]
    assert len(fixed) == 1 and fixed[0]["Message-ID"] == bad.message_id


def test_show_says_failed_not_pending(published: Services, settings: Settings,  # noqa: F811
                                      capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    inbox = Refusing()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        OutboxRelay(published, SmtpMailTransport("127.0.0.1", port, security="none"),
                    sender="e@x.example", worker="relay").run_once()
    finally:
        controller.stop()
    release_id = rows_of(published)[0].release_id
    assert main(["--data-dir", str(settings.data_dir), "show", release_id, "--json"]) == 0
    notices = json.loads(capsys.readouterr().out)["notices"]
    bad = next(n for n in notices if n["to"] == BAD)
    assert bad["state"] == "failed" and "550" in bad["last_error"]


def test_an_outage_longer_than_the_old_54_minutes_still_delivers(
        published: Services, settings: Settings) -> None:  # noqa: F811
    clock = published.clock
    assert isinstance(clock, FakeClock)
    port = free_port()
    relay = OutboxRelay(published, SmtpMailTransport("127.0.0.1", port, security="none",
                                                     timeout=1),
                        sender="e@x.example", worker="relay")
    while clock.now() < SEED_INSTANT + timedelta(hours=3):  # down for three hours
        assert relay.run_once() == 0
        wait = relay.next_due()
        assert wait is not None
        clock.set(clock.now() + timedelta(seconds=wait))
    rows = rows_of(published, purpose="published")
    assert all(r.given_up_at is None and r.attempts > 20 for r in rows)
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        clock.set(clock.now() + timedelta(minutes=5))
        assert relay.run_once() >= 4
    finally:
        controller.stop()
    assert sorted(str(m["To"]) for m in inbox.messages if ".alert-" not in m["Message-ID"]) \
        == sorted([r.to_addr for r in rows] + ["press@inspectorate.example"])
    assert not actions(published, "notice_given_up")


def test_a_crlf_title_fails_that_releases_notices_alone(
        settings: Settings, services: Services, tmp_path: Path) -> None:
    """A poison row written straight into the database: its notices fail
    with the error recorded, attempts counted and audited; the other
    release's notices go; no temporary file is left in the outbox."""
    from release.publishing import Publisher
    from tests.test_publish import queue_seed

    at_instant = dataclasses.replace(services, clock=FakeClock(SEED_INSTANT))
    poison = queue_seed(services, write_bundle(tmp_path / "a"))
    fine = queue_seed(services, write_bundle(tmp_path / "b"))
    publisher = Publisher(at_instant, load_private_key(settings.keys_dir), claimant="n")
    assert publisher.publish(poison.id).status == "published"
    assert publisher.publish(fine.id).status == "published"
    with services.sessions() as session, session.begin():
        session.execute(update(Release).where(Release.id == poison.id).values(
            title="Core business\r\nBcc: everyone@example.org"))
    relay = OutboxRelay(at_instant, FileMailTransport(settings.outbox_dir),
                        sender="e@x.example", worker="relay")
    relay.run_once()
    delivered = rows_of(services, release_id=fine.id)
    assert len(delivered) == 4 and all(r.delivered_at is not None for r in delivered)
    bad = rows_of(services, release_id=poison.id, purpose="published")
    assert len(bad) == 3
    assert all(r.failed_at is not None and r.attempts == 1 and r.last_error
               and "HeaderParseError" in r.last_error for r in bad)
    assert len([f for f in actions(services, "notice_failed")
                if f["purpose"] == "published"]) == 3
    assert list(settings.outbox_dir.glob(".part-*")) == []
    at_instant.clock.set(SEED_INSTANT + timedelta(hours=1))  # type: ignore[attr-defined]
    relay.run_once()
    assert list(settings.outbox_dir.glob(".part-*")) == []
    assert all(r.attempts == 1 for r in rows_of(services, release_id=poison.id,
                                                  purpose="published"))


def reseal(services: Services, settings: Settings, release_id: str, document_id: str,
           data: bytes) -> None:
    """Put ``data`` in the vault as the document: what a PDF that got past
    the queue's checks would look like to the relay."""
    dek = sealing.open_dek(services.vault.get_bytes(dek_key(release_id)),
                           load_private_key(settings.keys_dir), release_id)
    services.vault.put_bytes(document_key(release_id, document_id),
                             sealing.seal_bytes(dek, document_id, data))


def test_a_poison_pdf_fails_that_copy_alone(settings: Settings, services: Services,
                                            tmp_path: Path) -> None:
    release = queue(services, pdf_bundle(tmp_path / "b"))
    letter = next(d for d in release.documents if d.organisation == "Force 2")
    poison = text_pdf([["Letter to Force 2"]]).replace(b"/MediaBox [ 0.0 0.0 595 842 ]",
                                                        b"/MediaBox null")
    reseal(services, settings, release.id, letter.id, poison)
    at = dataclasses.replace(services, clock=FakeClock(QUEUED_AT + timedelta(minutes=1)))
    assert issue_copies(at, release.id, actor="n") == 3
    relay = relay_for(at, settings)
    assert relay.run_once() >= 2
    copies = rows_of(services, purpose="copy")
    bad = next(r for r in copies if r.to_addr == BAD)
    assert bad.failed_at is not None and bad.attempts == 1 and bad.delivered_at is None
    assert bad.last_error and "ValueError" in bad.last_error and "MediaBox" in bad.last_error
    assert all(r.delivered_at is not None for r in copies if r.to_addr != BAD)
    assert [f["to"] for f in actions(services, "notice_failed")] == [BAD]
    assert list(settings.outbox_dir.glob(".part-*")) == []
    assert len(list(settings.outbox_dir.glob("*.copy.*.eml"))) == 2


def test_the_data_key_is_opened_once_per_release_for_all_copies(
        settings: Settings, services: Services, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    release = queue(services, pdf_bundle(tmp_path / "b", letters=5))
    at = dataclasses.replace(services, clock=FakeClock(QUEUED_AT + timedelta(minutes=1)))
    assert issue_copies(at, release.id, actor="n") == 5
    opened: list[str] = []
    real = sealing.open_dek

    def counting(sealed: bytes, key: Any, release_id: str) -> bytes:
        opened.append(release_id)
        return real(sealed, key, release_id)

    monkeypatch.setattr(sealing, "open_dek", counting)
    relay = OutboxRelay(at, FileMailTransport(settings.outbox_dir), sender="e@x.example",
                        worker="relay", workers=3,
                        make_transport=lambda: FileMailTransport(settings.outbox_dir),
                        opener=DocumentOpener(at, load_private_key(settings.keys_dir)))
    assert relay.run_once() == 5
    assert opened == [release.id]  # 5 copies, 10 documents: one open of the data key


def test_cancel_removes_copy_files_and_says_what_remains(
        settings: Settings, services: Services, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    release = queue(services, pdf_bundle(tmp_path / "b"))
    at = dataclasses.replace(services, clock=FakeClock(QUEUED_AT + timedelta(minutes=1)))
    assert issue_copies(at, release.id, actor="n") == 3
    assert relay_for(at, settings).run_once() == 3
    files = list(settings.outbox_dir.glob("*.copy.*.eml"))
    assert len(files) == 3
    assert main(["--data-dir", str(settings.data_dir), "cancel", release.id,
                 "--reason", "withdrawn"]) == 0
    out = capsys.readouterr().out
    assert "removed 3 pre-embargo copy file(s)" in out
    assert list(settings.outbox_dir.glob("*.copy.*.eml")) == []
    with services.sessions() as session:
        assert session.scalars(select(Copy)).all()  # the access list keeps its record
    assert sorted(actions(services, "copy_files_removed")[0]["files"]) == sorted(
        f.name for f in files)
