"""Operations on a node: /metrics scraped over HTTP while a release is queued
then published; the overdue gauge and the overdue alert with every node
stopped across an instant; /healthz/ready with its PostgreSQL database
dropped and recreated; the dead man's switch; JSON logs."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, select, text

from config.settings import Settings, load_settings
from jobs.app import build_services, start_node
from jobs.heartbeat import Heartbeat
from jobs.metrics import MetricsServer, start_metrics
from jobs.operations import Operations
from release import keys as keyfile
from release.keys import load_private_key
from release.manifest import load_manifest
from release.publishing import Publisher
from release.records import PUBLISHED, AuditEvent, OutboxMessage, Rehearsal, Release
from release.rehearsal import Rehearser
from release.service import ReleaseService, Services
from storage.local import LocalPublicTarget
from tests.conftest import (
    PG_ADMIN_URL,
    SEED_INSTANT,
    FakeClock,
    free_port,
    wait_until,
    write_bundle,
)
from tests.test_publish import queue_seed
from tests.test_rehearsal import live_node

ALERTS_TO = "duty@inspectorate.example"
OWNER = "press@inspectorate.example"
US = timedelta(microseconds=1)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(server: MetricsServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, by (name, labels)."""
    status, body = get(f"http://{server.address}/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def value(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    settings = load_settings(environ={}, overrides={"data_dir": str(data_dir),
                                                    "alerts.to": [ALERTS_TO]})
    keyfile.init_keys(settings.keys_dir)
    return settings


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(SEED_INSTANT - timedelta(minutes=10))


@pytest.fixture
def services(settings: Settings, clock: FakeClock) -> Iterator[Services]:
    services = build_services(settings, clock=clock)
    yield services
    services.engine.dispose()


@pytest.fixture
def metrics(services: Services) -> Iterator[MetricsServer]:
    server = start_metrics("127.0.0.1:0", services, overdue_after=timedelta(seconds=30),
                           timers=set)
    assert server is not None
    yield server
    server.stop()


def alerts(services: Services, kind: str) -> list[OutboxMessage]:
    with services.sessions() as session:
        rows = session.scalars(select(OutboxMessage).where(OutboxMessage.purpose == "alert")
                               .order_by(OutboxMessage.id))
        return [r for r in rows if json.loads(r.details or "{}").get("kind") == kind]


# -- /metrics ------------------------------------------------------------------------
def test_metrics_while_queued_then_published(services: Services, settings: Settings,
                                             clock: FakeClock, metrics: MetricsServer,
                                             bundle: Path) -> None:
    before = scrape(metrics)
    assert value(before, "embargo_database_up") == 1
    assert value(before, "embargo_releases", state="queued") == 0
    assert value(before, "embargo_next_embargo_seconds") is None

    release = queue_seed(services, bundle)
    queued = scrape(metrics)
    assert value(queued, "embargo_releases", state="queued") == 1
    assert value(queued, "embargo_releases", state="published") == 0
    assert value(queued, "embargo_next_embargo_seconds") == 600
    assert value(queued, "embargo_publication_lateness_seconds_count") == 0
    assert value(queued, "embargo_releases_overdue") == 0
    assert value(queued, "embargo_releases_unscheduled") == 0  # ten minutes away
    assert value(queued, "embargo_copies_pending") == 0  # issued by the scheduler, later
    clock.set(SEED_INSTANT - timedelta(seconds=30))
    assert value(scrape(metrics), "embargo_releases_unscheduled") == 1  # no timer here

    late = SEED_INSTANT + timedelta(milliseconds=40)
    clock.set(late)
    publisher = Publisher(services, load_private_key(settings.keys_dir), claimant="n1")
    assert publisher.publish(release.id).status == "published"
    after = scrape(metrics)
    assert value(after, "embargo_releases", state="queued") == 0
    assert value(after, "embargo_releases", state="published") == 1
    assert value(after, "embargo_next_embargo_seconds") is None
    assert value(after, "embargo_publication_lateness_seconds_count") == 1
    assert value(after, "embargo_publication_lateness_seconds_bucket", le="0.025") == 0
    assert value(after, "embargo_publication_lateness_seconds_bucket", le="0.05") == 1
    assert value(after, "embargo_publication_lateness_seconds_sum") == pytest.approx(0.04)
    assert value(after, "embargo_documents_published_total") == 4
    assert value(after, "embargo_notices", status="pending") == 4  # 3 officers + the owner
    assert value(after, "embargo_relay_backlog_age_seconds") == 0
    clock.set(late + timedelta(seconds=5))
    assert value(scrape(metrics), "embargo_relay_backlog_age_seconds") == 5
    with services.sessions.begin() as session:  # one given up after retrying, one refused
        first, second = session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)
                                        .limit(2)).all()
        first.given_up_at = second.given_up_at = second.failed_at = clock.now()
    counted = scrape(metrics)
    assert [value(counted, "embargo_notices", status=s)
            for s in ("pending", "delivered", "given_up", "failed")] == [2, 0, 1, 1]


