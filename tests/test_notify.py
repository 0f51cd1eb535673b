"""Notices through the outbox: a real SMTP server (aiosmtpd) on a free
loopback port, first down, then up."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import select

from config.settings import Settings
from jobs.mail import FileMailTransport, SmtpMailTransport
from jobs.relay import OutboxRelay
from release import audit
from release.keys import load_private_key
from release.publishing import Publisher
from release.records import AuditEvent, OutboxMessage
from release.service import Services
from tests.conftest import SEED_INSTANT, FakeClock, Inbox, free_port, write_bundle
from tests.test_publish import queue_seed


@pytest.fixture
def smtp_port() -> int:
    return free_port()


@pytest.fixture
def inbox() -> Inbox:
    return Inbox()


def start_server(port: int, inbox: Inbox) -> Controller:
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    return controller


@pytest.fixture
def published(settings: Settings, services: Services, bundle: Path) -> Iterator[Services]:
    """The seed release, published at its instant; the clock stays there."""
    clock = FakeClock(SEED_INSTANT)
    at_instant = dataclasses.replace(services, clock=clock)
    release = queue_seed(services, bundle)
    publisher = Publisher(at_instant, load_private_key(settings.keys_dir), claimant="n")
    assert publisher.publish(release.id).status == "published"
    yield at_instant


def test_smtp_down_then_up_delivers_each_notice_once(published: Services, smtp_port: int,
                                                     inbox: Inbox) -> None:
    clock = published.clock
    assert isinstance(clock, FakeClock)
    relay = OutboxRelay(published, SmtpMailTransport("127.0.0.1", smtp_port, security="none",
                                                     timeout=2),
                        sender="Press office <press@inspectorate.example>", worker="relay")
    assert relay.run_once() == 0  # nothing listening
    with published.sessions() as session:
        rows = list(session.scalars(select(OutboxMessage).where(
            OutboxMessage.purpose == "published")))
        summary = session.scalars(select(OutboxMessage).where(
            OutboxMessage.purpose == "owner_summary")).one()
        alert = session.scalars(select(OutboxMessage).where(
            OutboxMessage.purpose == "alert")).one()  # the first failure, told once
    assert len(rows) == 3
    assert all(r.attempts == 1 and r.delivered_at is None and r.last_error for r in rows)
    assert all("cannot be reached" in (r.last_error or "") for r in rows)
    assert summary.attempts == 0  # it waits for the notices it reports on
    assert alert.to_addr == "press@inspectorate.example" and alert.attempts == 1
    # Still down, and the backoff has not passed: nothing is tried.
    assert relay.run_once() == 0
    controller = start_server(smtp_port, inbox)
    try:
        assert relay.run_once() == 0  # backoff still running
        clock.set(SEED_INSTANT + timedelta(seconds=2))
        assert relay.run_once() == 5  # three notices, then the summary; the alert
        assert relay.run_once() == 0
        clock.set(SEED_INSTANT + timedelta(hours=1))
        assert relay.run_once() == 0
    finally:
        controller.stop()
    ids = [m["Message-ID"] for m in inbox.messages]
    assert len(ids) == 5 and len(set(ids)) == 5
    with published.sessions() as session:
        rows = list(session.scalars(select(OutboxMessage)))
    assert sorted(ids) == sorted(r.message_id for r in rows)
    assert all(r.delivered_at is not None and r.delivered_to for r in rows)
    officer = next(m for m in inbox.messages if m["To"] == "liaison2@force2.police.example")
    assert officer["Subject"] == "Published: Core business: a test inspection"
    text = officer.get_payload()[0].get_payload(decode=True).decode()  # type: ignore[index,union-attr]
    assert "00:01 BST Thursday 4 September 2014" in text
    assert "force-2.txt" in text and "national-report.txt" in text
    assert "force-1.txt" not in text  # only the officer's own organisation's letter
    html = officer.get_payload()[1]  # type: ignore[index]
    assert html.get_content_type() == "text/html"


def test_message_id_is_stable_across_retries(published: Services, smtp_port: int,
                                             inbox: Inbox) -> None:
    """A retry after a lost acknowledgement re-sends under the same id."""
    controller = start_server(smtp_port, inbox)
    try:
        relay = OutboxRelay(published, SmtpMailTransport("127.0.0.1", smtp_port,
                                                         security="none"),
                            sender="e@x.example", worker="relay")
        assert relay.run_once() == 4
        first = sorted(m["Message-ID"] for m in inbox.messages)
        with published.sessions() as session, session.begin():  # forget delivery
            for row in session.scalars(select(OutboxMessage)):
                row.delivered_at = None
        assert relay.run_once() == 4
    finally:
        controller.stop()
    second = sorted(m["Message-ID"] for m in inbox.messages[4:])
    assert first == second


def test_relay_gives_up_after_give_up_after(published: Services, smtp_port: int) -> None:
    clock = published.clock
    assert isinstance(clock, FakeClock)
    relay = OutboxRelay(published, SmtpMailTransport("127.0.0.1", smtp_port, security="none",
                                                     timeout=1),
                        sender="e@x.example", worker="relay",
                        give_up_after=timedelta(minutes=10))
    relay.run_once()
    clock.set(clock.now() + timedelta(minutes=10) - timedelta(microseconds=1))
    relay.run_once()  # one microsecond short: tried again, not given up
    with published.sessions() as session, session.begin():
        rows = list(session.scalars(select(OutboxMessage).where(
            OutboxMessage.purpose == "published")))
        for row in rows:  # the next attempt exactly at the limit
            row.next_attempt_at = SEED_INSTANT + timedelta(minutes=10)
    assert len(rows) == 3
    assert all(r.given_up_at is None and r.attempts == 2 for r in rows)
    clock.set(SEED_INSTANT + timedelta(minutes=10))
    relay.run_once()
    with published.sessions() as session:
        rows = list(session.scalars(select(OutboxMessage).where(
            OutboxMessage.purpose == "published")))
        given_up = session.scalars(select(AuditEvent).where(
            AuditEvent.action == "notice_given_up")).all()
    assert all(r.given_up_at is not None and r.failed_at is None and r.attempts == 3
               for r in rows)
    assert {json.loads(e.details)["to"] for e in given_up} >= {r.to_addr for r in rows}
    clock.set(clock.now() + timedelta(days=1))
    assert relay.run_once() == 0


def test_two_relays_do_not_send_the_same_notice(published: Services, smtp_port: int,
                                                inbox: Inbox) -> None:
    controller = start_server(smtp_port, inbox)
    try:
        relays = [OutboxRelay(published, SmtpMailTransport("127.0.0.1", smtp_port,
                                                           security="none"),
                              sender="e@x.example", worker=f"r{i}") for i in range(3)]
        counts: list[int] = []
        threads = [threading.Thread(target=lambda r=r: counts.append(r.run_once()))
                   for r in relays]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        controller.stop()
    assert sum(counts) == 4
    assert len(inbox.messages) == 4




@pytest.fixture
def many(settings: Settings, services: Services, tmp_path: Path) -> Services:
    """A release to 12 officers, published at its instant (13 notices with
    the owner's summary); the clock stays there."""
    at_instant = dataclasses.replace(services, clock=FakeClock(SEED_INSTANT))
    release = queue_seed(services, write_bundle(tmp_path / "twelve", letters=12))
    publisher = Publisher(at_instant, load_private_key(settings.keys_dir), claimant="n")
    assert publisher.publish(release.id).status == "published"
    return at_instant


class Peers(Inbox):
    """An inbox that also notes which connection each message came over."""

    def __init__(self) -> None:
        super().__init__()
        self.peers: list[object] = []

    async def handle_DATA(self, server: object, session: Any, envelope: Any) -> str:
        self.peers.append(session.peer)
        return await super().handle_DATA(server, session, envelope)


def test_workers_send_each_notice_once_over_their_own_connections(
        many: Services, smtp_port: int) -> None:
    inbox = Peers()
    controller = start_server(smtp_port, inbox)

    class Unhurried(SmtpMailTransport):
        """20 ms a message: the batch (260 ms for one worker alone) outlasts
        the other workers' start-up even on a loaded machine."""

        def send(self, message: Message) -> str:
            time.sleep(0.02)
            return super().send(message)

    def connect() -> SmtpMailTransport:
        return Unhurried("127.0.0.1", smtp_port, security="none")

    try:
        relay = OutboxRelay(many, connect(), sender="e@x.example", worker="relay",
                            workers=4, make_transport=connect)
        assert relay.run_once() == 13
        assert relay.run_once() == 0
    finally:
        controller.stop()
    ids = [m["Message-ID"] for m in inbox.messages]
    assert len(ids) == 13 and len(set(ids)) == 13
    assert len(set(inbox.peers)) > 1  # the workers really did share the work
    with many.sessions() as session:
        rows = list(session.scalars(select(OutboxMessage)))
        report = audit.verify(session)
        sent = session.scalars(select(AuditEvent).where(
            AuditEvent.action == "notice_sent")).all()
    assert sorted(ids) == sorted(r.message_id for r in rows)
    assert all(r.delivered_at is not None and r.attempts == 1 for r in rows)
    assert report.ok and len(sent) == 13


def test_a_worker_that_breaks_does_not_stop_the_others_and_its_rows_are_retried(
        many: Services, settings: Settings) -> None:
    """An unexpected error while sending is recorded against that notice
    (its class and words, an attempt counted) and retried after the backoff;
    the other workers carry on, and nothing goes twice."""
    sent: list[str] = []
    lock = threading.Lock()
    broken = {"on": True}

    class Breaks(FileMailTransport):
        def send(self, message: Message) -> str:
            with lock:  # five go, then every send fails
                if broken["on"] and len(sent) >= 5:
                    raise RuntimeError("a bug in the transport")
                sent.append(str(message["Message-ID"]))
            return super().send(message)

    def breaks() -> Breaks:
        return Breaks(settings.outbox_dir)

    relay = OutboxRelay(many, breaks(), sender="e@x.example", worker="relay", workers=3,
                        make_transport=breaks)
    assert relay.run_once() == 5
    with many.sessions() as session:
        failed = list(session.scalars(select(OutboxMessage).where(
            OutboxMessage.delivered_at.is_(None), OutboxMessage.purpose == "published")))
    assert len(failed) == 7  # the owner's summary waits for them
    assert all(r.attempts == 1 and r.last_error == "RuntimeError: a bug in the transport"
               and r.given_up_at is None and r.claim_expires_at is None for r in failed)
    clock = many.clock
    assert isinstance(clock, FakeClock)
    assert relay.run_once() == 0  # the backoff has not passed
    broken["on"] = False
    clock.set(SEED_INSTANT + timedelta(seconds=1))
    assert relay.run_once() >= 8  # and the alert about the delay
    names = [p.name for p in settings.outbox_dir.glob("*.eml") if ".alert-" not in p.name]
    assert len(names) == 13 and len(sent) == len(set(sent))


def test_an_unknown_purpose_raises_instead_of_composing_a_failure_notice(
        published: Services) -> None:
    from release.notices import compose
    from release.records import Release

    with published.sessions() as session:
        row = session.scalars(select(OutboxMessage).where(
            OutboxMessage.purpose == "owner_summary")).first() or session.scalars(
            select(OutboxMessage)).first()
        assert row is not None
        release = session.get(Release, row.release_id)
        assert release is not None
        release.documents  # noqa: B018
        release.recipients  # noqa: B018
        session.expunge_all()
    bogus = OutboxMessage(message_id="<x@embargo.invalid>", release_id=row.release_id,
                          recipient_id=None, purpose="reminder", to_addr="a@example.org",
                          created_at=row.created_at)
    with pytest.raises(ValueError, match="reminder"):
        compose(bogus, release, None, sender="s@example.org")
    # Every known purpose still composes (an owner notice needs no recipient).
    owner = OutboxMessage(message_id="<y@embargo.invalid>", release_id=row.release_id,
                          recipient_id=None, purpose="owner_failure", to_addr="a@example.org",
                          created_at=row.created_at)
    assert str(compose(owner, release, None, sender="s@example.org")["Subject"]).startswith(
        "FAILED:")


def test_a_stored_unknown_purpose_is_an_error_when_read(published: Services) -> None:
    from sqlalchemy import text

    with published.engine.begin() as connection:
        connection.execute(text("UPDATE outbox SET purpose = 'reminder' WHERE id = "
                                "(SELECT min(id) FROM outbox)"))
    with published.sessions() as session, pytest.raises(ValueError, match="reminder"):
        list(session.scalars(select(OutboxMessage)))
