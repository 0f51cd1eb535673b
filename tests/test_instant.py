"""Publication at the instant as a commit (issue 16): staging under a claim
that cancel and reschedule still overrule, a lead window sized to the bytes
due, and a burst of releases due at one instant published by one job, with
each release keeping its own outcome. The seed's instant, 00:01 BST Thursday
4 September 2014, unless a test needs real time."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from freezegun import freeze_time
from sqlalchemy import event

from config.settings import Settings
from jobs.scheduler import EmbargoScheduler
from release.keys import load_private_key
from release.manifest import load_manifest
from release.publishing import Outcome, Publisher
from release.records import CANCELLED, FAILED, PUBLISHED, QUEUED
from release.service import ReleaseService, Services
from release.vault_keys import document_key
from tests.conftest import SEED_INSTANT, FakeClock, release_row, write_bundle

QUEUE_DAY = datetime(2014, 9, 1, tzinfo=UTC)


def queue_seed(services: Services, folder: Path, *, letters: int = 3) -> str:
    queuing = dataclasses.replace(services, clock=FakeClock(QUEUE_DAY))
    manifest = write_bundle(folder, letters=letters)
    return ReleaseService(queuing, actor="comms").queue(load_manifest(manifest)).id


def public_names(settings: Settings) -> set[str]:
    root = settings.public.path
    assert root is not None
    if not root.exists():
        return set()
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def until(predicate: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def staging_in_lead_window(settings: Settings, services: Services, release_id: str
                           ) -> tuple[threading.Thread, list[Outcome], FakeClock]:
    """A publisher woken 10 s before the instant (by its own clock, which the
    test moves), left staging and then waiting for the instant."""
    clock = FakeClock(SEED_INSTANT - timedelta(seconds=10))
    publisher = Publisher(dataclasses.replace(services, clock=clock),
                          load_private_key(settings.keys_dir), claimant="early-bird")
    outcomes: list[Outcome] = []
    worker = threading.Thread(target=lambda: outcomes.append(
        publisher.publish(release_id, wait_up_to=timedelta(seconds=30))))
    worker.start()
    staging = services.public.staging.root

    def staged() -> bool:
        return staging.is_dir() and any(p.name.startswith("doc_")
                                        for p in staging.rglob("*"))

    assert until(lambda: release_row(services, release_id).claimant == "early-bird"
                 and staged()), "the publisher did not claim and stage in the lead window"
    return worker, outcomes, clock


def test_a_release_claimed_and_staged_in_its_lead_window_can_still_be_cancelled(
        settings: Settings, services: Services, tmp_path: Path) -> None:
    """Before issue 16 the claim made the release ``publishing`` at once and
    cancel refused it for the whole lead window; now the claim stays queued
    until just before the instant, and a cancel wins: nothing is published,
    and the staged plaintext is removed."""
    release_id = queue_seed(services, tmp_path / "b")
    worker, outcomes, clock = staging_in_lead_window(settings, services, release_id)
    at = dataclasses.replace(services, clock=FakeClock(SEED_INSTANT - timedelta(seconds=9)))
    cancelled = ReleaseService(at, actor="comms").cancel(release_id, reason="withdrawn")
    assert cancelled.state == CANCELLED
    clock.set(SEED_INSTANT)
    worker.join(30)
    assert not worker.is_alive()
    assert [o.status for o in outcomes] == ["inactive"]
    assert public_names(settings) == set()
    after = release_row(services, release_id)
    assert after.state == CANCELLED and after.reason == "withdrawn"  # not overwritten
    assert after.started_at is None
    assert list(services.public.staging.root.iterdir()) == []


def test_a_release_rescheduled_while_it_is_staged_is_given_back_not_published(
        settings: Settings, services: Services, tmp_path: Path) -> None:
    release_id = queue_seed(services, tmp_path / "b")
    worker, outcomes, clock = staging_in_lead_window(settings, services, release_id)
    at = dataclasses.replace(services, clock=FakeClock(SEED_INSTANT - timedelta(seconds=9)))
    ReleaseService(at, actor="comms").reschedule(release_id, publish_on="2014-09-05",
                                                at=None, zone=None)
    clock.set(SEED_INSTANT)
    worker.join(30)
    assert not worker.is_alive()
    assert [o.status for o in outcomes] == ["not_yet"]
    assert public_names(settings) == set()
    after = release_row(services, release_id)
    assert after.state == QUEUED and after.claimant is None and after.lease_expires_at is None
    assert after.instant == SEED_INSTANT + timedelta(days=1)
    # ... and it publishes at its new instant.
    later = Publisher(dataclasses.replace(services, clock=FakeClock(after.instant)),
                      load_private_key(settings.keys_dir), claimant="n")
    assert later.publish(release_id).status == "published"


def test_after_the_freeze_cancel_is_refused(settings: Settings, services: Services,
                                            tmp_path: Path) -> None:
    """From ``freeze_before`` before the instant the release is
    ``publishing``: a cancel then is refused, and the release is published."""
    release_id = queue_seed(services, tmp_path / "b")
    worker, outcomes, clock = staging_in_lead_window(settings, services, release_id)
    clock.set(SEED_INSTANT - timedelta(milliseconds=100))  # inside freeze_before (200 ms)
    assert until(lambda: release_row(services, release_id).state == "publishing")
    at = dataclasses.replace(services, clock=FakeClock(SEED_INSTANT - timedelta(seconds=1)))
    try:
        ReleaseService(at, actor="comms").cancel(release_id, reason="too late")
    except Exception as exc:
        assert "publishing" in str(exc)
    else:
        raise AssertionError("a frozen release was cancelled")
    clock.set(SEED_INSTANT)
    worker.join(30)
    assert [o.status for o in outcomes] == ["published"]
    assert release_row(services, release_id).state == PUBLISHED


def test_the_lead_window_is_sized_to_the_bytes_due_at_the_instant(
        settings: Settings, services: Services, tmp_path: Path) -> None:
    """The job of an instant wakes ``lead`` plus the bytes due then at the
    staging rate early (both releases' bytes: they share the job)."""
    first = queue_seed(services, tmp_path / "a", letters=3)
    second = queue_seed(services, tmp_path / "b", letters=5)
    size = sum(d.size for r in (first, second) for d in release_row(services, r).documents)
    publisher = Publisher(services, load_private_key(settings.keys_dir), claimant="n")
    rate = size / 4.0  # bytes per second: these bytes take 4 s to stage
    with freeze_time(SEED_INSTANT - timedelta(minutes=5)):
        scheduler = EmbargoScheduler(services, publisher, None, poll_seconds=0.05,
                                     lead=timedelta(seconds=0.5), staging_rate=rate)
        scheduler.start()
        try:
            jobs = [j for j in scheduler.scheduler.get_jobs() if j.id.startswith("publish:")]
            assert len(jobs) == 1  # one job for the instant, not one per release
            wakes = SEED_INSTANT - timedelta(seconds=4.5)
            assert jobs[0].next_run_time == wakes
            assert scheduler.timer_of(first) == scheduler.timer_of(second) == wakes
        finally:
            scheduler.shutdown()
    assert scheduler.lead_for(0) == timedelta(seconds=0.5)  # the floor
    assert scheduler.lead_for(10**15) == timedelta(minutes=30)  # at most half the horizon


def test_a_burst_is_one_job_one_claim_one_finish_and_a_bad_release_fails_alone(
        settings: Settings, services: Services, tmp_path: Path) -> None:
    """Three releases due at one instant, one of them tampered with: one
    publish run for all three (claimed together, waited for once), the two
    good ones published in one finish transaction, the bad one failed on its
    own, nothing of it public."""
    ids = [queue_seed(services, tmp_path / f"b{i}") for i in range(3)]
    bad = ids[1]
    victim = release_row(services, bad).documents[1]
    key = document_key(bad, victim.id)
    blob = bytearray(services.vault.get_bytes(key))
    blob[-20] ^= 0x01
    services.vault.put_bytes(key, bytes(blob))
    publisher = Publisher(services, load_private_key(settings.keys_dir), claimant="n")
    runs: list[list[str]] = []
    inside: set[int] = set()  # the thread running the publish run (its recorder: "record-")
    original = publisher.publish_many

    def spy(release_ids: list[str], **kw: Any) -> list[Outcome]:
        runs.append(list(release_ids))
        inside.add(threading.get_ident())
        try:
            return original(release_ids, **kw)
        finally:
            inside.discard(threading.get_ident())

    publisher.publish_many = spy  # type: ignore[method-assign]
    begun: list[tuple[str, str]] = []  # (thread, first write of its transaction)

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        words = statement.split()
        if statement.startswith("BEGIN"):
            thread = threading.current_thread()
            ours = thread.ident in inside or thread.name.startswith("record-")
            begun.append(("publish run" if ours else thread.name, statement))
        elif begun and begun[-1][1].startswith("BEGIN") and words[0] in ("UPDATE", "INSERT"):
            begun[-1] = (begun[-1][0], " ".join(words[:3]))

    outcomes: list[Outcome] = []
    with freeze_time(SEED_INSTANT - timedelta(milliseconds=300)) as frozen:
        scheduler = EmbargoScheduler(services, publisher, None, poll_seconds=0.05,
                                     on_outcome=outcomes.append)
        event.listen(services.engine, "before_cursor_execute", count)
        scheduler.start()
        time.sleep(0.2)  # several polls
        try:
            assert until(lambda: bool(runs))
            time.sleep(0.3)  # claimed and staged; waiting for the instant
            assert public_names(settings) == set()
            frozen.move_to(SEED_INSTANT)
            assert until(lambda: len(outcomes) == 3)
        finally:
            scheduler.shutdown()
            event.remove(services.engine, "before_cursor_execute", count)
    assert runs == [sorted(ids)]
    by_id = {o.release_id: o.status for o in outcomes}
    assert by_id == {ids[0]: "published", bad: "failed", ids[2]: "published"}
    assert release_row(services, bad).state == FAILED
    assert victim.filename in (release_row(services, bad).reason or "")
    slugs = {r: release_row(services, r).slug for r in ids}
    names = public_names(settings)
    assert not any(n.startswith(slugs[bad] + "/") for n in names)
    for good in (ids[0], ids[2]):
        row = release_row(services, good)
        assert row.state == PUBLISHED and row.lateness_ms == 0
        assert {f"{row.slug}/{d.filename}" for d in row.documents} <= names
    # The publish run's transactions: the claim, the freeze (queued -> publishing), the
    # bad release's failure, "started", the finish; its reads of the server's clock take
    # no writer lock, nor do the scheduler's polls.
    writes = [what for name, what in begun if name == "publish run" and what != "BEGIN"]
    assert writes == ["UPDATE releases SET"] * 5, begun
    assert all(what != "BEGIN IMMEDIATE" for name, what in begun if name == "publish run"), begun
    assert not any(name == "embargo-poll" and what.startswith("BEGIN IMMEDIATE")
                   for name, what in begun), begun
