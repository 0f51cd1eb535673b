"""Exactly once across relays (issue 12, defects 1 and 2): per-row claims,
renewed while a slow mail server takes its time, owned by the relay that
records the delivery; a dead node's claims void within the lease. Runs on
PostgreSQL, with a real aiosmtpd server that takes its time per message."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import select, update

from config.settings import Settings, load_settings
from jobs.app import build_services
from jobs.mail import SmtpMailTransport
from jobs.relay import OutboxRelay
from release import keys as keyfile
from release.clock import Clock
from release.keys import load_private_key
from release.manifest import load_manifest
from release.publishing import Publisher
from release.records import AuditEvent, Node, OutboxMessage
from release.service import ReleaseService, Services
from storage.db import server_time
from tests.conftest import (
    SEED_INSTANT,
    FakeClock,
    Inbox,
    claims_held_during,
    free_port,
    write_bundle,
)

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.postgres


class SlowInbox(Inbox):
    """Takes ``delay`` seconds over each message before it says 250."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        await asyncio.sleep(self.delay)
        return await super().handle_DATA(server, session, envelope)


class FastClock(Clock):
    """Real time, running ``rate`` times faster from ``start``: a claim that
    once lasted a fixed 60 s lapses in a couple of real seconds."""

    def __init__(self, start: datetime, rate: float) -> None:
        self.start, self.rate, self.t0 = start, rate, time.monotonic()

    def now(self) -> datetime:
        return self.start + timedelta(seconds=(time.monotonic() - self.t0) * self.rate)


@pytest.fixture
def pg_settings(data_dir: Path, pg_url: str) -> Settings:
    settings = load_settings(environ={}, overrides={"data_dir": str(data_dir),
                                                    "database.url": pg_url})
    keyfile.init_keys(settings.keys_dir)
    return settings


@pytest.fixture
def pg_services(pg_settings: Settings) -> Iterator[Services]:
    services = build_services(pg_settings, migrate_schema=True)
    yield services
    services.engine.dispose()


def published(settings: Settings, services: Services, tmp_path: Path, letters: int) -> str:
    queuing = dataclasses.replace(services, clock=FakeClock(datetime(2014, 9, 1, tzinfo=UTC)))
    release = ReleaseService(queuing, actor="comms").queue(
        load_manifest(write_bundle(tmp_path / "b", letters=letters)))
    at_instant = dataclasses.replace(services, clock=FakeClock(SEED_INSTANT))
    publisher = Publisher(at_instant, load_private_key(settings.keys_dir), claimant="n")
    assert publisher.publish(release.id).status == "published"
    return release.id


def per_recipient(inbox: Inbox) -> collections.Counter[str]:
    return collections.Counter(str(m["To"]) for m in inbox.messages)


@pytest.mark.parametrize("relays", [2, 3])
def test_relays_with_a_slow_server_deliver_each_notice_once(
        pg_settings: Settings, pg_services: Services, tmp_path: Path, relays: int) -> None:
    """Each message takes 1.5 s at the server, i.e. 45 s of the relays'
    clock: a claim that is not renewed lapses while its message is on its
    way, and another relay would send it again."""
    published(pg_settings, pg_services, tmp_path, letters=11)  # 12 notices
    fast = dataclasses.replace(pg_services, clock=FastClock(SEED_INSTANT, rate=30))
    port = free_port()
    inbox = SlowInbox(1.5)
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()

    def connect() -> SmtpMailTransport:
        return SmtpMailTransport("127.0.0.1", port, security="none", timeout=30)

    stop = threading.Event()

    def loop(relay: OutboxRelay) -> None:
        while not stop.is_set():
            relay.run_once()
            time.sleep(0.05)

    try:
        # The lease in the relays' clock: 90 s = 3 real seconds, renewed each real second.
        group = [OutboxRelay(fast, connect(), sender="e@x.example", worker=f"r{i}",
                             workers=4, make_transport=connect,
                             lease=timedelta(seconds=90)) for i in range(relays)]
        threads = [threading.Thread(target=loop, args=(r,)) for r in group]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and len(inbox.messages) < 12:
            time.sleep(0.1)
        time.sleep(3)  # anything sent twice would arrive by now
        stop.set()
        for t in threads:
            t.join()
    finally:
        controller.stop()
    counts = per_recipient(inbox)
    assert len(counts) == 12 and set(counts.values()) == {1}, counts
    with pg_services.sessions() as session:
        sent = session.scalars(select(AuditEvent).where(
            AuditEvent.action == "notice_sent")).all()
        rows = list(session.scalars(select(OutboxMessage)))
    assert len(sent) == 12 and all(r.delivered_at is not None for r in rows)


