"""The pre-flight rehearsal (release/rehearsal.py): it passes on a good
release and names the failing check for each fault; it never publishes
anything, nor leaves anything in the public location; it is recorded,
audited and mailed; the automatic one runs once per configured lead, under a
moved clock, and not again after a restart."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiosmtpd.controller import Controller
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy import select, update

from config.settings import Settings, load_settings
from jobs.app import build_services
from jobs.cli import main
from jobs.mail import SmtpMailTransport
from release import keys as keyfile
from release.keys import load_private_key
from release.manifest import load_manifest
from release.records import QUEUED, AuditEvent, Document, Node, OutboxMessage, Rehearsal, Release
from release.rehearsal import QUIET, Rehearser
from release.service import ReleaseService, Services
from release.vault_keys import document_key
from storage.local import LocalPublicTarget
from storage.s3 import S3PublicTarget
from tests.conftest import SEED_INSTANT, FakeClock, Inbox, free_port, write_bundle
from tests.test_publish import queue_seed
from tests.test_s3_faults import Fault, FaultProxy

if TYPE_CHECKING:
    from tests.s3server import Buckets

HOUR_BEFORE = SEED_INSTANT - timedelta(hours=1)
ALERTS_TO = "duty@inspectorate.example"
US = timedelta(microseconds=1)


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    settings = load_settings(environ={}, overrides={"data_dir": str(data_dir),
                                                    "alerts.to": [ALERTS_TO]})
    keyfile.init_keys(settings.keys_dir)
    return settings


@pytest.fixture
def services(settings: Settings) -> Iterator[Services]:
    services = build_services(settings, clock=FakeClock(HOUR_BEFORE))
    yield services
    services.engine.dispose()


@pytest.fixture
def release_id(services: Services, bundle: Path) -> str:
    return queue_seed(services, bundle).id


def live_node(services: Services, now: datetime, *, name: str = "node-a",
              clock_ok: bool = True) -> None:
    with services.sessions.begin() as session:
        session.merge(Node(name=name, started_at=now, heartbeat_at=now, skew_ms=0.4,
                           clock_ok=clock_ok, doing="idle"))


def rehearser(services: Services, settings: Settings, **kw: Any) -> Rehearser:
    return Rehearser(services, kw.pop("key", None) or load_private_key(settings.keys_dir), **kw)


def public_entries(services: Services) -> list[str]:
    public = services.public
    assert isinstance(public, LocalPublicTarget)
    return sorted(str(p) for p in public.root.rglob("*")) if public.root.exists() else []


def assert_nothing_published(services: Services, release_id: str) -> None:
    """No document public, no notice of publication, the release still
    queued and unclaimed; and the public folder as empty as it was."""
    assert public_entries(services) == []
    with services.sessions() as session:
        release = session.get(Release, release_id)
        assert release is not None and release.state == QUEUED
        assert release.published_at is None and release.claimant is None
        assert all(d.published_at is None for d in release.documents)
        assert not session.scalars(select(OutboxMessage).where(
            OutboxMessage.purpose.in_(("published", "owner_summary")))).all()


def alerts(services: Services) -> list[OutboxMessage]:
    with services.sessions() as session:
        return list(session.scalars(select(OutboxMessage).where(
            OutboxMessage.purpose == "alert").order_by(OutboxMessage.id)))


def actions(services: Services, release_id: str) -> list[str]:
    with services.sessions() as session:
        return list(session.scalars(select(AuditEvent.action).where(
            AuditEvent.release_id == release_id).order_by(AuditEvent.seq)))


def failed_names(report: Any) -> list[str]:
    return [c.name for c in report.failed]


# -- one rehearsal ---------------------------------------------------------------------
def test_good_release_passes_and_is_recorded_audited_and_mailed(
        services: Services, settings: Settings, release_id: str) -> None:
    live_node(services, HOUR_BEFORE)
    report = rehearser(services, settings).rehearse(release_id, now=HOUR_BEFORE)
    assert report is not None and report.ready, report.lines()
    assert [c.name for c in report.checks] == ["data key", "documents", "public location",
                                               "mail server", "nodes", "time zone",
                                               "approval"]
    assert report.lines()[0].startswith("READY: Core business: a test inspection will "
                                        "publish 00:01 BST Thu 4 Sep 2014")
    assert_nothing_published(services, release_id)
    assert public_entries(services) == []
    with services.sessions() as session:
        row = session.scalars(select(Rehearsal)).one()
        assert row.ready and row.lead_seconds is None and row.instant == SEED_INSTANT
        assert len(json.loads(row.checks)) == 7
    assert actions(services, release_id)[-2:] == ["rehearsal_passed", "alert_raised"]
    sent = alerts(services)
    assert sorted(m.to_addr for m in sent) == [ALERTS_TO, "press@inspectorate.example"]
    assert "Ready: Core business" in (sent[0].details or "")


def test_a_pass_note_is_logged_as_news_and_a_failure_as_a_warning(
        services: Services, settings: Settings, release_id: str,
        caplog: pytest.LogCaptureFixture) -> None:
    live_node(services, HOUR_BEFORE)
    caplog.set_level(logging.INFO, logger="release.alerts")
    rehearser(services, settings).rehearse(release_id, now=HOUR_BEFORE)
    ready = [r for r in caplog.records if "Ready: Core business" in r.getMessage()]
    assert [r.levelno for r in ready] == [logging.INFO]
    caplog.clear()
    report = rehearser(services, settings, key=X25519PrivateKey.generate()).rehearse(
        release_id, now=HOUR_BEFORE)
    assert report is not None and not report.ready
    failed = [r for r in caplog.records if "REHEARSAL FAILED" in r.getMessage()]
    assert [r.levelno for r in failed] == [logging.WARNING]


def test_pass_note_can_be_turned_off(services: Services, settings: Settings,
                                     release_id: str) -> None:
    live_node(services, HOUR_BEFORE)
    report = rehearser(services, settings, mail_passed=False).rehearse(release_id,
                                                                      now=HOUR_BEFORE)
    assert report is not None and report.ready
    assert alerts(services) == []
    assert actions(services, release_id)[-1] == "rehearsal_passed"


def test_flipped_vault_byte_fails_the_documents_check(services: Services, settings: Settings,
                                                      release_id: str) -> None:
    live_node(services, HOUR_BEFORE)
    with services.sessions() as session:
        doc = session.scalars(select(Document).where(Document.release_id == release_id)
                              .order_by(Document.position.desc())).first()
        assert doc is not None
    key = document_key(release_id, doc.id)
    sealed = bytearray(services.vault.get_bytes(key))
    sealed[len(sealed) // 2] ^= 0x01
    services.vault.put_bytes(key, bytes(sealed))

    report = rehearser(services, settings).rehearse(release_id, now=HOUR_BEFORE)
    assert report is not None and not report.ready
    assert failed_names(report) == ["documents"]
    assert doc.filename in report.failed[0].detail
    assert report.lines()[0].startswith("NOT READY")
    assert any(line.startswith("  FAIL documents") for line in report.lines())
    assert_nothing_published(services, release_id)
    assert public_entries(services) == []
    assert actions(services, release_id)[-2:] == ["rehearsal_failed", "alert_raised"]
    assert all("REHEARSAL FAILED" in (m.details or "") for m in alerts(services))


def test_private_key_that_does_not_match_fails_the_data_key_check(
        services: Services, settings: Settings, release_id: str) -> None:
    live_node(services, HOUR_BEFORE)
    report = rehearser(services, settings, key=X25519PrivateKey.generate()).rehearse(
        release_id, now=HOUR_BEFORE)
    assert report is not None
    assert failed_names(report) == ["data key", "documents"]
    assert "does not open the sealed data key" in report.failed[0].detail
    assert report.failed[1].detail == "not tried: no data key"
    assert_nothing_published(services, release_id)


def test_public_folder_that_cannot_be_written_fails_the_public_check(
        services: Services, settings: Settings, release_id: str, tmp_path: Path) -> None:
    live_node(services, HOUR_BEFORE)
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"x")
    broken = dataclasses.replace(services, public=LocalPublicTarget(blocker / "public"))
    report = rehearser(broken, settings).rehearse(release_id, now=HOUR_BEFORE)
    assert report is not None and failed_names(report) == ["public location"]
    assert "probe write was refused" in report.failed[0].detail
    assert blocker.read_bytes() == b"x"
    assert_nothing_published(services, release_id)


def test_s3_bucket_refusing_the_put_fails_the_public_check(
        services: Services, settings: Settings, release_id: str, s3_server: str,
        s3_client: Any, s3_buckets: Buckets, s3_client_for: Any) -> None:
    live_node(services, HOUR_BEFORE)
    with FaultProxy(s3_server) as proxy:
        public = S3PublicTarget(s3_client_for(proxy.endpoint), bucket=s3_buckets.public,
                                prefix="releases")
        on_s3 = dataclasses.replace(services, public=public)
        assert rehearser(on_s3, settings).rehearse(release_id, now=HOUR_BEFORE).ready
        proxy.inject(Fault(method="PUT", status=403, code="AccessDenied", times=100))
        report = rehearser(on_s3, settings).rehearse(release_id, now=HOUR_BEFORE)
    assert report is not None and failed_names(report) == ["public location"]
    assert "denied" in report.failed[0].detail
    assert s3_client.list_objects_v2(Bucket=s3_buckets.public).get("Contents", []) == []
    assert_nothing_published(services, release_id)


def test_smtp_server_down_fails_the_mail_check_and_up_passes(
        services: Services, settings: Settings, release_id: str) -> None:
    live_node(services, HOUR_BEFORE)
    port = free_port()
    mail = SmtpMailTransport("127.0.0.1", port, security="none", timeout=2)
    report = rehearser(services, settings, mail=mail).rehearse(release_id, now=HOUR_BEFORE)
    assert report is not None and failed_names(report) == ["mail server"]
    assert f"smtp://127.0.0.1:{port} cannot be reached" in report.failed[0].detail
    assert_nothing_published(services, release_id)

    controller = Controller(Inbox(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        report = rehearser(services, settings, mail=mail).rehearse(release_id,
                                                                  now=HOUR_BEFORE)
    finally:
        controller.stop()
    assert report is not None and report.ready, report.lines()


def test_too_few_live_nodes_fails_the_nodes_check(services: Services, settings: Settings,
                                                  release_id: str) -> None:
    live_node(services, HOUR_BEFORE - timedelta(seconds=11), name="gone")
    live_node(services, HOUR_BEFORE, name="skewed", clock_ok=False)
    report = rehearser(services, settings).rehearse(release_id, now=HOUR_BEFORE)
    assert report is not None and failed_names(report) == ["nodes"]
    assert report.failed[0].detail == ("0 live nodes with a good clock (at least 1 wanted); "
                                       "1 refusing for clock skew")
    live_node(services, HOUR_BEFORE, name="good")
    report = rehearser(services, settings).rehearse(release_id, now=HOUR_BEFORE)
    assert report is not None and report.ready


def test_instant_the_zone_database_no_longer_gives_fails_the_zone_check(
        services: Services, settings: Settings, release_id: str) -> None:
    live_node(services, HOUR_BEFORE)
    with services.sessions.begin() as session:  # as if tzdata moved the rule under us
        session.execute(update(Release).where(Release.id == release_id).values(
            instant=SEED_INSTANT + timedelta(hours=1)))
    report = rehearser(services, settings).rehearse(release_id, now=HOUR_BEFORE)
    assert report is not None and failed_names(report) == ["time zone"]
    assert "is now 2014-09-03T23:01:00+00:00 here" in report.failed[0].detail


# -- automatic ----------------------------------------------------------------------------
LEADS = (timedelta(hours=24), timedelta(hours=1))


def test_automatic_rehearsal_once_per_lead_and_not_again_after_restart(
        services: Services, settings: Settings, release_id: str) -> None:
    first = rehearser(services, settings)
    day_before = SEED_INSTANT - LEADS[0]
    assert first.run_due(now=day_before - US, leads=LEADS) == []
    live_node(services, day_before)
    [report] = first.run_due(now=day_before, leads=LEADS)
    assert report.lead == LEADS[0] and report.ready
    assert first.run_due(now=day_before + timedelta(seconds=1), leads=LEADS) == []
    assert first.run_due(now=HOUR_BEFORE - US, leads=LEADS) == []
    live_node(services, HOUR_BEFORE)
    [report] = first.run_due(now=HOUR_BEFORE, leads=LEADS)
    assert report.lead == LEADS[1]

    restarted = rehearser(services, settings)  # a new process: nothing kept in memory
    assert restarted.run_due(now=HOUR_BEFORE + US, leads=LEADS) == []
    assert restarted.run_due(now=SEED_INSTANT - timedelta(minutes=1), leads=LEADS) == []
    assert restarted.run_due(now=SEED_INSTANT, leads=LEADS) == []  # the instant: too late
    assert actions(services, release_id).count("rehearsal_passed") == 2
    assert len(alerts(services)) == 4  # two notes, each to the owner and alerts.to


def test_release_queued_inside_the_longest_lead_is_rehearsed_once(
        services: Services, settings: Settings, tmp_path: Path) -> None:
    queuing = dataclasses.replace(services, clock=FakeClock(SEED_INSTANT - timedelta(
        minutes=30)))
    release = ReleaseService(queuing, actor="comms").queue(
        load_manifest(write_bundle(tmp_path / "late")))
    now = SEED_INSTANT - timedelta(minutes=30)
    live_node(services, now)
    reports = rehearser(services, settings).run_due(now=now, leads=LEADS)
    assert [(r.release_id, r.lead) for r in reports] == [(release.id, LEADS[1])]
    assert rehearser(services, settings).run_due(now=now, leads=LEADS) == []


def test_no_automatic_rehearsal_starts_within_the_quiet_seconds(
        services: Services, settings: Settings, release_id: str) -> None:
    quiet_from = SEED_INSTANT - QUIET
    live_node(services, quiet_from)
    assert rehearser(services, settings).run_due(now=quiet_from + US, leads=LEADS) == []
    [report] = rehearser(services, settings).run_due(now=quiet_from, leads=LEADS)
    assert report.lead == LEADS[1]


def test_a_rescheduled_release_is_rehearsed_again(services: Services, settings: Settings,
                                                  release_id: str) -> None:
    live_node(services, HOUR_BEFORE)
    assert len(rehearser(services, settings).run_due(now=HOUR_BEFORE, leads=LEADS)) == 1
    later = SEED_INSTANT + timedelta(days=1)
    with services.sessions.begin() as session:
        session.execute(update(Release).where(Release.id == release_id).values(
            instant=later, wall="2014-09-05T00:01"))
    now = later - timedelta(hours=1)
    live_node(services, now)
    [report] = rehearser(services, settings).run_due(now=now, leads=LEADS)
    assert report.ready


# -- the command ------------------------------------------------------------------------------
def test_embargo_rehearse_prints_the_report_and_show_has_it(
        settings: Settings, services: Services, release_id: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    now = datetime.now(UTC)
    live_node(services, now)
    data = ["--data-dir", str(settings.data_dir)]
    assert main([*data, "rehearse", release_id[:10]]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("READY: Core business")
    assert "ok   public location" in out

    doc = ReleaseService(services, actor="t").get(release_id).documents[0]
    key = document_key(release_id, doc.id)
    sealed = bytearray(services.vault.get_bytes(key))
    sealed[-1] ^= 0x80
    services.vault.put_bytes(key, bytes(sealed))
    assert main([*data, "rehearse", release_id]) == 11
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("NOT READY")
    assert f"  FAIL {'documents':16} {doc.filename} does not decrypt" in out

    assert main([*data, "show", release_id]) == 0
    shown = capsys.readouterr().out
    assert "rehearsal (by hand" in shown and "FAIL documents" in shown

    assert main([*data, "show", release_id, "--json"]) == 0  # the view carries it too
    rehearsal = json.loads(capsys.readouterr().out)["rehearsal"]
    assert rehearsal["ready"] is False and rehearsal["lead"] == "by hand"
    assert rehearsal["lines"][0].startswith("NOT READY")
    assert any(line.startswith(f"  FAIL {'documents':16}") for line in rehearsal["lines"])


def test_the_consoles_release_page_shows_the_last_rehearsal(
        settings: Settings, services: Services, release_id: str) -> None:
    """The page renders the view's rehearsal (the template, not a route of its own)."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    from web import app as web_app

    live_node(services, HOUR_BEFORE)
    report = rehearser(services, settings).rehearse(release_id, now=HOUR_BEFORE)
    assert report is not None and report.ready
    detail = ReleaseService(services, actor="t").get(release_id)
    assert detail.rehearsal is not None and detail.rehearsal.ready
    folder = Path(web_app.__file__).parent / "templates"
    env = Environment(loader=FileSystemLoader(folder), autoescape=select_autoescape())
    block = env.from_string(
        (folder / "release.html").read_text().split("{% if release.rehearsal %}")[1]
        .split("{% endif %}")[0])
    html = block.render(release=detail)
    assert "Ready: rehearsed by hand" in html and "public location" in html


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_a_lead_is_recorded_once_by_any_node_and_by_hand_every_time(
        data_dir: Path, database: str, bundle: Path, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("pg_url") if database == "postgres" else ""
    settings = load_settings(environ={}, overrides={"data_dir": str(data_dir),
                                                    "database.url": url,
                                                    "alerts.to": [ALERTS_TO]})
    keyfile.init_keys(settings.keys_dir)
    services = build_services(settings, clock=FakeClock(HOUR_BEFORE), migrate_schema=True)
    try:
        release_id = queue_seed(services, bundle).id
        live_node(services, HOUR_BEFORE)
        one, two = rehearser(services, settings), rehearser(services, settings)
        assert one.rehearse(release_id, now=HOUR_BEFORE, lead=LEADS[1]) is not None
        assert two.rehearse(release_id, now=HOUR_BEFORE, lead=LEADS[1]) is None  # the other node
        assert one.rehearse(release_id, now=HOUR_BEFORE) is not None
        assert two.rehearse(release_id, now=HOUR_BEFORE) is not None
        with services.sessions() as session:
            assert len(session.scalars(select(Rehearsal)).all()) == 3
        assert actions(services, release_id).count("rehearsal_passed") == 3
        assert len(alerts(services)) == 6
    finally:
        services.engine.dispose()


def test_a_release_awaiting_approval_is_not_ready_until_approved(
        settings: Settings, bundle: Path) -> None:
    """Where approval is required, the rehearsal names the missing approval
    (an hour before midnight, while someone can still approve it); once a
    second person approves, that check passes."""
    from release.approval import approve
    from release.records import AWAITING_APPROVAL

    services = dataclasses.replace(build_services(settings, clock=FakeClock(HOUR_BEFORE)),
                                   approval_required=True)
    try:
        release_id = queue_seed(services, bundle)
        with services.sessions() as session:
            release = session.get(Release, release_id.id)
            assert release is not None and release.state == AWAITING_APPROVAL
        live_node(services, HOUR_BEFORE)
        runner = rehearser(services, settings)
        assert [r for r, _ in runner.due(now=HOUR_BEFORE, leads=[timedelta(hours=1)])] \
            == [release_id.id]  # awaiting approval: rehearsed all the same
        report = runner.rehearse(release_id.id, now=HOUR_BEFORE)
        assert report is not None and not report.ready
        assert failed_names(report) == ["approval"]
        assert "awaiting approval" in report.failed[0].detail
        with services.sessions.begin() as session:  # submitted by someone else
            session.execute(update(Release).where(Release.id == release_id.id)
                            .values(submitted_by="editor@inspectorate.example"))
        approve(services, release_id.id, actor="approver@inspectorate.example")
        again = runner.rehearse(release_id.id, now=HOUR_BEFORE)
        assert again is not None and again.ready, again.lines()
        approval = next(c for c in again.checks if c.name == "approval")
        assert approval.detail == "approved by approver@inspectorate.example"
    finally:
        services.engine.dispose()
