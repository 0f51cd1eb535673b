"""The publication side: never early, on time, late rather than never,
exactly once. The embargo instant is the seed's: 00:01 BST Thursday
4 September 2014, i.e. 2014-09-03T23:01:00Z.

Tests marked ``BOTH_BACKENDS`` run twice: with the vault and the public
target in local folders, and in two buckets on the S3 test server (moto's
server mode, see tests/s3server.py), publisher children included. What is
public is always read back from the store itself."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest
from apscheduler.events import EVENT_JOB_MAX_INSTANCES
from freezegun import freeze_time
from sqlalchemy import func, select

from config.settings import Settings, load_settings
from jobs.app import build_services
from jobs.mail import FileMailTransport
from jobs.relay import OutboxRelay
from jobs.scheduler import EmbargoScheduler
from release.clock import Clock
from release.keys import init_keys, load_private_key
from release.manifest import load_manifest
from release.publishing import Outcome, Publisher
from release.records import PUBLISHED, OutboxMessage, Release
from release.service import ReleaseService, Services
from tests.conftest import MARKER, SEED_INSTANT, FakeClock, release_row, write_bundle
from tests.s3server import REGION, client_for

if TYPE_CHECKING:
    from tests.s3server import Buckets

ROOT = Path(__file__).resolve().parent.parent
JUST_BEFORE = SEED_INSTANT - timedelta(microseconds=1)
CACHE_CONTROL = "public, max-age=300"  # the s3.cache_control default
BOTH_BACKENDS = pytest.mark.parametrize("backend", ["folder", "s3"], indirect=True)


# -- where the vault and the public target live ----------------------------------------
@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """``folder`` (the embedded default), or ``s3`` for tests marked BOTH_BACKENDS."""
    return str(getattr(request, "param", "folder"))


@pytest.fixture
def storage_overrides(backend: str, request: pytest.FixtureRequest,
                      monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """The settings that put the vault and the public target on ``backend``.
    For S3: two fresh buckets on the test server, and credentials only from
    the environment, as in production (children inherit them)."""
    if backend == "folder":
        return {}
    endpoint: str = request.getfixturevalue("s3_server")
    buckets: Buckets = request.getfixturevalue("s3_buckets")
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return {"storage.vault": f"s3://{buckets.vault}/vault",
            "storage.public": f"s3://{buckets.public}/releases",
            "s3.endpoint_url": endpoint, "s3.addressing_style": "path", "s3.region": REGION}


def make_settings(data_dir: Path, storage_overrides: dict[str, str], **overrides: str) -> Settings:
    settings = load_settings(environ={}, overrides={"data_dir": str(data_dir),
                                                    **storage_overrides, **overrides})
    kind = "s3" if storage_overrides else "folder"
    assert settings.vault.kind == settings.public.kind == kind
    init_keys(settings.keys_dir)
    return settings


@pytest.fixture
def settings(data_dir: Path, storage_overrides: dict[str, str]) -> Settings:
    return make_settings(data_dir, storage_overrides)


@functools.cache
def _reader(endpoint: str) -> Any:
    """A client of the test's own, apart from the one the services use."""
    return client_for(endpoint)


def bucket_objects(settings: Settings, bucket: str) -> dict[str, bytes]:
    """Every object in ``bucket``, listed and fetched through boto3."""
    client = _reader(settings.s3.endpoint_url)
    objects: dict[str, bytes] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", ()):
            body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"]
            objects[str(item["Key"])] = body.read()
    return objects


def queue_seed(services: Services, bundle: Path, **kw: str) -> Release:
    """Queue the bundle for the seed instant, as if on 1 September 2014."""
    queuing = dataclasses.replace(services, clock=FakeClock(datetime(2014, 9, 1, tzinfo=UTC)))
    return ReleaseService(queuing, actor="comms").queue(load_manifest(bundle, **kw))


def public_files(settings: Settings) -> dict[str, bytes]:
    """What the public can read, as {key under the public location: bytes},
    read from the store: the folder, or the public bucket through boto3."""
    location = settings.public
    if location.kind == "s3":
        for fallback in ("vault", "public"):  # nothing went to the embedded default
            assert not (settings.data_dir / fallback).exists()
        objects = bucket_objects(settings, location.bucket)
        assert all(key.startswith(location.prefix) for key in objects), sorted(objects)
        return {key.removeprefix(location.prefix): data for key, data in objects.items()}
    root = location.path
    assert root is not None
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and ".staging" not in p.parts}