def test_claims_of_a_node_whose_heartbeat_is_older_than_the_lease_are_void(
        pg_settings: Settings, pg_services: Services, tmp_path: Path) -> None:
    published(pg_settings, pg_services, tmp_path, letters=3)
    services = dataclasses.replace(pg_services, clock=FakeClock(SEED_INSTANT))
    lease = timedelta(seconds=3)
    with services.sessions() as session, session.begin():
        now = server_time(session.connection())
        session.add(Node(name="dead", started_at=now, heartbeat_at=now, clock_ok=True))
        # The dead node's relay held every row, for an hour of its clock.
        session.execute(update(OutboxMessage).values(
            claimed_by="dead#0000", claim_expires_at=SEED_INSTANT + timedelta(hours=1)))
    port = free_port()
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        relay = OutboxRelay(services, SmtpMailTransport("127.0.0.1", port, security="none"),
                            sender="e@x.example", worker="alive", lease=lease)
        assert relay.run_once() == 0  # its heartbeat is fresh: the claims stand
        with services.sessions() as session, session.begin():
            now = server_time(session.connection())
            session.execute(update(Node).where(Node.name == "dead").values(
                heartbeat_at=now - lease + timedelta(milliseconds=500)))
        assert relay.run_once() == 0  # silent for less than the lease
        with services.sessions() as session, session.begin():
            now = server_time(session.connection())
            session.execute(update(Node).where(Node.name == "dead").values(
                heartbeat_at=now - lease - timedelta(microseconds=1)))
        assert relay.run_once() == 4  # void at once, not when the claim runs out
    finally:
        controller.stop()
    assert set(per_recipient(inbox).values()) == {1}


def test_a_relay_killed_mid_batch_is_taken_over_within_the_lease(
        pg_settings: Settings, pg_services: Services, tmp_path: Path) -> None:
    """A relay in its own process, heartbeating like an ``embargo run`` node,
    SIGKILLed while a slow server takes its messages: the rest go within
    the lease of its last heartbeat, and only what it was handing over at
    the time may arrive twice."""
    published(pg_settings, pg_services, tmp_path, letters=11)  # 12 notices
    port = free_port()
    inbox = SlowInbox(1.0)
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-m", "tests.relay_child",
                              str(pg_settings.data_dir), pg_settings.database_url, str(port)],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(inbox.messages) < 2:
            time.sleep(0.02)
        assert len(inbox.messages) >= 2
        child.send_signal(signal.SIGKILL)
        child.wait()
        killed = time.monotonic()
        before = len(inbox.messages)
        relay = OutboxRelay(pg_services, SmtpMailTransport("127.0.0.1", port,
                                                           security="none", timeout=30),
                            sender="e@x.example", worker="successor", workers=4,
                            make_transport=lambda: SmtpMailTransport(
                                "127.0.0.1", port, security="none", timeout=30),
                            lease=timedelta(seconds=3))
        took_over = None
        while time.monotonic() < killed + 30:
            if relay.run_once() and took_over is None:
                took_over = time.monotonic() - killed
            with pg_services.sessions() as session:
                left = session.scalars(select(OutboxMessage).where(
                    OutboxMessage.delivered_at.is_(None))).all()
            if not left:
                break
            time.sleep(0.1)
    finally:
        if child.poll() is None:
            child.kill()
        controller.stop()
    assert took_over is not None and took_over < 3 + 1 + 2, took_over  # lease + beat + send
    counts = per_recipient(inbox)
    assert len(counts) == 12
    twice = sum(c - 1 for c in counts.values())
    assert twice <= 4 and max(counts.values()) <= 2  # at most what was in flight
    assert before >= 2


def test_a_relay_holds_at_most_its_workers_rows(
        pg_settings: Settings, pg_services: Services, tmp_path: Path) -> None:
    published(pg_settings, pg_services, tmp_path, letters=11)
    services = dataclasses.replace(pg_services, clock=FakeClock(SEED_INSTANT))
    port = free_port()
    inbox = SlowInbox(0.5)
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()

    def connect() -> SmtpMailTransport:
        return SmtpMailTransport("127.0.0.1", port, security="none", timeout=30)

    relay = OutboxRelay(services, connect(), sender="e@x.example", worker="r", workers=3,
                        make_transport=connect)
    try:
        held = claims_held_during(services, relay.run_once)
    finally:
        controller.stop()
    assert max(held) == 3 and len(inbox.messages) == 12
