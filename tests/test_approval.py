"""The second pair of eyes: with approval.required a queued release waits in
awaiting_approval, gets no timer, sends no copies and is never published,
until a different person approves it."""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from freezegun import freeze_time
from sqlalchemy import func, select

from config.errors import InputError, StateError
from config.settings import Settings, load_settings
from jobs.app import build_services
from jobs.cli import main
from jobs.mail import FileMailTransport
from jobs.relay import OutboxRelay
from jobs.scheduler import EmbargoScheduler
from release import approval
from release.keys import init_keys, load_private_key
from release.manifest import load_manifest
from release.publishing import Publisher
from release.records import AuditEvent, OutboxMessage, Release
from release.service import ReleaseService, Services
from release.views import ReleaseDetail
from tests.conftest import SEED_INSTANT, FakeClock

SEPT_1 = datetime(2014, 9, 1, tzinfo=UTC)


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    settings = load_settings(environ={}, overrides={"data_dir": str(data_dir),
                                                    "approval.required": True})
    init_keys(settings.keys_dir)
    return settings


def at(services: Services, now: datetime) -> Services:
    return dataclasses.replace(services, clock=FakeClock(now))


def queue(services: Services, bundle: Path, actor: str = "comms") -> ReleaseDetail:
    return ReleaseService(at(services, SEPT_1), actor=actor).queue(
        load_manifest(bundle, copies_at="2014-09-02 09:00"))


def test_the_setting_is_off_by_default_and_takes_yes_or_no(data_dir: Path) -> None:
    assert load_settings(environ={},
                         overrides={"data_dir": str(data_dir)}).approval.required is False
    assert load_settings(environ={"EMBARGO_APPROVAL_REQUIRED": "true"}).approval.required
    with pytest.raises(Exception, match="not true or false"):
        load_settings(environ={"EMBARGO_APPROVAL_REQUIRED": "maybe"})


def test_queued_from_the_command_line_waits_when_approval_is_required(
        services: Services, bundle: Path) -> None:
    release = queue(services, bundle)
    assert release.state == "awaiting_approval" and release.submitted_by == "comms"


def test_counts_include_the_releases_awaiting_approval(services: Services, bundle: Path) -> None:
    """What `embargo run` prints at its start: a release awaiting approval
    is counted as such, and not as active."""
    queue(services, bundle)
    counts = ReleaseService(services, actor="t").counts()
    assert (counts.awaiting_approval, counts.draft, counts.queued, counts.active) == (1, 0, 0, 0)


def test_an_awaiting_release_gets_no_timer_no_copies_and_is_never_published(
        settings: Settings, services: Services, bundle: Path) -> None:
    release = queue(services, bundle)
    publisher = Publisher(services, load_private_key(settings.keys_dir), claimant="node")
    relay = OutboxRelay(services, FileMailTransport(settings.outbox_dir), sender="e@x.example",
                        worker="relay")
    # from before the copies are due until well past the instant
    with freeze_time(datetime(2014, 9, 2, 8, 59, tzinfo=UTC)) as frozen:
        scheduler = EmbargoScheduler(services, publisher, relay, poll_seconds=0.05)
        assert scheduler.start() == 0
        try:
            for moment in (datetime(2014, 9, 2, 9, 0, tzinfo=UTC),
                           SEED_INSTANT - timedelta(microseconds=1), SEED_INSTANT,
                           SEED_INSTANT + timedelta(hours=1)):
                frozen.move_to(moment)
                time.sleep(0.3)
                assert scheduler.scheduler.get_jobs() == []
        finally:
            scheduler.shutdown()
    with services.sessions() as session:
        assert session.scalar(select(func.count()).select_from(OutboxMessage)) == 0
        assert session.get(Release, release.id).state == "awaiting_approval"  # type: ignore[union-attr]
    assert not (settings.data_dir / "public").exists() or not any(
        (settings.data_dir / "public").rglob("*.txt"))
    assert not settings.outbox_dir.exists() or not any(settings.outbox_dir.iterdir())
    # and claiming it directly is refused too
    with freeze_time(SEED_INSTANT + timedelta(seconds=1)):
        publisher.publish(release.id)
    assert ReleaseService(services, actor="t").get(release.id).state == "awaiting_approval"


def test_approval_by_someone_else_queues_it_and_the_scheduler_takes_it(
        services: Services, bundle: Path) -> None:
    release = queue(services, bundle)
    approved = approval.approve(at(services, SEPT_1), release.id, actor="boss")
    assert approved.state == "queued" and approved.approved_by == "boss"
    assert approved.forced_reason is None
    with services.sessions() as session:
        actions = [e.action for e in session.scalars(select(AuditEvent).order_by(AuditEvent.seq))]
    assert actions[-2:] == ["release_queued", "release_approved"]
    with pytest.raises(StateError, match="only a release awaiting approval"):
        approval.approve(at(services, SEPT_1), release.id, actor="boss")


