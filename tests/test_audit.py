"""The audit chain: an edit, a deletion or a reordering breaks it at the
first event it touches, and concurrent appends still make one chain."""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, text

from config.settings import Settings
from release import audit
from release.manifest import ReleaseSpec, load_manifest
from release.records import AuditEvent, AuditHead, Base
from release.service import ReleaseService, Services
from storage.db import make_engine, session_factory, transaction
from tests.conftest import FakeClock, write_bundle

T0 = datetime(2014, 9, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
def chain(services: Services, tmp_path: Path) -> ReleaseService:
    """Five events from real actions: three queued, one rescheduled, one
    cancelled."""
    clock = FakeClock(T0)
    svc = ReleaseService(dataclasses.replace(services, clock=clock), actor="comms@test")
    ids = []
    for n in range(3):
        clock.set(T0 + timedelta(minutes=n))
        manifest = write_bundle(tmp_path / f"b{n}", letters=1)
        ids.append(svc.queue(load_manifest(manifest)).id)
    clock.set(T0 + timedelta(minutes=10))
    svc.reschedule(ids[0], publish_on="2014-09-11", at=None, zone=None)
    clock.set(T0 + timedelta(minutes=11))
    svc.cancel(ids[1], reason="withdrawn")
    report = svc.verify_audit()
    assert (report.ok, report.events, report.first_bad, report.problem) == (True, 5, None, None)
    return svc


def sql(engine: Engine, *statements: str) -> None:
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))


def rehash(engine: Engine, seq: int) -> None:
    """What a careful forger does: recompute the edited event's own hash."""
    with transaction(session_factory(engine)) as session:
        event = session.get(AuditEvent, seq)
        assert event is not None
        event.hash = audit._digest(event.seq, event.at, event.actor, event.action,
                                   event.release_id, event.details, event.prev_hash)


def _edit_details(engine: Engine) -> None:
    sql(engine, "UPDATE audit_events SET details = '{\"reason\":\"routine\"}' WHERE seq = 5")


def _edit_actor(engine: Engine) -> None:
    sql(engine, "UPDATE audit_events SET actor = 'someone-else' WHERE seq = 2")


def _edit_time(engine: Engine) -> None:
    sql(engine, "UPDATE audit_events SET at = '2014-09-01 08:00:00.000000' WHERE seq = 1")


def _edit_action(engine: Engine) -> None:
    sql(engine, "UPDATE audit_events SET action = 'release_published' WHERE seq = 3")


def _edit_and_rehash(engine: Engine) -> None:
    sql(engine, "UPDATE audit_events SET details = '{}' WHERE seq = 3")
    rehash(engine, 3)


def _delete_middle(engine: Engine) -> None:
    sql(engine, "DELETE FROM audit_events WHERE seq = 3")


def _delete_and_renumber(engine: Engine) -> None:
    sql(engine, "DELETE FROM audit_events WHERE seq = 3",
        "UPDATE audit_events SET seq = seq - 1 WHERE seq > 3",
        "UPDATE audit_head SET seq = 4")


def _swap(engine: Engine) -> None:
    sql(engine, "UPDATE audit_events SET seq = 100 WHERE seq = 2",
        "UPDATE audit_events SET seq = 2 WHERE seq = 3",
        "UPDATE audit_events SET seq = 3 WHERE seq = 100")


def _delete_last(engine: Engine) -> None:
    sql(engine, "DELETE FROM audit_events WHERE seq = 5")


def _delete_last_two(engine: Engine) -> None:
    sql(engine, "DELETE FROM audit_events WHERE seq >= 4")


def _delete_all(engine: Engine) -> None:
    sql(engine, "DELETE FROM audit_events")


def _delete_first(engine: Engine) -> None:
    sql(engine, "DELETE FROM audit_events WHERE seq = 1")


