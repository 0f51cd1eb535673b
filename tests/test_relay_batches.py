"""Issue 16's relay: deliveries recorded per worker in batches, claims of
several rows in one statement, and the notices of publication built (and
the mail connections opened) before the instant. Exactly once keeps its
documented window: a crash between handing notices over and recording them
resends at most that worker's unrecorded batch, under the same Message-IDs.
Never early: a notice built ahead goes only once its release is published,
and only while the published release is what it was built from."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import event, select

from config.settings import Settings
from jobs import relay as relay_module
from jobs.mail import Prepared, SmtpMailTransport, prepare_message
from jobs.relay import OutboxRelay
from release import audit
from release.keys import load_private_key
from release.notices import compose
from release.publishing import Publisher
from release.records import AuditEvent, OutboxMessage, Recipient, Release
from release.service import ReleaseService, Services
from tests.conftest import SEED_INSTANT, FakeClock, claims_held_during, free_port, write_bundle
from tests.test_publish import queue_seed

ROOT = Path(__file__).resolve().parent.parent


class RawInbox:
    """Keeps each message as the server received it, and the connections."""

    def __init__(self) -> None:
        self.raw: list[bytes] = []
        self.peers: set[object] = set()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.raw.append(bytes(envelope.content))
        self.peers.add(session.peer)
        return "250 OK"

    @property
    def messages(self) -> list[Message]:
        return [message_from_bytes(data) for data in self.raw]


@pytest.fixture
def smtp() -> Iterator[tuple[int, RawInbox]]:
    port, inbox = free_port(), RawInbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield port, inbox
    controller.stop()


def queued(services: Services, tmp_path: Path, letters: int) -> str:
    return queue_seed(services, write_bundle(tmp_path / "bundle", letters=letters)).id


def publish(settings: Settings, services: Services, release_id: str,
            at: datetime = SEED_INSTANT) -> None:
    publisher = Publisher(dataclasses.replace(services, clock=FakeClock(at)),
                          load_private_key(settings.keys_dir), claimant="n")
    assert publisher.publish(release_id).status == "published"


def smtp_relay(services: Services, port: int, **kw: Any) -> OutboxRelay:
    def connect() -> SmtpMailTransport:
        return SmtpMailTransport("127.0.0.1", port, security="none", timeout=5)

    return OutboxRelay(services, connect(), sender="Press office <press@inspectorate.example>",
                       worker="relay", make_transport=connect, **kw)


def rows(services: Services) -> list[OutboxMessage]:
    with services.sessions() as session:
        return list(session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)))


def shape(message: Message) -> list[object]:
    """A message's headers and parts, decoded, but its MIME boundaries (random
    per flattening) and its Date."""
    out: list[object] = [(k, v) for k, v in message.items() if k not in ("Content-Type", "Date")]
    for part in message.walk():
        data = None if part.is_multipart() else part.get_payload(decode=True)
        out.append((part.get_content_type(), part.get_filename(),
                    data.replace(b"\r\n", b"\n") if isinstance(data, bytes) else data))
    return out


def test_a_crash_between_sending_and_recording_resends_at_most_the_batch(
        settings: Settings, services: Services, tmp_path: Path,
        smtp: tuple[int, RawInbox]) -> None:
    """The relay dies right after the server took its third message: the
    first was recorded (with its worker's next claim), the second and third
    were not yet (a batch of four). The relay that takes over sends exactly
    those two again, under the same Message-IDs, and nothing recorded."""
    port, inbox = smtp
    release_id = queued(services, tmp_path, letters=11)
    publish(settings, services, release_id)
    child = subprocess.run(
        [sys.executable, "-m", "tests.relay_crash_child", str(settings.data_dir), str(port),
         "3", "4"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=60)
    assert child.returncode == -9, child.stderr
    assert len(inbox.raw) == 3
    first = [str(m["Message-ID"]) for m in inbox.messages]
    recorded = {r.message_id for r in rows(services) if r.delivered_at is not None}
    unrecorded = [m for m in first if m not in recorded]
    assert len(recorded) == 1 and len(unrecorded) == 2  # the batch on its way
    time.sleep(1.1)  # the dead relay's claims lapse (its lease is a second)
    successor = smtp_relay(services, port, lease=timedelta(seconds=1))
    assert successor.run_once() == 12 - 1
    counts = collections.Counter(str(m["Message-ID"]) for m in inbox.messages)
    assert len(counts) == 12  # eleven officers and the owner
    twice = sorted(m for m, n in counts.items() if n > 1)
    assert twice == sorted(unrecorded) and max(counts.values()) == 2
    assert len(twice) <= 4  # at most the record batch
    assert all(r.delivered_at is not None for r in rows(services))
    with services.sessions() as session:
        assert audit.verify(session).ok


def test_notices_prepared_before_the_instant_go_only_once_published(
        settings: Settings, services: Services, tmp_path: Path,
        smtp: tuple[int, RawInbox], monkeypatch: pytest.MonkeyPatch) -> None:
    """Built and connected a second before the instant, nothing goes: there
    is no outbox row yet. Once published, the three notices go as built (not
    composed again), and are what composing them then would have made; the
    owner's summary, which says how they went, is composed when it goes."""
    port, inbox = smtp
    release_id = queued(services, tmp_path, letters=3)
    clock = FakeClock(SEED_INSTANT - timedelta(seconds=1))
    relay = smtp_relay(dataclasses.replace(services, clock=clock), port, workers=2)
    assert relay.prepare(release_id, SEED_INSTANT) == 3
    assert relay.run_once() == 0 and not inbox.raw  # before: nothing, not even prepared
    clock.set(SEED_INSTANT)
    assert relay.run_once() == 0 and not inbox.raw  # at the instant, not yet published
    publish(settings, services, release_id)
    composed: list[str] = []

    def counting(row: OutboxMessage, *args: Any, **kw: Any) -> Message:
        composed.append(row.purpose)
        return compose(row, *args, **kw)

    monkeypatch.setattr(relay_module, "compose", counting)
    assert relay.run_once() == 4
    assert composed == ["owner_summary"]
    assert len(inbox.raw) == 4 and len(inbox.peers) <= 2  # over the prepared connections
    with services.sessions() as session:
        release = session.get(Release, release_id)
        assert release is not None
        release.documents  # noqa: B018
        recipients = {r.id: r for r in session.scalars(select(Recipient))}
        session.expunge_all()
    received = {str(m["Message-ID"]): m for m in inbox.messages}
    for row in rows(services):
        if row.purpose == "published":
            expected = compose(row, release, recipients[row.recipient_id or ""],
                               sender="Press office <press@inspectorate.example>")
            got = received[row.message_id]
            assert shape(got) == shape(expected)
            assert got["Date"] == expected["Date"]  # the row's, filled in as it went


def test_a_notice_prepared_before_a_reschedule_is_built_anew(
        settings: Settings, services: Services, tmp_path: Path,
        smtp: tuple[int, RawInbox], monkeypatch: pytest.MonkeyPatch) -> None:
    """Prepared for the 4th, then moved to the 5th before its claim: the
    published release no longer gives what the notices were built from, so
    each is composed when it goes, and says the 5th."""
    port, inbox = smtp
    release_id = queued(services, tmp_path, letters=2)
    relay = smtp_relay(dataclasses.replace(
        services, clock=FakeClock(SEED_INSTANT - timedelta(seconds=1))), port)
    assert relay.prepare(release_id) == 2
    assert relay.prepare(release_id, SEED_INSTANT + timedelta(days=1)) == 0  # not that one
    queuing = dataclasses.replace(services, clock=FakeClock(datetime(2014, 9, 1, tzinfo=UTC)))
    moved = ReleaseService(queuing, actor="comms").reschedule(
        release_id, publish_on="2014-09-05", at=None, zone=None, reason="moved")
    later = moved.instant
    publish(settings, services, release_id, at=later)
    relay.s = dataclasses.replace(services, clock=FakeClock(later))
    composed: list[str] = []

    def counting(row: OutboxMessage, *args: Any, **kw: Any) -> Message:
        composed.append(row.purpose)
        return compose(row, *args, **kw)

    monkeypatch.setattr(relay_module, "compose", counting)
    assert relay.run_once() == 3
    assert sorted(composed) == ["owner_summary", "published", "published"]
    for message in inbox.messages:
        if str(message["Subject"]).startswith("Published"):
            text = message.get_payload()[0].get_payload(decode=True).decode()  # type: ignore[index,union-attr]
            assert "00:01 BST Friday 5 September 2014" in text
            assert "00:01 BST Thursday 4 September 2014" not in text


def test_prepared_connections_that_the_server_dropped_lose_no_notice(
        settings: Settings, services: Services, tmp_path: Path) -> None:
    """A server that closes connections idle for 0.3 s: the connections
    opened ahead are gone by the instant; every notice still goes, once.
    Past their time, prepared notices and connections are let go."""
    port, inbox = free_port(), RawInbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=port, timeout=0.3)
    controller.start()
    try:
        release_id = queued(services, tmp_path, letters=3)
        clock = FakeClock(SEED_INSTANT - timedelta(seconds=2))
        relay = smtp_relay(dataclasses.replace(services, clock=clock), port, workers=2)
        assert relay.prepare(release_id) == 3
        time.sleep(1.2)  # dropped by the server, checked before use
        publish(settings, services, release_id)
        clock.set(SEED_INSTANT)
        assert relay.run_once() == 4
        assert not relay.keep_alive()  # every prepared notice used: connections closed
        # Prepared for a publication that does not come: kept until their time.
        other = queue_seed(services, write_bundle(tmp_path / "other", letters=1)).id
        clock.set(SEED_INSTANT - timedelta(seconds=1))
        assert relay.prepare(other) == 1
        assert relay.keep_alive()
        clock.set(SEED_INSTANT + relay_module.PREPARED_FOR)
        assert not relay.keep_alive()  # past their time: closed
    finally:
        controller.stop()
    counts = collections.Counter(str(m["Message-ID"]) for m in inbox.messages)
    assert len(counts) == 4 and set(counts.values()) == {1}