def public_url(settings: Settings, key: str) -> str:
    """Where the public reads ``key``: a file: URL, or the object's
    path-style URL on the S3 endpoint (no public_base_url is set)."""
    location = settings.public
    if location.kind == "s3":
        return f"{settings.s3.endpoint_url}/{location.bucket}/{location.prefix}{key}"
    assert location.path is not None
    return (location.path / key).resolve().as_uri()


def outbox_rows(services: Services) -> list[OutboxMessage]:
    """The publication notices (not pre-embargo copies)."""
    with services.sessions() as session:
        return list(session.scalars(select(OutboxMessage).where(
            OutboxMessage.purpose.in_(("published", "owner_summary")))
            .order_by(OutboxMessage.id)))


def check_published(settings: Settings, services: Services, release_id: str) -> Release:
    """Every document public with the right bytes, a right manifest, one
    notice per officer and one for the owner."""
    release = release_row(services, release_id)
    assert release.state == PUBLISHED
    files = public_files(settings)
    for doc in release.documents:
        key = f"{release.slug}/{doc.filename}"
        data = files[key]
        assert hashlib.sha256(data).hexdigest() == doc.sha256
        assert doc.published_at is not None
        assert doc.public_url == public_url(settings, key)
        if settings.public.kind == "s3":
            head = _reader(settings.s3.endpoint_url).head_object(
                Bucket=settings.public.bucket, Key=settings.public.prefix + key)
            assert head["ContentType"] == doc.content_type
            assert head["CacheControl"] == CACHE_CONTROL
    manifest = json.loads(files[f"{release.slug}/manifest.json"])
    assert manifest["embargo"]["utc"] == "2014-09-03T23:01:00Z" or release.instant != SEED_INSTANT
    assert [d["name"] for d in manifest["documents"]] == [d.filename for d in release.documents]
    assert [d["sha256"] for d in manifest["documents"]] == [d.sha256 for d in release.documents]
    assert [d["url"] for d in manifest["documents"]] == [d.public_url for d in release.documents]
    assert len(files) == len(release.documents) + 1
    rows = [r for r in outbox_rows(services) if r.release_id == release_id]
    assert sorted(r.to_addr for r in rows) == sorted(
        [r.email for r in release.recipients] + [release.owner or ""])
    return release


@pytest.fixture
def publisher(settings: Settings, services: Services) -> Publisher:
    return Publisher(services, load_private_key(settings.keys_dir), claimant="test-node")


# -- never early, called directly ----------------------------------------------------
@BOTH_BACKENDS
def test_seed_instant_direct(settings: Settings, services: Services, publisher: Publisher,
                             bundle: Path) -> None:
    release = queue_seed(services, bundle)
    assert release.instant == SEED_INSTANT
    with freeze_time(JUST_BEFORE) as frozen:
        outcome = publisher.publish(release.id)
        assert outcome.status == "not_yet"
        assert public_files(settings) == {}
        assert outbox_rows(services) == []
        assert release_row(services, release.id).state == "queued"
        frozen.move_to(SEED_INSTANT)
        outcome = publisher.publish(release.id)
    assert outcome.status == "published"
    assert outcome.lateness_ms == 0
    check_published(settings, services, release.id)
    # A second call does nothing: published once.
    with freeze_time(SEED_INSTANT + timedelta(seconds=1)):
        assert publisher.publish(release.id).status == "inactive"
    assert len(outbox_rows(services)) == 4


def test_too_early_by_clock_is_refused_even_inside_the_wait(
        settings: Settings, services: Services, bundle: Path) -> None:
    """A publisher whose clock says 1 µs early waits; one that is told it
    may not wait does nothing at all."""
    release = queue_seed(services, bundle)
    clock = FakeClock(JUST_BEFORE)
    stop = threading.Event()
    stop.set()  # a stopping publisher gives its claim back instead of waiting
    early = Publisher(dataclasses.replace(services, clock=clock),
                      load_private_key(settings.keys_dir), claimant="early", stop=stop)
    outcome = early.publish(release.id, wait_up_to=timedelta(seconds=5))
    assert outcome.status == "not_yet"
    assert public_files(settings) == {}
    after = release_row(services, release.id)
    assert after.state == "queued" and after.claimant is None