def test_rehearsal_result_and_node_skew_are_on_the_metrics(
        services: Services, settings: Settings, clock: FakeClock, metrics: MetricsServer,
        bundle: Path) -> None:
    release = queue_seed(services, bundle)
    now = clock.now()
    live_node(services, now, name="node-a")
    Rehearser(services, load_private_key(settings.keys_dir)).rehearse(release.id, now=now)
    samples = scrape(metrics)
    assert value(samples, "embargo_rehearsal_ready", release=release.id) == 1
    assert value(samples, "embargo_node_clock_skew_seconds", node="node-a") == 0.0004
    Rehearser(services, X25519PrivateKey.generate()).rehearse(release.id, now=now + US)
    assert value(scrape(metrics), "embargo_rehearsal_ready", release=release.id) == 0


# -- overdue ----------------------------------------------------------------------------
def test_overdue_alert_at_its_boundary_once_then_repeated(services: Services,
                                                          settings: Settings,
                                                          bundle: Path) -> None:
    queue_seed(services, bundle)
    ops = Operations(services, Rehearser(services, load_private_key(settings.keys_dir)),
                     node="n1", leads=(), overdue_after=timedelta(seconds=30))
    due = SEED_INSTANT + timedelta(seconds=30)
    ops.run_once(due - US)
    assert alerts(services, "overdue") == []
    ops.run_once(due)
    first = alerts(services, "overdue")
    assert sorted(m.to_addr for m in first) == [ALERTS_TO, OWNER]
    assert "OVERDUE: Core business" in (first[0].details or "")
    ops.run_once(due + timedelta(minutes=14))
    assert len(alerts(services, "overdue")) == 2  # once, while within alerts.repeat
    ops.run_once(due + timedelta(minutes=15))
    assert len(alerts(services, "overdue")) == 4  # told again: it still has not gone
    with services.sessions() as session:
        assert session.scalars(select(Release.state)).one() == "queued"