def test_the_submitter_cannot_approve_without_a_typed_reason(
        services: Services, bundle: Path) -> None:
    release = queue(services, bundle)
    clock = at(services, SEPT_1)
    with pytest.raises(InputError, match="another approver must approve"):
        approval.approve(clock, release.id, actor="comms")
    with pytest.raises(InputError, match="another approver must approve"):
        approval.approve(clock, release.id, actor="comms", force_reason="   ")
    forced = approval.approve(clock, release.id, actor="comms",
                              force_reason="everyone else is on leave")
    assert forced.state == "queued" and forced.forced_reason == "everyone else is on leave"
    with services.sessions() as session:
        last = session.scalars(select(AuditEvent).order_by(AuditEvent.seq.desc())).first()
    assert last is not None and last.action == "release_force_approved"
    assert "on leave" in last.details
    with pytest.raises(InputError, match="someone other than the submitter"):
        approval.review_forced(clock, release.id, actor="comms")
    reviewed = approval.review_forced(clock, release.id, actor="boss")
    assert reviewed.forced_reason is None


def test_no_approval_at_or_after_the_instant(services: Services, bundle: Path) -> None:
    release = queue(services, bundle)
    with pytest.raises(StateError, match="still awaiting approval at its instant"):
        approval.approve(at(services, SEED_INSTANT), release.id, actor="boss")
    just_before = approval.approve(at(services, SEED_INSTANT - timedelta(microseconds=1)),
                                   release.id, actor="boss")
    assert just_before.state == "queued"


def test_send_back_needs_a_comment_and_makes_a_draft(services: Services, bundle: Path) -> None:
    release = queue(services, bundle)
    with pytest.raises(InputError, match="needs a comment"):
        approval.send_back(services, release.id, actor="boss", comment=" ")
    back = approval.send_back(services, release.id, actor="boss", comment="wrong date")
    assert back.state == "draft" and back.review_comment == "wrong date"
    with pytest.raises(StateError):
        approval.approve(at(services, SEPT_1), release.id, actor="boss")


def test_cli_approve_and_send_back(settings: Settings, bundle: Path,
                                   monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("EMBARGO_APPROVAL_REQUIRED", "true")
    services = build_services(settings)
    first, second = queue(services, bundle, actor="someone-else"), queue(services, bundle)
    data = ["--data-dir", str(settings.data_dir)]
    with freeze_time(SEPT_1):
        assert main([*data, "send-back", second.id, "--comment", "fix the letter"]) == 0
        assert main([*data, "approve", first.id]) == 0
    out = capsys.readouterr().out
    assert f"approved {first.id}" in out and f"sent {second.id} back" in out
    service = ReleaseService(services, actor="t")
    assert service.get(first.id).state == "queued"
    assert service.get(second.id).state == "draft"


def test_owner_and_approvers_are_told_at_warn_before_and_at_the_instant(
        services: Services, bundle: Path) -> None:
    from release import accounts

    accounts.add_user(services, name="amir", email="amir@press.example", role="approver",
                      actor="t")
    accounts.add_user(services, name="vic", email="vic@press.example", role="viewer",
                      actor="t")
    told = dataclasses.replace(services, alerts_to=("desk@press.example",))
    release = queue(services, bundle)
    warn = timedelta(hours=2)

    def run(now: datetime) -> int:
        return approval.warn_unapproved(told, now=now, warn_before=warn, actor="node")

    assert run(SEED_INSTANT - warn - timedelta(microseconds=1)) == 0
    assert run(SEED_INSTANT - warn) == 3  # owner, the approver, alerts.to; not the viewer
    assert run(SEED_INSTANT - timedelta(minutes=1)) == 0  # once
    assert run(SEED_INSTANT - timedelta(microseconds=1)) == 0
    assert run(SEED_INSTANT) == 3  # and at the instant: not published
    assert run(SEED_INSTANT + timedelta(minutes=5)) == 0
    with services.sessions() as session:
        rows = list(session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)))
    assert sorted({r.to_addr for r in rows}) == ["amir@press.example", "desk@press.example",
                                                 "press@inspectorate.example"]
    assert all(r.purpose == "alert" and r.release_id == release.id for r in rows)
    assert "NOT PUBLISHED" in (rows[-1].details or "")


def test_an_approved_release_raises_no_approval_alert(services: Services,
                                                      bundle: Path) -> None:
    release = queue(services, bundle)
    approval.approve(at(services, SEPT_1), release.id, actor="boss")
    assert approval.warn_unapproved(services, now=SEED_INSTANT, warn_before=timedelta(hours=2),
                                    actor="node") == 0


def test_a_release_that_missed_its_instant_unapproved_is_rescheduled_then_approved(
        services: Services, bundle: Path) -> None:
    release = queue(services, bundle)
    late = at(services, SEED_INSTANT + timedelta(hours=1))
    with pytest.raises(StateError, match="reschedule it first"):
        approval.approve(late, release.id, actor="boss")
    moved = ReleaseService(late, actor="comms").reschedule(release.id, publish_on="2014-09-05",
                                                           at=None, zone=None)
    assert moved.state == "awaiting_approval" and moved.wall == "2014-09-05T00:01"
    assert approval.approve(late, release.id, actor="boss").state == "queued"


def test_key_rotation_reseals_a_release_awaiting_approval(settings: Settings,
                                                          services: Services,
                                                          bundle: Path) -> None:
    from release import custody, sealing

    release = queue(services, bundle)
    custody.rotate(services, settings.keys_dir, actor="ops")
    new_key = load_private_key(settings.keys_dir)
    sealed = services.vault.get_bytes(f"releases/{release.id}/dek.hpke")
    assert len(sealing.open_dek(sealed, new_key, release.id)) == sealing.DEK_SIZE