TAMPERING: dict[str, tuple[Callable[[Engine], None], int, str]] = {
    # case: (tamper, first bad event, words of the problem)
    "edited details": (_edit_details, 5, "changed"),
    "edited actor": (_edit_actor, 2, "changed"),
    "edited time": (_edit_time, 1, "changed"),
    "edited action": (_edit_action, 3, "changed"),
    "edited and re-hashed": (_edit_and_rehash, 4, "does not follow"),
    "deleted in the middle": (_delete_middle, 4, "event 3 is missing"),
    "deleted and renumbered": (_delete_and_renumber, 3, "does not follow"),
    "two events swapped": (_swap, 2, "does not follow"),
    "deleted at the end": (_delete_last, 5, "removed from the end"),
    "two deleted at the end": (_delete_last_two, 4, "removed from the end"),
    "all deleted": (_delete_all, 1, "removed from the end"),
    "first deleted": (_delete_first, 2, "event 1 is missing"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampering_is_detected(case: str, chain: ReleaseService, services: Services) -> None:
    tamper, first_bad, words = TAMPERING[case]
    tamper(services.engine)
    report = chain.verify_audit()
    assert not report.ok
    assert report.first_bad == first_bad, report
    assert report.problem is not None and words in report.problem


def test_audit_verify_command_names_the_first_bad_event(chain: ReleaseService,
                                                        services: Services,
                                                        settings: Settings,
                                                        tmp_path: Path) -> None:
    _edit_action(services.engine)
    services.engine.dispose()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBARGO_")}
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "--data-dir", str(settings.data_dir), "audit",
         "verify"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "event 3" in lines[0]


def test_events_carry_who_and_when(chain: ReleaseService, services: Services) -> None:
    with transaction(services.sessions) as session:
        events = list(session.scalars(select(AuditEvent).order_by(AuditEvent.seq)))
        head = session.get(AuditHead, 1)
        assert head is not None and (head.seq, head.hash) == (5, events[-1].hash)
    assert [e.action for e in events] == ["release_queued"] * 3 + [
        "release_rescheduled", "release_cancelled"]
    assert [e.at for e in events] == [T0, T0 + timedelta(minutes=1), T0 + timedelta(minutes=2),
                                      T0 + timedelta(minutes=10), T0 + timedelta(minutes=11)]
    assert {e.actor for e in events} == {"comms@test"}
    assert events[0].prev_hash == audit.GENESIS
    for before, after in itertools.pairwise(events):
        assert after.prev_hash == before.hash


def test_rolled_back_append_leaves_no_trace(services: Services) -> None:
    factory = session_factory(services.engine)
    with transaction(factory) as session:
        audit.record(session, action="first", actor="t", at=T0)
    with pytest.raises(RuntimeError), transaction(factory) as session:
        audit.record(session, action="second", actor="t", at=T0)
        raise RuntimeError("the change it describes failed")
    with transaction(factory) as session:
        audit.record(session, action="third", actor="t", at=T0)
        report = audit.verify(session)
    assert (report.ok, report.events) == (True, 2)


# -- concurrency -------------------------------------------------------------------------------
def append_many(url: str, worker: str, count: int, start: threading.Barrier | None = None
                ) -> None:
    engine = make_engine(url)
    factory = session_factory(engine)
    try:
        if start is not None:
            start.wait()
        for n in range(count):
            with transaction(factory) as session:
                audit.record(session, action="tick", actor=worker, at=datetime.now(UTC),
                             details={"n": n})
    finally:
        engine.dispose()


def check_one_chain(url: str, workers: int, count: int) -> None:
    engine = make_engine(url)
    try:
        with transaction(session_factory(engine)) as session:
            report = audit.verify(session)
            events = list(session.scalars(select(AuditEvent).order_by(AuditEvent.seq)))
    finally:
        engine.dispose()
    assert report.ok, report
    total = workers * count + 1
    assert report.events == total
    assert [e.seq for e in events] == list(range(1, total + 1))
    for before, after in itertools.pairwise(events):
        assert after.prev_hash == before.hash


def seed_chain(url: str) -> None:
    engine = make_engine(url)
    Base.metadata.create_all(engine)
    with transaction(session_factory(engine)) as session:
        audit.record(session, action="genesis", actor="test", at=T0)
    engine.dispose()


def run_threads(url: str, workers: int, count: int) -> None:
    barrier = threading.Barrier(workers)
    errors: list[BaseException] = []

    def work(name: str) -> None:
        try:
            append_many(url, name, count, barrier)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"t{i}",)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []


def test_concurrent_appends_from_threads_sqlite(settings: Settings) -> None:
    seed_chain(settings.database_url)
    run_threads(settings.database_url, workers=4, count=25)
    check_one_chain(settings.database_url, workers=4, count=25)


def test_concurrent_appends_from_processes_sqlite(settings: Settings) -> None:
    url = settings.database_url
    seed_chain(url)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=append_many, args=(url, f"p{i}", 15)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    check_one_chain(url, workers=3, count=15)


def test_concurrent_queues_make_one_chain(services: Services, tmp_path: Path) -> None:
    svc = ReleaseService(dataclasses.replace(services, clock=FakeClock(T0)), actor="comms")
    specs = [load_manifest(write_bundle(tmp_path / f"b{n}", letters=1)) for n in range(6)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def work(mine: list[ReleaseSpec]) -> None:
        try:
            barrier.wait()
            for spec in mine:
                svc.queue(spec)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(specs[i::3],)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    report = svc.verify_audit()
    assert (report.ok, report.events) == (True, 6)
    assert len({r.slug for r in svc.list_releases()}) == 6


@pytest.mark.postgres
def test_concurrent_appends_from_threads_postgres(pg_url: str) -> None:
    seed_chain(pg_url)
    run_threads(pg_url, workers=4, count=25)
    check_one_chain(pg_url, workers=4, count=25)


@pytest.mark.postgres
def test_first_two_appends_race_postgres(pg_url: str) -> None:
    """The very first two appends on a fresh database, overlapping: both
    must succeed and form one chain (no unique-key failure on the head row)."""
    engine = make_engine(pg_url)
    Base.metadata.create_all(engine)
    factory = session_factory(engine)
    errors: list[BaseException] = []

    def second() -> None:
        try:
            with transaction(factory) as session:
                audit.record(session, action="second", actor="b", at=T0)
        except BaseException as exc:
            errors.append(exc)

    try:
        with transaction(factory) as session:
            audit.record(session, action="first", actor="a", at=T0)
            session.flush()
            other = threading.Thread(target=second)
            other.start()
            # wait (bounded) until the second append is blocked behind this one
            deadline = time.monotonic() + 20
            with engine.connect() as probe:
                while time.monotonic() < deadline and other.is_alive():
                    waiting = probe.execute(text(
                        "select count(*) from pg_stat_activity where datname = "
                        "current_database() and cardinality(pg_blocking_pids(pid)) > 0"
                    )).scalar_one()
                    probe.rollback()
                    if waiting:
                        break
        other.join(60)
        assert errors == [], [repr(e) for e in errors]
        with transaction(factory) as session:
            report = audit.verify(session)
        assert (report.ok, report.events) == (True, 2)
    finally:
        engine.dispose()