def test_every_node_stopped_across_the_instant(data_dir: Path, tmp_path: Path) -> None:
    """Real time: no node runs across the instant; the gauge is 1; a node
    started later tells alerts.to once, publishes it late, and the gauge is 0."""
    settings = load_settings(environ={}, overrides={
        "data_dir": str(data_dir), "alerts.to": [ALERTS_TO], "alerts.overdue_after": "1s",
        "metrics.bind": "127.0.0.1:0", "scheduler.poll_seconds": 0.1,
        "rehearsal.before": []})
    keyfile.init_keys(settings.keys_dir)
    services = build_services(settings)
    try:
        instant = (datetime.now(UTC) + timedelta(seconds=2)).replace(microsecond=0)
        release = ReleaseService(services, actor="comms").queue(load_manifest(
            write_bundle(tmp_path / "b"), publish_on=instant.isoformat()))
        outside = start_metrics("127.0.0.1:0", services, overdue_after=timedelta(seconds=1))
        assert outside is not None
        try:
            assert value(scrape(outside), "embargo_releases_overdue") == 0
            assert wait_until(lambda: value(scrape(outside), "embargo_releases_overdue") == 1,
                              10)
            stop = threading.Event()
            node = start_node(settings, services, stop)
            try:
                assert node.metrics is not None
                assert wait_until(lambda: ReleaseService(services, actor="t").get(
                    release.id).state == PUBLISHED, 15)
                assert value(scrape(node.metrics), "embargo_releases_overdue") == 0
                assert value(scrape(outside), "embargo_releases_overdue") == 0
                assert value(scrape(node.metrics),
                             "embargo_publication_lateness_seconds_bucket", le="1.0") == 0
                outbox = settings.outbox_dir

                def alert_files() -> list[str]:
                    return sorted(p.read_text().split("\nTo: ", 1)[1].split("\n", 1)[0]
                                  for p in outbox.glob("*.alert-*.eml"))

                assert wait_until(lambda: len(alert_files()) == 2, 10)
                assert alert_files() == [ALERTS_TO, OWNER]
            finally:
                node.shutdown()
            node = start_node(settings, services, threading.Event())  # and again: no repeat
            node.shutdown()
            assert alert_files() == [ALERTS_TO, OWNER]
            assert len(alerts(services, "overdue")) == 2
            with services.sessions() as session:
                raised = [e.seq for e in session.scalars(select(AuditEvent).where(
                    AuditEvent.action == "alert_raised"))]
                published = session.scalars(select(AuditEvent.seq).where(
                    AuditEvent.action == "release_published")).one()
            assert len(raised) == 1 and raised[0] < published  # told before it went
        finally:
            outside.stop()
    finally:
        services.engine.dispose()


# -- /healthz ---------------------------------------------------------------------------
def test_ready_reports_a_dropped_postgres_database_and_recovers(data_dir: Path,
                                                                 pg_url: str) -> None:
    settings = load_settings(environ={}, overrides={"data_dir": str(data_dir),
                                                    "database.url": pg_url})
    keyfile.init_keys(settings.keys_dir)
    services = build_services(settings, migrate_schema=True)
    server = start_metrics("127.0.0.1:0", services, overdue_after=timedelta(seconds=30))
    assert server is not None
    base = f"http://{server.address}"
    name = pg_url.rsplit("/", 1)[1]
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        status, body = get(f"{base}/healthz/ready")
        assert status == 200, body
        assert json.loads(body) == {"ready": True, "failed": [], "checks": {
            "database": "ok", "vault": "ok", "public": "ok", "key": "ok"}}

        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        status, body = get(f"{base}/healthz/ready")
        assert status == 503
        report = json.loads(body)
        assert report["ready"] is False and report["failed"] == ["database"]
        assert name in report["checks"]["database"]
        assert get(f"{base}/healthz/live")[0] == 200
        assert value(scrape(server), "embargo_database_up") == 0

        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        assert wait_until(lambda: get(f"{base}/healthz/ready")[0] == 200, 10)
    finally:
        server.stop()
        services.engine.dispose()
        admin.dispose()


