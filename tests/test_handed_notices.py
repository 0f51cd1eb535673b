"""Issue 16, the notices at the instant: the finish inserts its notices
claimed for the node's relay and hands them over as it commits them, so the
relay sends without a claim or a read. Never early: nothing goes before the
commit, nor at all if it fails. Exactly once: a relay that does not take
them leaves claims that lapse, and any relay sends them then. The owner's
summary goes right after the others, saying what became of them, even when
it was built while they were on their way."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import event, select, update

from config.settings import Settings
from jobs import relay as relay_module
from jobs.delivery import DeliveryLoop
from jobs.mail import SmtpMailTransport
from jobs.relay import OutboxRelay
from release import audit
from release.keys import load_private_key
from release.publishing import HandedNotices, Publisher
from release.records import OutboxMessage, Recipient, Release
from release.service import Services
from tests.conftest import SEED_INSTANT, FakeClock, free_port, wait_until, write_bundle
from tests.test_publish import queue_seed

SENDER = "Press office <press@inspectorate.example>"


class Server:
    """An aiosmtpd handler that keeps each message with the time it took it;
    ``refuse`` maps an address to the reply it gets at RCPT (after ``delay``
    seconds), ``check`` runs on each message as it arrives."""

    def __init__(self) -> None:
        self.received: list[tuple[float, bytes]] = []
        self.refuse: dict[str, str] = {}
        self.delay = 0.0
        self.check: Any = None

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: Any) -> str:
        if address in self.refuse:
            await asyncio.sleep(self.delay)
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content = bytes(envelope.content)
        if self.check is not None:
            self.check(content)
        self.received.append((time.time(), content))
        return "250 OK"

    def subjects(self) -> list[str]:
        return [str(message_from_bytes(c)["Subject"]) for _, c in self.received]

    def summary(self) -> str:
        for _, content in self.received:
            message = message_from_bytes(content)
            if str(message["Subject"]).startswith("Release published"):
                part = next(p for p in message.walk() if p.get_content_type() == "text/plain")
                payload = part.get_payload(decode=True)
                assert isinstance(payload, bytes)
                return payload.decode()
        raise AssertionError("no owner's summary")


@pytest.fixture
def smtp() -> Iterator[tuple[int, Server]]:
    port, server = free_port(), Server()
    controller = Controller(server, hostname="127.0.0.1", port=port)
    controller.start()
    yield port, server
    controller.stop()


@pytest.fixture(autouse=True)
def quick_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    """However long a message takes on a loaded machine, the server counts
    as quick (a slow one's notices are given back for any relay: issue 12)."""
    monkeypatch.setattr(relay_module, "_CLAIM_HOLD", 3600.0)


class Taking:
    """A relay's side of ``release.publishing.NoticeTaker``, keeping what is
    handed over (``run``: sending it at once, in a thread)."""

    def __init__(self, relay: OutboxRelay, *, run: bool = False) -> None:
        self.relay = relay
        self.run = run
        self.handed: list[HandedNotices] = []
        self.sent: list[int] = []
        self.threads: list[threading.Thread] = []

    @property
    def lease(self) -> timedelta:
        return self.relay.lease

    def token(self) -> str | None:
        return self.relay.hand_token()

    def most(self) -> int | None:
        return self.relay.hand_most()

    def take(self, notices: HandedNotices) -> None:
        self.handed.append(notices)
        if self.run:
            thread = threading.Thread(
                target=lambda: self.sent.append(self.relay.run_handed(notices)))
            thread.start()
            self.threads.append(thread)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(10)


def relay_at(services: Services, clock: Any, port: int, **kw: Any) -> OutboxRelay:
    def connect() -> SmtpMailTransport:
        return SmtpMailTransport("127.0.0.1", port, security="none", timeout=5)

    kw.setdefault("workers", 3)
    return OutboxRelay(dataclasses.replace(services, clock=clock), connect(), sender=SENDER,
                       worker="relay", make_transport=connect, **kw)


def knows_a_fast_server(relay: OutboxRelay) -> OutboxRelay:
    relay._learn(0.002)  # as after any notice it timed
    return relay


def publish_to(settings: Settings, services: Services, clock: FakeClock, release_id: str,
               taker: Any) -> str:
    publisher = Publisher(dataclasses.replace(services, clock=clock),
                          load_private_key(settings.keys_dir), claimant="n")
    publisher.notices = taker
    return str(publisher.publish(release_id).status)


def published_with_taker(settings: Settings, services: Services, tmp_path: Path, port: int,
                         letters: int) -> tuple[str, FakeClock, OutboxRelay, Taking]:
    """A release of ``letters`` letters published at the seed instant, its
    notices handed to a relay that knows the server is quick (not run)."""
    release_id = queue_seed(services, write_bundle(tmp_path / "bundle", letters=letters)).id
    clock = FakeClock(SEED_INSTANT)
    relay = knows_a_fast_server(relay_at(services, clock, port))
    taking = Taking(relay)
    assert publish_to(settings, services, clock, release_id, taking) == "published"
    return release_id, clock, relay, taking


def outbox(services: Services) -> list[OutboxMessage]:
    with services.sessions() as session:
        rows = list(session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)))
        session.expunge_all()
        return rows