def test_a_fast_server_s_notices_are_claimed_and_recorded_a_batch_at_a_time(
        settings: Settings, services: Services, tmp_path: Path,
        smtp: tuple[int, RawInbox], monkeypatch: pytest.MonkeyPatch) -> None:
    """Thirteen notices, one worker, a server quicker than RECORD_WAIT: a
    handful of write transactions, not three a notice (a claim, a re-check
    and a record each), and the audit chain holds one event a notice."""
    port, inbox = smtp
    monkeypatch.setattr(relay_module, "RECORD_WAIT", timedelta(hours=1))  # by count alone
    monkeypatch.setattr(relay_module, "_CLAIM_HOLD", 3600.0)
    release_id = queued(services, tmp_path, letters=12)
    publish(settings, services, release_id)
    relay = smtp_relay(dataclasses.replace(services, clock=FakeClock(SEED_INSTANT)), port,
                       record_batch=8)
    begun: list[str] = []

    def began(connection: Any) -> None:
        begun.append("BEGIN")

    event.listen(services.engine, "begin", began)
    try:
        assert relay.run_once() == 13
    finally:
        event.remove(services.engine, "begin", began)
    # the late copies, then claim 1 | record 1 + claim 8 | record 8 + claim 3 |
    # record 3 + claim the summary | record it; and the release read once, the
    # summary's figures once
    assert len(begun) <= 8, len(begun)
    assert len(inbox.raw) == 13
    with services.sessions() as session:
        sent = session.scalars(select(AuditEvent).where(
            AuditEvent.action == "notice_sent")).all()
        assert len(sent) == 13 and audit.verify(session).ok