def test_ready_names_a_missing_key_and_an_unusable_public_folder(
        services: Services, settings: Settings, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    broken = dataclasses.replace(services, keys_dir=tmp_path / "no-keys",
                                 public=LocalPublicTarget(blocker / "public"))
    server = start_metrics("127.0.0.1:0", broken, overdue_after=timedelta(seconds=30))
    assert server is not None
    try:
        status, body = get(f"http://{server.address}/healthz/ready")
    finally:
        server.stop()
    assert status == 503 and json.loads(body)["failed"] == ["key", "public"]


def test_metrics_port_taken_is_not_fatal(services: Services,
                                         caplog: pytest.LogCaptureFixture) -> None:
    first = start_metrics("127.0.0.1:0", services, overdue_after=timedelta(seconds=30))
    assert first is not None
    try:
        with caplog.at_level(logging.ERROR):
            assert start_metrics(first.address, services,
                                 overdue_after=timedelta(seconds=30)) is None
        assert "cannot serve metrics" in caplog.text
    finally:
        first.stop()
    assert start_metrics(None, services, overdue_after=timedelta(seconds=30)) is None


# -- the dead man's switch -----------------------------------------------------------------
class PingServer:
    def __init__(self, port: int) -> None:
        self.pings: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                owner.pings.append(self.headers.get("User-Agent", ""))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_heartbeat_pings_and_carries_on_while_the_service_is_down() -> None:
    port = free_port()
    server = PingServer(port)
    beat = Heartbeat(f"http://127.0.0.1:{port}/ping/abc", every=1, timeout=0.5, node="n1")
    beat.every = 0.05  # the setting's floor is 1 s; the test need not wait that long
    beat.start()
    try:
        assert wait_until(lambda: len(server.pings) >= 3, 5)
        assert server.pings[0] == "embargo-heartbeat/n1"
        server.stop()
        failed = beat.failed
        assert wait_until(lambda: beat.failed >= failed + 3, 5)
        assert beat._thread is not None and beat._thread.is_alive()
        server = PingServer(port)
        assert wait_until(lambda: len(server.pings) >= 2, 5)
    finally:
        beat.stop()
        server.stop()


def test_heartbeat_is_withheld_while_the_node_cannot_publish() -> None:
    port = free_port()
    server = PingServer(port)
    healthy = threading.Event()
    beat = Heartbeat(f"http://127.0.0.1:{port}/ping", every=1, timeout=0.5,
                     healthy=healthy.is_set)
    beat.every = 0.05
    beat.start()
    try:
        assert wait_until(lambda: beat.skipped >= 3, 5)
        assert server.pings == []
        healthy.set()
        assert wait_until(lambda: len(server.pings) >= 2, 5)
    finally:
        beat.stop()
        server.stop()


def test_ready_names_a_private_key_that_does_not_match_the_public_one(
        services: Services, settings: Settings) -> None:
    from release.keys import PRIVATE_NAME

    other = settings.keys_dir.parent / "other-keys"
    keyfile.init_keys(other)
    (settings.keys_dir / PRIVATE_NAME).write_bytes((other / PRIVATE_NAME).read_bytes())
    server = start_metrics("127.0.0.1:0", services, overdue_after=timedelta(seconds=30))
    assert server is not None
    try:
        status, body = get(f"http://{server.address}/healthz/ready")
    finally:
        server.stop()
    report = json.loads(body)
    assert status == 503 and report["failed"] == ["key"]
    assert "does not match publisher.pub" in report["checks"]["key"]


def test_node_with_its_heartbeat_service_down_still_publishes(data_dir: Path,
                                                              tmp_path: Path) -> None:
    settings = load_settings(environ={}, overrides={
        "data_dir": str(data_dir), "metrics.bind": "",
        "alerts.heartbeat_url": f"http://127.0.0.1:{free_port()}/ping",
        "alerts.heartbeat_every": 1, "scheduler.poll_seconds": 0.1})
    keyfile.init_keys(settings.keys_dir)
    services = build_services(settings)
    node = start_node(settings, services, threading.Event())
    try:
        assert node.metrics is None and node.heartbeat is not None
        instant = (datetime.now(UTC) + timedelta(seconds=2)).replace(microsecond=0)
        release = ReleaseService(services, actor="comms").queue(load_manifest(
            write_bundle(tmp_path / "b"), publish_on=instant.isoformat()))
        assert wait_until(lambda: ReleaseService(services, actor="t").get(
            release.id).state == PUBLISHED, 15)
        assert node.heartbeat.failed >= 1 and node.heartbeat.sent == 0
    finally:
        node.shutdown()
        services.engine.dispose()



# -- logs for machines ----------------------------------------------------------------------
def test_json_logs_one_object_a_line_with_release_node_and_event(
        settings: Settings, services: Services, bundle: Path) -> None:
    release = queue_seed(services, bundle)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBARGO_")}
    env.update({"EMBARGO_LOG_FORMAT": "json", "EMBARGO_ALERTS_TO": ALERTS_TO,
                "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "-v", "--data-dir",
                           str(settings.data_dir), "rehearse", release.id],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 11  # no node is running: the nodes check fails
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert lines, done.stderr
    rehearsal = [x for x in lines if x["event"].startswith("rehearsal of %s")]
    assert len(rehearsal) == 1
    assert rehearsal[0]["release"] == release.id and rehearsal[0]["level"] == "error"
    assert re.fullmatch(rf"{re.escape(socket.gethostname())}:\d+", rehearsal[0]["node"])
    assert "FAIL nodes" in rehearsal[0]["message"]
    assert all({"at", "level", "logger", "node", "event", "message"} <= set(x) for x in lines)
    plain = subprocess.run([sys.executable, "-m", "jobs.cli", "-v", "--data-dir",
                            str(settings.data_dir), "rehearse", release.id],
                           env={**env, "EMBARGO_LOG_FORMAT": "text"}, capture_output=True,
                           text=True, timeout=60)
    assert "rehearsal of" in plain.stderr and not plain.stderr.startswith("{")


def test_skewed_clock_is_told_per_release_at_risk_once(services: Services, settings: Settings,
                                                       bundle: Path, tmp_path: Path) -> None:
    soon = queue_seed(services, bundle)
    far = ReleaseService(dataclasses.replace(services, clock=FakeClock(
        SEED_INSTANT - timedelta(days=3))), actor="comms").queue(load_manifest(
            write_bundle(tmp_path / "far"), publish_on="2014-09-06"))  # beyond 24 h
    ok = [True]
    ops = Operations(services, Rehearser(services, load_private_key(settings.keys_dir)),
                     node="n1", leads=(), overdue_after=timedelta(seconds=30),
                     clock_ok=lambda: ok[0], skew_ms=lambda: 812.0)
    now = SEED_INSTANT - timedelta(hours=2)
    ops.run_once(now)
    assert alerts(services, "clock_skewed") == []
    ok[0] = False
    ops.run_once(now)
    ops.run_once(now + timedelta(seconds=5))
    told = alerts(services, "clock_skewed")
    assert sorted(m.to_addr for m in told) == [ALERTS_TO, OWNER]
    assert {m.release_id for m in told} == {soon.id} and far.id != soon.id
    assert "+812 ms off" in (told[0].details or "")


def test_example_alert_rules_use_the_metrics_served(services: Services, metrics: MetricsServer,
                                                    bundle: Path) -> None:
    """Every metric an example rule names is served (with a node and a
    rehearsal, so the labelled gauges have a sample)."""
    import yaml

    rules_file = Path(__file__).resolve().parent.parent / "config" / "embargo.rules.yml"
    rules = yaml.safe_load(rules_file.read_text())["groups"][0]["rules"]
    used = {name for rule in rules for name in re.findall(r"\bembargo_[a-z_]+", rule["expr"])}
    release = queue_seed(services, bundle)
    live_node(services, services.clock.now())
    Rehearser(services, X25519PrivateKey.generate()).rehearse(release.id,
                                                              now=services.clock.now())
    served = {name for name, _labels in scrape(metrics)}
    assert used and used <= served, used - served
    assert {"EmbargoReleaseOverdue", "EmbargoReleaseUnscheduled", "EmbargoRehearsalFailed",
            "EmbargoClockSkew"} <= {rule["alert"] for rule in rules}


def test_operations_settings_are_validated() -> None:
    from config.errors import ConfigError

    base = load_settings(environ={})
    assert base.rehearsal.before == (timedelta(hours=1),)
    assert base.metrics.bind == "127.0.0.1:9464" and base.log.format == "text"
    assert base.alerts.overdue_after == timedelta(seconds=30)
    both = load_settings(environ={"EMBARGO_REHEARSAL_BEFORE": "1h, 24h",
                                  "EMBARGO_REHEARSAL_MAIL_PASSED": "false",
                                  "EMBARGO_METRICS_BIND": ""})
    assert both.rehearsal.before == (timedelta(hours=24), timedelta(hours=1))
    assert both.rehearsal.mail_passed is False and both.metrics.bind is None
    assert both.public_dict()["rehearsal.before"] == ["1 day, 0:00:00", "1:00:00"]
    for key, bad, words in (("rehearsal.before", "soon", "not a duration"),
                            ("metrics.bind", "9464", "not host:port"),
                            ("log.format", "xml", "not one of text, json"),
                            ("alerts.heartbeat_url", "ftp://x", "not an http.s. URL"),
                            ("rehearsal.mail_passed", "perhaps", "not true or false")):
        with pytest.raises(ConfigError, match=f"setting {key} .*{words}"):
            load_settings(environ={}, overrides={key: bad})


def test_a_live_node_rehearses_once_holds_the_timer_and_not_again_after_restart(
        data_dir: Path, tmp_path: Path) -> None:
    settings = load_settings(environ={}, overrides={
        "data_dir": str(data_dir), "alerts.to": [ALERTS_TO], "metrics.bind": "127.0.0.1:0",
        "scheduler.poll_seconds": 0.1})
    keyfile.init_keys(settings.keys_dir)
    services = build_services(settings)
    instant = (datetime.now(UTC) + timedelta(seconds=40)).replace(microsecond=0)
    release = ReleaseService(services, actor="comms").queue(load_manifest(
        write_bundle(tmp_path / "b"), publish_on=instant.isoformat()))

    def recorded() -> list[tuple[int | None, bool]]:
        with services.sessions() as session:
            return [(r.lead_seconds, r.ready) for r in session.scalars(select(Rehearsal))]

    try:
        node = start_node(settings, services, threading.Event())
        try:
            assert wait_until(lambda: recorded() == [(3600, True)], 10), recorded()
            assert node.metrics is not None
            samples = scrape(node.metrics)
            assert value(samples, "embargo_rehearsal_ready", release=release.id) == 1
            assert value(samples, "embargo_releases_unscheduled") == 0  # this node has it
        finally:
            node.shutdown()
        node = start_node(settings, services, threading.Event())
        time.sleep(2)  # a few passes of the operations loop
        node.shutdown()
        assert recorded() == [(3600, True)]
        assert len(alerts(services, "rehearsal_passed")) == 2  # the owner and alerts.to
        with services.sessions() as session:
            assert session.scalars(select(Release.state)).one() == "queued"
    finally:
        services.engine.dispose()


def test_operations_say_a_lasting_failure_once(services: Services, settings: Settings,
                                               caplog: pytest.LogCaptureFixture) -> None:
    ops = Operations(services, Rehearser(services, load_private_key(settings.keys_dir)),
                     node="n1", leads=(timedelta(hours=1),),
                     overdue_after=timedelta(seconds=30))
    with services.engine.begin() as connection:
        connection.execute(text("DROP TABLE rehearsals"))
    now = SEED_INSTANT
    with caplog.at_level(logging.DEBUG, logger="jobs.operations"):
        for second in range(3):
            ops.run_once(now + timedelta(seconds=second))  # the overdue part still runs
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == ["rehearsals failed; will try again"]
    assert sum("still failing" in r.getMessage() for r in caplog.records) == 2