# -- never early, through a live scheduler -------------------------------------------
@BOTH_BACKENDS
def test_seed_instant_live_scheduler(settings: Settings, services: Services,
                                     publisher: Publisher, bundle: Path) -> None:
    release = queue_seed(services, bundle)
    relay = OutboxRelay(services, FileMailTransport(settings.outbox_dir), sender="e@x.example",
                        worker="relay")
    with freeze_time(JUST_BEFORE) as frozen:
        scheduler = EmbargoScheduler(services, publisher, relay, poll_seconds=0.05)
        scheduler.start()
        try:
            time.sleep(0.6)  # the job has woken (it is due 0.5 s early) and waits
            assert public_files(settings) == {}
            assert outbox_rows(services) == []
            frozen.move_to(SEED_INSTANT)
            deadline = time.monotonic_ns() + 10 * 10**9
            while time.monotonic_ns() < deadline:
                with services.sessions() as session:
                    delivered = session.scalar(select(func.count()).where(
                        OutboxMessage.delivered_at.is_not(None),
                        OutboxMessage.purpose != "copy"))
                if delivered == 4:
                    break
                time.sleep(0.02)
        finally:
            scheduler.shutdown()
    published = check_published(settings, services, release.id)
    assert published.lateness_ms == 0
    assert len(list(settings.outbox_dir.glob("*.published.*.eml"))) == 3
    assert len(list(settings.outbox_dir.glob("*.owner_summary.*.eml"))) == 1


# -- on time, real clock ----------------------------------------------------------------
def test_real_time_publication_within_100ms(settings: Settings, services: Services,
                                            publisher: Publisher, tmp_path: Path) -> None:
    instant = (datetime.now(UTC) + timedelta(seconds=2)).replace(microsecond=0)
    manifest = write_bundle(tmp_path / "b", publish_on=instant.isoformat())
    release = ReleaseService(services, actor="t").queue(load_manifest(manifest))
    seen: list[float] = []
    scheduler = EmbargoScheduler(services, publisher, None, poll_seconds=0.05,
                                 on_outcome=lambda o: seen.append(time.time()))
    scheduler.start()
    try:
        root = settings.public.path
        assert root is not None
        first_seen = None
        while time.time() < instant.timestamp() + 5 and not seen:
            if first_seen is None and any(root.glob("*/*.txt")):
                first_seen = time.time()
            time.sleep(0.0005)
    finally:
        scheduler.shutdown()
    done = release_row(services, release.id)
    assert done.state == PUBLISHED
    assert done.started_at is not None and done.started_at >= instant
    assert done.lateness_ms is not None and 0 <= done.lateness_ms < 100
    assert first_seen is not None and first_seen >= instant.timestamp()


# -- late rather than never ---------------------------------------------------------------
@BOTH_BACKENDS
def test_restart_across_the_instant(settings: Settings, services: Services,
                                    publisher: Publisher, bundle: Path) -> None:
    release = queue_seed(services, bundle)
    with freeze_time(SEED_INSTANT - timedelta(minutes=5)):
        scheduler = EmbargoScheduler(services, publisher, None, poll_seconds=0.05)
        scheduler.start()
        time.sleep(0.2)
        scheduler.shutdown()  # down before the instant
    assert public_files(settings) == {}
    again = Publisher(services, load_private_key(settings.keys_dir), claimant="node-2")
    outcomes: list[str] = []
    with freeze_time(SEED_INSTANT + timedelta(minutes=7, seconds=3)):
        scheduler = EmbargoScheduler(services, again, None, poll_seconds=0.05,
                                     on_outcome=lambda o: outcomes.append(o.status))
        scheduler.start()
        deadline = time.perf_counter() + 10
        while not outcomes and time.perf_counter() < deadline:
            time.sleep(0.01)
        scheduler.shutdown()
    assert outcomes == ["published"]
    done = check_published(settings, services, release.id)
    assert done.lateness_ms == 423_000.0  # 7 min 3 s late, recorded
    events = ReleaseService(services, actor="t").get(release.id).events
    assert [e.action for e in events].count("release_published") == 1


# -- crash injection ----------------------------------------------------------------------
def child_command(settings: Settings, release_id: str, name: str, *extra: str) -> list[str]:
    """``python -m tests.publisher_child`` with the test's own settings: every
    one the test gave on the command line goes to the child the same way."""
    given = [f"--setting={key}={settings.values[key]}" for key, source in settings.sources.items()
             if source == "command line" and key not in ("data_dir", "database.url")]
    return [sys.executable, "-m", "tests.publisher_child", str(settings.data_dir),
            settings.database_url, release_id, name, *given, *extra]


