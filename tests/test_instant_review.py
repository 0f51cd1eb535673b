"""Hostile review of publication at the instant (issue 16): what a change to
a release made while it is staged, under a claim that stays ``queued`` until
the freeze, does to its publication. The seed's instant, 00:01 BST Thursday
4 September 2014 (23:01 UTC on the 3rd)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Collection
from datetime import timedelta
from pathlib import Path

from config.errors import StorageError
from config.settings import Settings
from release.keys import load_private_key
from release.publishing import Outcome, Publisher
from release.records import CANCELLED, PUBLISHED
from release.service import ReleaseService, Services
from tests.conftest import SEED_INSTANT, FakeClock, release_row
from tests.test_instant import public_names, queue_seed, until

EARLY = SEED_INSTANT - timedelta(minutes=5)


def staged_early(settings: Settings, services: Services, release_ids: list[str]
                 ) -> tuple[threading.Thread, list[Outcome], FakeClock]:
    """A publisher woken 5 minutes before the instant (a big release's lead
    window), left waiting for the freeze once everything is staged."""
    clock = FakeClock(EARLY)
    publisher = Publisher(dataclasses.replace(services, clock=clock),
                          load_private_key(settings.keys_dir), claimant="early-bird")
    outcomes: list[Outcome] = []
    worker = threading.Thread(target=lambda: outcomes.extend(
        publisher.publish_many(release_ids, wait_up_to=timedelta(minutes=10))))
    worker.start()
    staging = services.public.staging.root

    def staged() -> bool:
        return staging.is_dir() and sum(1 for p in staging.rglob("doc_*")) == sum(
            len(release_row(services, r).documents) for r in release_ids)

    assert until(lambda: all(release_row(services, r).claimant == "early-bird"
                             for r in release_ids) and staged())
    return worker, outcomes, clock


def test_a_release_rescheduled_earlier_while_staged_is_published_at_its_new_instant(
        settings: Settings, services: Services, tmp_path: Path) -> None:
    """Moved two minutes earlier while staged in its lead window: published
    at the new instant, not held until the freeze of the old one (on main it
    was published at the old instant, two minutes late, its claim renewed
    meanwhile so that no other node could take it)."""
    release_id = queue_seed(services, tmp_path / "b")
    worker, outcomes, clock = staged_early(settings, services, [release_id])
    try:
        service = ReleaseService(dataclasses.replace(services, clock=FakeClock(EARLY)),
                                 actor="comms")
        moved = service.reschedule(release_id, publish_on="2014-09-03", at="23:59",
                                   zone=None)
        new_instant = SEED_INSTANT - timedelta(minutes=2)
        assert moved.instant == new_instant
        clock.set(new_instant + timedelta(milliseconds=50))
        assert until(lambda: release_row(services, release_id).state == PUBLISHED, 5), \
            "not published at its new instant"
    finally:
        clock.set(SEED_INSTANT)
        worker.join(30)
    row = release_row(services, release_id)
    assert row.instant == new_instant
    assert row.published_at is not None and row.published_at >= new_instant
    assert [o.status for o in outcomes] == ["published"]
    assert {f"{row.slug}/{d.filename}" for d in row.documents} <= public_names(settings)


def test_a_cancel_while_waiting_for_the_freeze_removes_the_plaintext_at_once(
        settings: Settings, services: Services, tmp_path: Path) -> None:
    """A cancel shreds the data key so that nothing can be decrypted again;
    the plaintext staged for it goes at once, not when the freeze of the
    instant comes (5 minutes later here; up to half the horizon for a big
    release)."""
    release_id = queue_seed(services, tmp_path / "b")
    worker, outcomes, clock = staged_early(settings, services, [release_id])
    staging = services.public.staging.root
    try:
        service = ReleaseService(dataclasses.replace(services, clock=FakeClock(EARLY)),
                                 actor="comms")
        assert service.cancel(release_id, reason="withdrawn").state == CANCELLED
        assert until(lambda: not any(staging.rglob("doc_*")), 5), \
            "the cancelled release's plaintext is still staged"
        assert until(lambda: not worker.is_alive(), 5)
    finally:
        clock.set(SEED_INSTANT)
        worker.join(30)
    assert [o.status for o in outcomes] == ["inactive"]
    assert public_names(settings) == set()


def test_of_a_burst_one_moved_earlier_and_one_later_each_is_published_at_its_own_instant(
        settings: Settings, services: Services, tmp_path: Path) -> None:
    """Three releases of one instant, staged by one run: one moved two
    minutes earlier, one a minute later (both within the run's window), one
    left. Each is published at its own instant, by the same run, from what
    it staged (on main the earlier one waited for the old instant and the
    later one was given back at the freeze and staged again)."""
    ids = [queue_seed(services, tmp_path / f"b{i}") for i in range(3)]
    early, left, late = ids
    worker, outcomes, clock = staged_early(settings, services, ids)
    service = ReleaseService(dataclasses.replace(services, clock=FakeClock(EARLY)),
                             actor="comms")
    service.reschedule(early, publish_on="2014-09-03", at="23:59", zone=None)
    service.reschedule(late, publish_on="2014-09-04", at="00:02", zone=None)
    try:
        clock.set(SEED_INSTANT - timedelta(minutes=2) + timedelta(milliseconds=50))
        assert until(lambda: release_row(services, early).state == PUBLISHED, 5)
        clock.set(SEED_INSTANT + timedelta(milliseconds=50))
        assert until(lambda: release_row(services, left).state == PUBLISHED, 5)
        assert release_row(services, late).state == "queued"  # staged, not frozen yet
        assert release_row(services, late).claimant == "early-bird"
        clock.set(SEED_INSTANT + timedelta(minutes=1, milliseconds=50))
        assert until(lambda: release_row(services, late).state == PUBLISHED, 5)
    finally:
        clock.set(SEED_INSTANT + timedelta(minutes=2))
        worker.join(30)
    assert [o.status for o in outcomes] == ["published"] * 3
    for release_id, moved in ((early, -2), (left, 0), (late, 1)):
        row = release_row(services, release_id)
        assert row.instant == SEED_INSTANT + timedelta(minutes=moved)
        assert row.published_at is not None and row.published_at >= row.instant
        assert row.attempts == 1  # staged once
    assert not any(services.public.staging.root.rglob("doc_*"))


def test_one_failed_renewal_while_the_lease_still_holds_does_not_lose_the_claim(
        settings: Settings, services: Services, tmp_path: Path) -> None:
    """The database does not answer one lease renewal (a blip) while a
    release waits in its lead window. The lease it renewed a moment before
    still holds for two thirds of its length, so nobody else can have the
    release: the next renewal carries on and the release is published at the
    instant. On main one failed renewal gave up every claim of the run: the
    release failed at the instant ("lost the claim"), the owner was alerted,
    and it was staged again after a backoff."""
    release_id = queue_seed(services, tmp_path / "b")
    clock = FakeClock(EARLY)
    publisher = Publisher(dataclasses.replace(services, clock=clock),
                          load_private_key(settings.keys_dir), claimant="early-bird",
                          lease=timedelta(seconds=1.5))  # renewed every 0.5 s
    renew = publisher._renew
    calls: list[str] = []

    def flaky(release_ids: Collection[str]) -> set[str]:
        calls.append("renew")
        if len(calls) == 1:
            raise StorageError("database error: server closed the connection unexpectedly")
        return renew(release_ids)

    publisher._renew = flaky  # type: ignore[method-assign]
    outcomes: list[Outcome] = []
    worker = threading.Thread(target=lambda: outcomes.append(
        publisher.publish(release_id, wait_up_to=timedelta(minutes=10))))
    worker.start()
    try:
        assert until(lambda: len(calls) >= 3, 10)  # the failed one, and two after it
        clock.set(SEED_INSTANT)
        worker.join(30)
    finally:
        clock.set(SEED_INSTANT)
        worker.join(30)
    assert [o.status for o in outcomes] == ["published"]
    row = release_row(services, release_id)
    assert row.state == PUBLISHED and row.reason is None and row.attempts == 1
