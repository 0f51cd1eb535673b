"""Several `embargo run` nodes against one PostgreSQL database: exactly-once
publication, failover when a node dies, clock sanity, and migrations."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import select, text

from config.errors import SchemaError
from config.settings import Settings, load_settings
from jobs.app import build_services
from release import sealing
from release.keys import init_keys, load_private_key, load_public_key
from release.manifest import load_manifest
from release.publishing import Publisher
from release.records import PUBLISHED, AuditEvent, Base, Release
from release.service import ReleaseService, Services, dek_key, document_key
from storage import migrate
from storage.db import make_engine
from tests.conftest import Inbox, free_port, release_row, wait_until, write_bundle

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.postgres


@pytest.fixture
def cluster(data_dir: Path, pg_url: str) -> Iterator[tuple[Settings, Services]]:
    settings = load_settings(environ={}, overrides={"data_dir": str(data_dir),
                                                    "database.url": pg_url})
    init_keys(settings.keys_dir)
    services = build_services(settings, migrate_schema=True)
    yield settings, services
    services.engine.dispose()


class Nodes:
    """`embargo run` processes sharing one database, vault and public folder."""

    def __init__(self, settings: Settings, smtp_port: int) -> None:
        self.settings = settings
        self.env = {**os.environ,
                    "EMBARGO_DATABASE_URL": settings.database_url,
                    "EMBARGO_MAIL_TRANSPORT": "smtp", "EMBARGO_MAIL_SMTP_HOST": "127.0.0.1",
                    "EMBARGO_MAIL_SMTP_PORT": str(smtp_port),
                    "EMBARGO_MAIL_SMTP_SECURITY": "none",
                    "EMBARGO_SCHEDULER_POLL_SECONDS": "0.2"}
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, **env: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobs.cli", "--data-dir", str(self.settings.data_dir), "run"],
            cwd=ROOT, env={**self.env, **env}, text=True, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        self.procs.append(proc)
        assert proc.stderr is not None
        seen: list[str] = []
        for line in proc.stderr:  # log lines (a clock warning, say) may come first
            seen.append(line)
            if "scheduler running" in line:
                break
        else:
            raise AssertionError("node did not start:\n" + "".join(seen))
        # Keep reading, so a chatty node never blocks on a full pipe.
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def smtp() -> Iterator[tuple[int, Inbox]]:
    port = free_port()
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield port, inbox
    controller.stop()


@pytest.fixture
def nodes(cluster: tuple[Settings, Services], smtp: tuple[int, Inbox]) -> Iterator[Nodes]:
    group = Nodes(cluster[0], smtp[0])
    yield group
    group.stop_all()


def queue_at(services: Services, folder: Path, instant: datetime, letters: int = 1) -> Release:
    manifest = write_bundle(folder, letters=letters)
    return ReleaseService(services, actor="comms").queue(
        load_manifest(manifest, publish_on=instant.isoformat()))


def states(services: Services) -> dict[str, str]:
    with services.sessions() as session:
        return {r.id: r.state for r in session.scalars(select(Release))}


def actions(services: Services, release_id: str) -> list[str]:
    with services.sessions() as session:
        return list(session.scalars(select(AuditEvent.action).where(
            AuditEvent.release_id == release_id).order_by(AuditEvent.seq)))


def test_three_nodes_twenty_releases_at_one_instant(cluster: tuple[Settings, Services],
                                                   nodes: Nodes, smtp: tuple[int, Inbox],
                                                   tmp_path: Path) -> None:
    settings, services = cluster
    for _ in range(3):
        nodes.start()
    instant = (datetime.now(UTC) + timedelta(seconds=6)).replace(microsecond=0)
    releases = [queue_at(services, tmp_path / f"r{i}", instant) for i in range(20)]
    ids = {r.id for r in releases}
    assert wait_until(lambda: all(states(services)[i] == PUBLISHED for i in ids), 30)
    _port, inbox = smtp
    # 20 × (one published notice + one owner summary); the embargo was too
    # close for pre-embargo copies (copies.cutoff)
    # close for pre-embargo copies (copies.cutoff); rehearsal notes aside
    def notices() -> list[str]:
        return [m["Message-ID"] for m in inbox.messages if ".alert-" not in m["Message-ID"]]

    assert wait_until(lambda: len(notices()) >= 40, 20)
    time.sleep(1.0)  # anything duplicated would have arrived by now
    message_ids = notices()
    assert len(message_ids) == 40 and len(set(message_ids)) == 40
    claimants = set()
    for release in releases:
        done = release_row(services, release.id)
        assert done.started_at is not None and done.started_at >= instant
        assert actions(services, release.id).count("release_published") == 1
        assert "publication_resumed" not in actions(services, release.id)
        public = settings.public.path
        assert public is not None
        files = sorted(p.name for p in (public / done.slug).iterdir())
        assert files == ["force-1.txt", "manifest.json", "national-report.txt"]
        claimants.add(done.claimant)
    assert len(ReleaseService(services, actor="t").nodes()) == 3
    print(f"releases were published by {len(claimants)} of the 3 nodes")


def test_node_killed_mid_publish_is_taken_over(cluster: tuple[Settings, Services],
                                               nodes: Nodes, tmp_path: Path) -> None:
    settings, services = cluster
    nodes.start()
    nodes.start()
    instant = (datetime.now(UTC) + timedelta(seconds=7)).replace(microsecond=0)
    release = queue_at(services, tmp_path / "r", instant, letters=3)
    # A third node claims first, 2 s before the instant (a publisher may wait
    # up to 5 s for it; the nodes' jobs wake 0.5 s before), and dies after its
    # first document. It has 5 s to start, even on a loaded machine.
    doomed = subprocess.Popen(
        [sys.executable, "-m", "tests.publisher_child", str(settings.data_dir),
         settings.database_url, release.id, "doomed-node", "--kill-after", "1",
         "--lease", "3", "--start-at", str(instant.timestamp() - 2.0)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    doomed.wait(timeout=30)
    died = time.time()
    assert doomed.returncode == -signal.SIGKILL
    with services.sessions() as session:
        taken = session.get(Release, release.id)
        assert taken is not None and taken.claimant == "doomed-node"
    assert wait_until(lambda: states(services)[release.id] == PUBLISHED, 15)
    done = release_row(services, release.id)
    assert done.published_at is not None
    failover = done.published_at.timestamp() - died
    print(f"failover: complete {failover:.2f} s after the publisher died")
    assert failover < 5
    assert done.claimant != "doomed-node"
    acts = actions(services, release.id)
    assert acts.count("release_published") == 1 and "publication_resumed" in acts
    public = settings.public.path
    assert public is not None
    assert len(list((public / done.slug).iterdir())) == 5  # 4 documents + manifest


def test_all_nodes_down_across_the_instant(cluster: tuple[Settings, Services], nodes: Nodes,
                                           tmp_path: Path) -> None:
    _settings, services = cluster
    instant = (datetime.now(UTC) + timedelta(seconds=8)).replace(microsecond=0)
    release = queue_at(services, tmp_path / "r", instant)
    first = nodes.start()
    assert time.time() < instant.timestamp() - 2, "the node took too long to start"
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=15) == 0
    time.sleep(max(0.0, instant.timestamp() + 1.5 - time.time()))
    assert states(services)[release.id] == "queued"
    nodes.start()
    assert wait_until(lambda: states(services)[release.id] == PUBLISHED, 10)
    done = release_row(services, release.id)
    assert done.lateness_ms is not None and done.lateness_ms >= 1500


def test_node_with_a_wrong_clock_neither_publishes_early_nor_blocks(
        cluster: tuple[Settings, Services], nodes: Nodes, tmp_path: Path) -> None:
    settings, services = cluster
    fast = nodes.start(EMBARGO_TESTING_CLOCK_OFFSET_MS="2000")  # 2 s ahead: would be early
    honest = nodes.start()
    instant = (datetime.now(UTC) + timedelta(seconds=4)).replace(microsecond=0)
    release = queue_at(services, tmp_path / "r", instant)
    public = settings.public.path
    assert public is not None
    seen_early = False
    while time.time() < instant.timestamp():
        seen_early = seen_early or any(public.rglob("*.txt"))
        time.sleep(0.005)
    assert not seen_early
    assert wait_until(lambda: states(services)[release.id] == PUBLISHED, 10)
    done = release_row(services, release.id)
    assert done.started_at is not None and done.started_at >= instant
    assert done.claimant is not None and done.claimant.endswith(f":{honest.pid}")
    by_name = {n.name: n for n in ReleaseService(services, actor="t").nodes()}
    fast_row = next(v for k, v in by_name.items() if k.endswith(f":{fast.pid}"))
    assert fast_row.clock_ok is False
    assert isinstance(fast_row.skew_ms, float) and 1900 < fast_row.skew_ms < 2100
    cli = subprocess.run([sys.executable, "-m", "jobs.cli", "--data-dir", str(settings.data_dir),
                          "nodes", "--json"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "EMBARGO_DATABASE_URL": settings.database_url})
    assert cli.returncode == 0, cli.stderr
    assert {n["name"] for n in json.loads(cli.stdout)} == set(by_name)


# -- migrations ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migrations_build_the_schema_the_models_describe(backend: str, tmp_path: Path,
                                                         request: pytest.FixtureRequest) -> None:
    url = (f"sqlite:///{tmp_path / 'm.db'}" if backend == "sqlite"
           else request.getfixturevalue("pg_url"))
    engine = make_engine(url)
    try:
        assert migrate.upgrade(engine) == migrate.head()
        with engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert diff == []
    finally:
        engine.dispose()


def test_a_release_queued_on_the_first_schema_survives_the_upgrade(pg_url: str,
                                                                   data_dir: Path) -> None:
    settings = load_settings(environ={}, overrides={"data_dir": str(data_dir),
                                                    "database.url": pg_url})
    init_keys(settings.keys_dir)
    engine = make_engine(pg_url)
    assert migrate.upgrade(engine, "0001") == "0001"
    # Queue by hand, as the first release of Embargo would have written it.
    from storage.local import LocalVault

    assert settings.vault.path is not None
    vault = LocalVault(settings.vault.path)
    dek = sealing.new_dek()
    vault.put_bytes(dek_key("rel_old"), sealing.seal_dek(dek, load_public_key(settings.keys_dir),
                                                         "rel_old"))
    report = b"An old report, queued before copies existed.\n"
    vault.put_bytes(document_key("rel_old", "doc_old"), sealing.seal_bytes(dek, "doc_old", report))
    import hashlib

    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO releases (id, slug, title, owner, state, instant, zone, wall, "
            "created_at, created_by, revision, attempts) VALUES ('rel_old', 'old', 'Old', NULL,"
            " 'queued', '2014-09-03 23:01:00', 'Europe/London', '2014-09-04T00:01', "
            "'2014-09-01 09:00:00', 'comms', 1, 0)"))
        conn.execute(text(
            "INSERT INTO documents (id, release_id, position, kind, organisation, filename, "
            "content_type, size, sha256) VALUES ('doc_old', 'rel_old', 0, 'report', NULL, "
            f"'report.txt', 'text/plain', {len(report)}, '{hashlib.sha256(report).hexdigest()}')"))
        conn.execute(text(
            "INSERT INTO recipients (id, release_id, position, name, email, organisation) "
            "VALUES ('rcp_old', 'rel_old', 0, 'Officer', 'o@force.example', 'Force')"))
    engine.dispose()
    with pytest.raises(SchemaError, match="schema is at 0001"):
        build_services(settings)  # an old schema is refused unless asked to migrate
    services = build_services(settings, migrate_schema=True)  # upgrades to the latest schema
    try:
        assert migrate.current(services.engine) == migrate.head()
        old = release_row(services, "rel_old")
        assert old.state == "queued" and old.copies_at is None
        assert old.instant == datetime(2014, 9, 3, 23, 1, tzinfo=UTC)
        publisher = Publisher(services, load_private_key(settings.keys_dir), claimant="n")
        assert publisher.publish("rel_old").status == "published"
        assert settings.public.path is not None
        assert (settings.public.path / "old" / "report.txt").read_bytes() == report
    finally:
        services.engine.dispose()


def test_the_head_constant_matches_the_migration_scripts() -> None:
    assert migrate.head() == migrate.scripts_head()


def test_concurrent_upgrades_from_several_nodes(pg_url: str, tmp_path: Path) -> None:
    """Three nodes starting at once on an empty database: one migrates, the
    others wait for it and find the schema current."""
    procs = [subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "--data-dir", str(tmp_path), "db", "upgrade"],
        cwd=ROOT, env={**os.environ, "EMBARGO_DATABASE_URL": pg_url}, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], results
    head = migrate.head()
    assert all(out.strip().endswith(f"-> {head} (latest {head})") for out, _ in results), results
    engine = make_engine(pg_url)
    try:
        assert migrate.current(engine) == migrate.head()
    finally:
        engine.dispose()