def run_child(settings: Settings, release_id: str, name: str,
              *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(child_command(settings, release_id, name, *extra),
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


@BOTH_BACKENDS
@pytest.mark.parametrize("kill_point", ["after", "before-checkpoint"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_crash_after_k_documents_then_resume(settings: Settings, services: Services,
                                             tmp_path: Path, k: int, kill_point: str) -> None:
    manifest = write_bundle(tmp_path / "b", letters=3)  # 4 documents
    release = queue_seed(services, manifest)
    child = run_child(settings, release.id, "doomed", "--kill-after", str(k),
                      "--kill-point", kill_point, "--lease", "30")
    assert child.returncode == -9, child.stderr
    with services.sessions() as session:
        state = session.get(Release, release.id)
        assert state is not None and state.state == "publishing"
    partial = public_files(settings)
    assert 0 < len(partial) <= k
    # Another node resumes once the dead one's lease has lapsed.
    later = FakeClock(datetime.now(UTC) + timedelta(seconds=31))
    resumed = Publisher(dataclasses.replace(services, clock=later),
                        load_private_key(settings.keys_dir), claimant="survivor")
    assert resumed.publish(release.id).status == "published"
    check_published(settings, services, release.id)
    final = public_files(settings)
    for name, data in partial.items():  # nothing rewritten
        assert final[name] == data
    relay = OutboxRelay(dataclasses.replace(services, clock=later),
                        FileMailTransport(settings.outbox_dir), sender="e@x.example",
                        worker="relay")
    assert relay.run_once() == 4
    assert relay.run_once() == 0
    assert len(list(settings.outbox_dir.glob("*.eml"))) == 4
    events = [e.action for e in ReleaseService(services, actor="t").get(release.id).events]
    assert events.count("release_published") == 1
    # The dead publisher had made documents public (before it could record that it had
    # started): the survivor says it resumed, not that it started.
    assert "publication_resumed" in events and "publication_started" not in events


def test_resume_is_refused_while_the_lease_holds(settings: Settings, services: Services,
                                                 bundle: Path) -> None:
    release = queue_seed(services, bundle)
    child = run_child(settings, release.id, "doomed", "--kill-after", "1", "--lease", "30")
    assert child.returncode == -9
    other = Publisher(services, load_private_key(settings.keys_dir), claimant="eager")
    assert other.publish(release.id).status == "not_ours"


# -- racing publishers ----------------------------------------------------------------------
def race(settings: Settings, services: Services, bundle: Path) -> None:
    release = queue_seed(services, bundle)
    procs = [subprocess.Popen(child_command(settings, release.id, f"racer-{i}", "--gate"),
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for proc in procs:  # both are ready to publish (services built), then go together
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n", \
            proc.communicate(timeout=60)
    start = time.time() + 0.2
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(f"{start}\n")
        proc.stdin.flush()
    results = [p.communicate(timeout=60) for p in procs]
    statuses = sorted(out.strip() for out, _ in results)
    assert statuses in (["not_ours", "published"], ["inactive", "published"]), results
    check_published(settings, services, release.id)
    events = [e.action for e in ReleaseService(services, actor="t").get(release.id).events]
    assert events.count("release_published") == 1


@BOTH_BACKENDS
def test_two_publishers_race_sqlite(settings: Settings, services: Services,
                                    bundle: Path) -> None:
    race(settings, services, bundle)


@BOTH_BACKENDS
@pytest.mark.postgres
def test_two_publishers_race_postgres(data_dir: Path, bundle: Path, pg_url: str,
                                      storage_overrides: dict[str, str]) -> None:
    settings = make_settings(data_dir, storage_overrides, **{"database.url": pg_url})
    services = build_services(settings, migrate_schema=True)
    try:
        race(settings, services, bundle)
    finally:
        services.engine.dispose()


# -- no plaintext before, every byte after ------------------------------------------------
@BOTH_BACKENDS
def test_public_target_holds_no_plaintext_before(settings: Settings, services: Services,
                                                 publisher: Publisher, bundle: Path) -> None:
    release = queue_seed(services, bundle)
    with freeze_time(JUST_BEFORE):
        publisher.publish(release.id)
    for path in settings.data_dir.rglob("*"):
        if path.is_file():
            assert MARKER.encode() not in path.read_bytes(), path
    if settings.vault.kind == "s3":
        sealed = bucket_objects(settings, settings.vault.bucket)
        assert len(sealed) == len(release.documents) + 1  # the documents and the sealed key
        for bucket in (settings.vault.bucket, settings.public.bucket):
            for key, data in bucket_objects(settings, bucket).items():
                assert MARKER.encode() not in data, (bucket, key)
    with freeze_time(SEED_INSTANT):
        publisher.publish(release.id)
    assert any(MARKER.encode() in data for data in public_files(settings).values())


def test_clock_is_read_through_clock_object() -> None:
    assert abs((Clock().now() - datetime.now(UTC)).total_seconds()) < 1


# -- a run that overlaps its previous run is not lost ----------------------------------------
def test_a_publish_run_that_overlaps_its_previous_run_is_not_lost(
        settings: Settings, services: Services, publisher: Publisher, bundle: Path) -> None:
    """A sync that re-adds a release's job between the previous run
    forgetting the release and returning used to make APScheduler drop the
    new run ("maximum number of running instances reached"). Each run of an
    instant's job now gets a job of its own, so nothing is dropped; either
    way the release must be published, not left waiting until the next
    restart."""
    release = queue_seed(services, bundle)
    skipped = threading.Event()
    again = threading.Event()  # Event.wait keeps real time under freeze_time
    calls: list[list[str]] = []
    scheduler: EmbargoScheduler

    class NotYetOnce:
        """The real publisher, but its first run ends 'not_yet'; while
        that run is still returning, a sync re-adds the job."""

        stop = publisher.stop
        claimant = publisher.claimant

        def publish_many(self, release_ids: list[str], **kw: Any) -> list[Outcome]:
            calls.append(release_ids)
            if len(calls) == 1:
                return [Outcome(status="not_yet", release_id=r) for r in release_ids]
            again.set()
            return publisher.publish_many(release_ids, **kw)

    def on_outcome(outcome: Outcome) -> None:
        if outcome.status == "not_yet":  # still inside the first run
            scheduler.sync(force=True)

    with freeze_time(SEED_INSTANT + timedelta(seconds=1)):
        scheduler = EmbargoScheduler(services, cast(Publisher, NotYetOnce()), None,
                                     poll_seconds=0.05, on_outcome=on_outcome)
        scheduler.scheduler.add_listener(lambda event: skipped.set(), EVENT_JOB_MAX_INSTANCES)
        scheduler.start()
        try:
            assert again.wait(10), "the release was not scheduled again"
            # shutdown() waits for that run to finish publishing
        finally:
            scheduler.shutdown()
    assert not skipped.is_set()
    assert calls[:2] == [[release.id], [release.id]]
    check_published(settings, services, release.id)


# -- the horizon: timers only for what is due soon ------------------------------------------
def eventually(predicate: Any, tries: int = 200) -> bool:
    """Poll ``predicate`` every 50 ms of real time (freezegun freezes the
    monotonic clocks, not sleep)."""
    for _ in range(tries):
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_a_release_beyond_the_horizon_gets_its_timer_as_the_horizon_reaches_it(
        settings: Settings, services: Services, publisher: Publisher, bundle: Path) -> None:
    release = queue_seed(services, bundle)
    outcomes: list[str] = []
    with freeze_time(SEED_INSTANT - timedelta(hours=2)) as frozen:
        scheduler = EmbargoScheduler(services, publisher, None, poll_seconds=0.05,
                                     horizon=timedelta(hours=1),
                                     on_outcome=lambda o: outcomes.append(o.status))
        try:
            assert scheduler.start() == 1  # known and counted ...
            assert scheduler.doing() == "waiting for 1 release"
            assert scheduler.timer_of(release.id) is None  # ... but no timer yet
            frozen.move_to(SEED_INSTANT - timedelta(minutes=70))
            time.sleep(0.3)  # several polls: nothing changed, nothing due within the hour
            assert scheduler.timer_of(release.id) is None
            frozen.move_to(SEED_INSTANT - timedelta(minutes=40))  # past the half-horizon look
            assert eventually(lambda: scheduler.timer_of(release.id) is not None)
            assert outcomes == []
            frozen.move_to(SEED_INSTANT)
            scheduler.scheduler.wakeup()  # its timer waits in real time: 40 min have "passed"
            assert eventually(lambda: outcomes == ["published"])
        finally:
            scheduler.shutdown()
    assert check_published(settings, services, release.id).lateness_ms == 0