def test_prepare_message_matches_what_smtplib_would_send() -> None:
    """The bytes flattened ahead are those smtplib's send_message would
    flatten, the Date filled in as it goes."""
    import smtplib

    message = Message()
    message["From"] = "Press office <press@inspectorate.example>"
    message["To"] = "liaison@force.example"
    message["Message-ID"] = "<a.published.b@embargo.invalid>"
    message["Date"] = "Wed, 03 Sep 2014 23:01:00 +0000"
    message["Subject"] = "Published: a title long enough to be folded by the generator " * 2
    message.set_payload("body\n.line starting with a dot\n")
    prepared = prepare_message(message)
    assert isinstance(prepared, Prepared)
    sent: list[tuple[str, list[str], bytes]] = []

    class Recording(smtplib.SMTP):
        def ehlo_or_helo_if_needed(self) -> None:
            return None

        def sendmail(self, from_addr: str, to_addrs: Any, msg: Any, *a: Any,
                     **kw: Any) -> dict[str, tuple[int, bytes]]:
            sent.append((from_addr, list(to_addrs), msg))
            return {}

    Recording().send_message(message)
    later = datetime(2014, 9, 3, 23, 1, 2, tzinfo=UTC)
    assert sent == [(prepared.sender, list(prepared.recipients),
                     prepared.data(datetime(2014, 9, 3, 23, 1, tzinfo=UTC)))]
    assert prepared.data(later).replace(b"23:01:02", b"23:01:00") == sent[0][2]
    message.replace_header("To", "jöns@force.example")
    assert prepare_message(message) is None  # SMTPUTF8: sent the ordinary way


class SlowRawInbox(RawInbox):
    """Quick to greet, 0.4 s over each message."""

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        await asyncio.sleep(0.4)
        return await super().handle_DATA(server, session, envelope)


def test_a_relay_that_prepared_for_a_slow_server_still_holds_at_most_its_workers_rows(
        settings: Settings, services: Services, tmp_path: Path) -> None:
    """Connections opened ahead say nothing of how long the server takes over
    a message: a relay that has not timed one yet claims one row a worker,
    so a node killed then leaves at most ``workers`` rows to be taken over
    (two nodes, a 2 s server: a fresh node had claimed 32, and the survivor
    needed 18 s to take them all)."""
    port, inbox = free_port(), SlowRawInbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        release_id = queued(services, tmp_path, letters=8)
        clock = FakeClock(SEED_INSTANT - timedelta(seconds=1))
        relay = smtp_relay(dataclasses.replace(services, clock=clock), port, workers=3)
        assert relay.prepare(release_id) == 8
        publish(settings, services, release_id)
        clock.set(SEED_INSTANT)
        held = claims_held_during(services, relay.run_once)
    finally:
        controller.stop()
    assert max(held) == 3 and len(inbox.raw) == 9