@contextlib.contextmanager
def claims_made(services: Services) -> Iterator[list[str]]:
    """Each statement that claims outbox rows, while in the block."""
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "UPDATE OUTBOX SET CLAIMED_BY" in statement.upper():
            statements.append(statement)

    event.listen(services.engine, "before_cursor_execute", seen)
    try:
        yield statements
    finally:
        event.remove(services.engine, "before_cursor_execute", seen)


@contextlib.contextmanager
def at_the_finish_commit(services: Services, action: Any) -> Iterator[None]:
    """Runs ``action()`` as the first transaction that inserts outbox rows
    (the finish's) commits, while in the block."""
    finishing: list[Any] = []
    done: list[bool] = []

    def inserting(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO OUTBOX"):
            finishing.append(conn)

    def committing(conn: Any) -> None:
        if conn in finishing and not done:
            done.append(True)
            action()

    event.listen(services.engine, "before_cursor_execute", inserting)
    event.listen(services.engine, "commit", committing)
    try:
        yield
    finally:
        event.remove(services.engine, "commit", committing)
        event.remove(services.engine, "before_cursor_execute", inserting)


def test_handed_notices_go_without_a_claim_and_the_summary_says_how_they_went(
        settings: Settings, services: Services, tmp_path: Path,
        smtp: tuple[int, Server]) -> None:
    port, server = smtp
    _, _, relay, taking = published_with_taker(settings, services, tmp_path,
                                               port, letters=5)
    [handed] = taking.handed
    rows = outbox(services)
    assert len(rows) == 6 and all(r.claimed_by == handed.token for r in rows)
    assert [r.id for r in handed.rows] == [r.id for r in rows]
    with claims_made(services) as claims:
        assert relay.run_handed(handed) == 6
    assert not claims  # no claim statement: the rows came claimed
    with claims_made(services) as claims:  # (what run_once does, for comparison)
        relay.run_once()
    assert claims
    assert server.subjects()[-1].startswith("Release published")  # last, after the others
    assert "delivered 5, failed 0 (of 5 liaison officers)" in server.summary()
    assert all(r.delivered_at is not None and r.claim_expires_at is None
               for r in outbox(services))
    with services.sessions() as session:
        assert audit.verify(session).ok


def test_nothing_goes_before_the_finish_commits(
        settings: Settings, services: Services, tmp_path: Path,
        smtp: tuple[int, Server]) -> None:
    """The relay gets the notices while the finish is committing and starts
    at once; the commit is held up 0.3 s. Every message the server takes is
    one whose row another connection can read: committed."""
    port, server = smtp
    release_id = queue_seed(services, write_bundle(tmp_path / "bundle", letters=4)).id
    clock = FakeClock(SEED_INSTANT)
    taking = Taking(knows_a_fast_server(relay_at(services, clock, port)), run=True)
    database = settings.data_dir / "embargo.db"
    unseen: list[str] = []

    def committed(content: bytes) -> None:
        message_id = str(message_from_bytes(content)["Message-ID"])
        try:
            with contextlib.closing(sqlite3.connect(database, timeout=5)) as other:
                found = other.execute("SELECT count(*) FROM outbox WHERE message_id = ?",
                                      (message_id,)).fetchone()
        except sqlite3.Error as exc:
            found = exc
        if found != (1,):
            unseen.append(f"{message_id}: {found}")

    server.check = committed
    held: list[float] = []

    def slow() -> None:
        time.sleep(0.3)
        held.append(time.time())

    with at_the_finish_commit(services, slow):
        assert publish_to(settings, services, clock, release_id, taking) == "published"
        taking.join()
    assert held and len(server.received) == 5 and taking.sent == [5], (
        taking.sent, unseen, [(r.purpose, r.delivered_at, r.last_error) for r in outbox(services)])
    assert not unseen
    assert min(at for at, _ in server.received) >= held[0]


def test_nothing_goes_if_the_finish_does_not_commit(
        settings: Settings, services: Services, tmp_path: Path,
        smtp: tuple[int, Server]) -> None:
    """The finish fails as it commits (after the notices were handed over):
    the relay sends nothing, reads and writes nothing for them; the next
    attempt publishes and its notices go, once."""
    port, server = smtp
    release_id = queue_seed(services, write_bundle(tmp_path / "bundle", letters=3)).id
    clock = FakeClock(SEED_INSTANT)
    relay = knows_a_fast_server(relay_at(services, clock, port))
    taking = Taking(relay, run=True)

    def disk_full() -> None:
        raise RuntimeError("the disk filled at 00:01")

    with at_the_finish_commit(services, disk_full):
        assert publish_to(settings, services, clock, release_id, taking) == "retry"
        taking.join()
    assert taking.sent == [0] and not server.received
    assert [r.purpose for r in outbox(services)] == ["alert"]  # that the attempt failed
    clock.set(SEED_INSTANT + timedelta(seconds=5))
    assert publish_to(settings, services, clock, release_id, taking) == "published"
    taking.join()
    assert taking.sent == [0, 4] and len(server.received) == 4
    assert len({str(message_from_bytes(c)["Message-ID"]) for _, c in server.received}) == 4


def test_a_refused_notice_is_in_the_summary_built_while_it_was_on_its_way(
        settings: Settings, services: Services, tmp_path: Path,
        smtp: tuple[int, Server], monkeypatch: pytest.MonkeyPatch) -> None:
    """The last notice takes 0.5 s to be refused (550) while the other
    workers are done: the summary is built meanwhile as if it went, and is
    not what goes: the summary sent says it failed, and why."""
    port, server = smtp
    release_id = queue_seed(services, write_bundle(tmp_path / "bundle", letters=5)).id
    server.refuse["liaison5@force5.police.example"] = "550 5.1.1 no such user here"
    server.delay = 0.5
    built: set[str] = set()
    speculate = relay_module._Run._speculate

    def watching(run: Any) -> None:
        speculate(run)
        built.update(r for r, b in run.speculation.items() if b is not None)

    monkeypatch.setattr(relay_module._Run, "_speculate", watching)
    clock = FakeClock(SEED_INSTANT)
    relay = knows_a_fast_server(relay_at(services, clock, port))
    taking = Taking(relay)
    assert publish_to(settings, services, clock, release_id, taking) == "published"
    assert relay.run_handed(taking.handed[0]) == 5
    assert built == {release_id}  # built ahead, as if the fifth went
    summary = server.summary()
    assert "delivered 4, failed 1 (of 5 liaison officers)" in summary
    [refused] = [line for line in summary.splitlines() if "liaison5@" in line]
    assert refused.startswith("- Liaison 5 <liaison5@force5.police.example>: ")
    assert refused.endswith("refused the recipient: 550 5.1.1 no such user here")
    assert server.subjects()[-1].startswith("Release published")


def test_a_notice_to_be_retried_puts_the_summary_off_until_it_is_done(
        settings: Settings, services: Services, tmp_path: Path,
        smtp: tuple[int, Server]) -> None:
    """A 451 for one notice: it is retried later, so the summary cannot say
    yet what became of it; it waits (its claim given back), and goes once
    the retry went, saying all were delivered."""
    port, server = smtp
    release_id = queue_seed(services, write_bundle(tmp_path / "bundle", letters=3)).id
    server.refuse["liaison2@force2.police.example"] = "451 4.3.0 try again later"
    clock = FakeClock(SEED_INSTANT)
    relay = knows_a_fast_server(relay_at(services, clock, port))
    taking = Taking(relay)
    assert publish_to(settings, services, clock, release_id, taking) == "published"
    assert relay.run_handed(taking.handed[0]) == 2
    assert not any(s.startswith("Release published") for s in server.subjects())
    summary_row = next(r for r in outbox(services) if r.purpose == "owner_summary")
    assert summary_row.delivered_at is None and summary_row.claim_expires_at is None
    del server.refuse["liaison2@force2.police.example"]
    clock.set(SEED_INSTANT + timedelta(minutes=10))
    assert relay.run_once() == 3  # the retried notice, the alert that it was delayed, the summary
    assert server.subjects()[-1].startswith("Release published")
    assert "delivered 3, failed 0 (of 3 liaison officers)" in server.summary()


def test_notices_a_relay_did_not_take_go_once_their_claims_lapse(
        settings: Settings, services: Services, tmp_path: Path,
        smtp: tuple[int, Server]) -> None:
    """The node dies as it commits (its relay never runs them): another
    relay leaves the claimed rows alone while the claim holds, then sends
    every one of them, once."""
    port, server = smtp
    release_id = queue_seed(services, write_bundle(tmp_path / "bundle", letters=3)).id
    clock = FakeClock(SEED_INSTANT)
    dead = knows_a_fast_server(relay_at(services, clock, port))
    assert publish_to(settings, services, clock, release_id, Taking(dead)) == "published"
    other = relay_at(services, clock, port)
    other.worker = "other"
    assert other.run_once() == 0 and not server.received
    clock.set(SEED_INSTANT + dead.lease + timedelta(milliseconds=1))
    assert other.run_once() == 4
    assert len(server.received) == 4
    assert other.run_once() == 0 and len(server.received) == 4


def test_a_relay_that_has_not_timed_the_server_takes_one_notice_a_worker(
        settings: Settings, services: Services, tmp_path: Path,
        smtp: tuple[int, Server]) -> None:
    """Issue 12's slow servers: a relay that has not seen how long the server
    takes over a message holds one row a worker, handed over or claimed; the
    rest, and the summary, are left to any relay."""
    port, server = smtp
    release_id = queue_seed(services, write_bundle(tmp_path / "bundle", letters=5)).id
    clock = FakeClock(SEED_INSTANT)
    relay = relay_at(services, clock, port, workers=2)
    taking = Taking(relay)
    assert publish_to(settings, services, clock, release_id, taking) == "published"
    claimed = [r for r in outbox(services) if r.claimed_by is not None]
    assert [r.purpose for r in claimed] == ["published", "published"]
    assert [r.id for r in taking.handed[0].rows] == [r.id for r in claimed]
    assert relay.run_handed(taking.handed[0]) == 2
    assert relay.hand_most() is None  # it has timed a quick one now
    assert relay.run_once() == 4 and len(server.received) == 6
    assert server.subjects()[-1].startswith("Release published")


def test_a_node_whose_clock_is_not_trusted_takes_no_notices(
        settings: Settings, services: Services, tmp_path: Path,
        smtp: tuple[int, Server]) -> None:
    port, _ = smtp
    trusted = [False]
    loop = DeliveryLoop(relay_at(services, FakeClock(SEED_INSTANT), port),
                        stop=threading.Event(), guard=lambda: trusted[0], poll_seconds=1)
    release_id = queue_seed(services, write_bundle(tmp_path / "bundle", letters=2)).id
    assert publish_to(settings, services, FakeClock(SEED_INSTANT), release_id,
                      loop) == "published"
    assert all(r.claimed_by is None for r in outbox(services))
    trusted[0] = True
    assert loop.token() is not None


def test_a_notice_built_ahead_from_other_facts_is_composed_anew(
        settings: Settings, services: Services, tmp_path: Path,
        smtp: tuple[int, Server], monkeypatch: pytest.MonkeyPatch) -> None:
    """Built ahead for "Liaison 1", who is "Inspector Jones" by the time
    the release is claimed for publication: that notice is composed from
    what was published, the others go as built."""
    port, server = smtp
    release_id = queue_seed(services, write_bundle(tmp_path / "bundle", letters=3)).id
    clock = FakeClock(SEED_INSTANT - timedelta(seconds=1))
    relay = knows_a_fast_server(relay_at(services, clock, port))
    assert relay.prepare(release_id, SEED_INSTANT) == 3
    with services.sessions.begin() as session:
        session.execute(update(Recipient).where(Recipient.name == "Liaison 1")
                        .values(name="Inspector Jones"))
    composed: list[str] = []
    compose = relay_module.compose

    def counting(row: OutboxMessage, *args: Any, **kw: Any) -> Any:
        composed.append(row.to_addr)
        return compose(row, *args, **kw)

    clock.set(SEED_INSTANT)
    taking = Taking(relay)
    assert publish_to(settings, services, clock, release_id, taking) == "published"
    monkeypatch.setattr(relay_module, "compose", counting)
    assert relay.run_handed(taking.handed[0]) == 4
    assert sorted(composed) == ["liaison1@force1.police.example", "press@inspectorate.example"]
    bodies = [message_from_bytes(c) for _, c in server.received]
    jones = next(m for m in bodies if m["To"] == "liaison1@force1.police.example")
    text = next(p for p in jones.walk() if p.get_content_type() == "text/plain")
    payload = text.get_payload(decode=True)
    assert isinstance(payload, bytes) and b"Dear Inspector Jones," in payload


def test_a_running_scheduler_hands_its_relay_the_notices_as_it_publishes(
        settings: Settings, services: Services, tmp_path: Path,
        smtp: tuple[int, Server], monkeypatch: pytest.MonkeyPatch) -> None:
    """Real time, a release due 2 s ahead, a scheduler with its relay: the
    notices go in one handed run, none before the release was published
    (by the server's receive times), the summary last."""
    from datetime import UTC, datetime

    from jobs.scheduler import EmbargoScheduler
    from release.manifest import load_manifest
    from release.service import ReleaseService

    port, server = smtp
    handed: list[int] = []
    run_handed = OutboxRelay.run_handed

    def counting(relay: OutboxRelay, notices: HandedNotices) -> int:
        handed.append(len(notices.rows))
        return run_handed(relay, notices)

    monkeypatch.setattr(OutboxRelay, "run_handed", counting)
    instant = (datetime.now(UTC) + timedelta(seconds=2)).replace(microsecond=0)
    manifest = write_bundle(tmp_path / "b", letters=4, publish_on=instant.isoformat())
    release = ReleaseService(services, actor="t").queue(load_manifest(manifest))
    relay = knows_a_fast_server(relay_at(services, services.clock, port))
    publisher = Publisher(services, load_private_key(settings.keys_dir), claimant="node")
    scheduler = EmbargoScheduler(services, publisher, relay, poll_seconds=0.05)
    scheduler.start()
    try:
        deadline = time.time() + 15
        while time.time() < deadline and len(server.received) < 5:
            time.sleep(0.01)
    finally:
        scheduler.shutdown()
    assert handed == [5] and len(server.received) == 5
    assert min(at for at, _ in server.received) >= instant.timestamp()
    assert server.subjects()[-1].startswith("Release published")
    rows = outbox(services)
    assert all(r.delivered_at is not None for r in rows), [r.purpose for r in rows]
    with services.sessions() as session:
        published = session.get(Release, release.id)
    assert published is not None and published.state == "published"


class SaysNoOnce:
    """A commit whose first waiter is told it did not happen, and the later
    ones that it did (as if it settled just after the first gave up)."""

    def __init__(self) -> None:
        self.asked = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.asked += 1
        return self.asked > 1


def test_a_run_decides_once_whether_the_commit_happened(
        settings: Settings, services: Services, tmp_path: Path,
        smtp: tuple[int, Server]) -> None:
    """(The review's case) One thread of the run gives up waiting for the
    commit, the others would see it: none of them sends, nothing is
    recorded, and another relay sends every notice, once, when the claims
    have lapsed."""
    port, server = smtp
    _, clock, relay, taking = published_with_taker(settings, services, tmp_path,
                                                   port, letters=4)
    handed = dataclasses.replace(taking.handed[0], committed=SaysNoOnce())
    assert relay.run_handed(handed) == 0 and not server.received
    assert all(r.delivered_at is None for r in outbox(services))
    other = relay_at(services, clock, port)
    other.worker = "other"
    clock.set(SEED_INSTANT + relay.lease + timedelta(milliseconds=1))
    assert other.run_once() == 5 and len(server.received) == 5


def test_a_handed_run_that_starts_late_checks_each_claim(
        settings: Settings, services: Services, tmp_path: Path,
        smtp: tuple[int, Server]) -> None:
    """The relay was busy: its handed run starts after the claims lapsed, and
    meanwhile another relay took one notice. That one is left to it; the
    others go, each claim checked (and renewed) before its notice."""
    port, server = smtp
    _, clock, relay, taking = published_with_taker(settings, services, tmp_path,
                                                   port, letters=3)
    first = taking.handed[0].rows[0]
    with services.sessions.begin() as session:  # taken by another relay after the lapse
        session.execute(update(OutboxMessage).where(OutboxMessage.id == first.id).values(
            claimed_by="other#1", claim_expires_at=SEED_INSTANT + timedelta(seconds=30)))
    clock.set(SEED_INSTANT + relay.lease + timedelta(seconds=1))
    assert relay.run_handed(taking.handed[0]) == 2  # the other two notices; not the summary
    assert {str(message_from_bytes(c)["To"]) for _, c in server.received} == {
        "liaison2@force2.police.example", "liaison3@force3.police.example"}
    rows = {r.id: r for r in outbox(services)}
    assert rows[first.id].delivered_at is None and rows[first.id].claimed_by == "other#1"


def test_a_busy_relay_takes_no_notices(
        settings: Settings, services: Services, tmp_path: Path,
        smtp: tuple[int, Server]) -> None:
    """While its relay holds other notices to send (here: a server that takes
    0.5 s over each), a handed run would wait: the notices of a publication
    are left to any relay's claim instead. A run that found nothing to send
    does not count."""
    port, server = smtp
    server.delay = 0.5
    server.refuse["liaison1@force1.police.example"] = "451 4.3.0 slowly, later"
    relay = relay_at(services, FakeClock(SEED_INSTANT), port, workers=1)
    loop = DeliveryLoop(relay, stop=threading.Event(), guard=lambda: True, poll_seconds=1)
    assert relay.run_once() == 0 and loop.token() is not None  # nothing to send
    release_id = queue_seed(services, write_bundle(tmp_path / "bundle", letters=2)).id
    assert publish_to(settings, services, FakeClock(SEED_INSTANT), release_id,
                      None) == "published"
    runner = threading.Thread(target=relay.run_once)
    runner.start()
    try:
        assert wait_until(relay.sending, 5)
        assert loop.token() is None
    finally:
        runner.join(10)
    assert not relay.sending() and loop.token() is not None


def test_no_collection_pause_between_the_last_wait_and_the_commit(
        settings: Settings, services: Services, tmp_path: Path,
        smtp: tuple[int, Server]) -> None:
    """A full collection in a node took ~50 ms: the collector is off from the
    wait for the instant until the finish has committed, and on again after,
    a failed attempt too."""
    import gc

    port, _ = smtp
    seen: list[bool] = []

    class Watching(Taking):
        def take(self, notices: HandedNotices) -> None:
            seen.append(gc.isenabled())  # inside the finish transaction
            super().take(notices)

    release_id = queue_seed(services, write_bundle(tmp_path / "bundle", letters=2)).id
    clock = FakeClock(SEED_INSTANT)
    relay = knows_a_fast_server(relay_at(services, clock, port))
    assert gc.isenabled()
    with at_the_finish_commit(services, lambda: seen.append(gc.isenabled())):
        assert publish_to(settings, services, clock, release_id, Watching(relay)) == "published"
    assert seen == [False, False] and gc.isenabled()

    def disk_full() -> None:
        raise RuntimeError("the disk filled at 00:01")

    other = queue_seed(services, write_bundle(tmp_path / "second", letters=1,
                                              publish_on="2014-09-04")).id
    with at_the_finish_commit(services, disk_full):
        assert publish_to(settings, services, clock, other, Watching(relay)) == "retry"
    assert gc.isenabled()
