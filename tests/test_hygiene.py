"""Nothing sensitive left lying around: file modes, masked passwords, log
timestamps that say their zone, warnings through logging, and no negative
"time left"."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from freezegun import freeze_time

from config.settings import Settings, load_settings, mask_url
from jobs.app import build_services
from jobs.cli import UTCFormatter
from jobs.mail import FileMailTransport
from release.manifest import load_manifest
from release.presenting import time_left
from release.records import PUBLISHING, QUEUED, Release
from release.service import ReleaseService, Services
from release.vault_keys import dek_key
from tests.conftest import write_bundle

ROOT = Path(__file__).resolve().parent.parent


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_database_file_is_0600_in_a_0700_folder(tmp_path: Path) -> None:
    data_dir = tmp_path / "fresh" / "var"
    settings = load_settings(environ={}, overrides={"data_dir": str(data_dir)})
    build_services(settings).engine.dispose()
    assert mode(data_dir / "embargo.db") == 0o600
    assert mode(data_dir) == 0o700
    for extra in data_dir.glob("embargo.db-*"):  # -wal, -shm: SQLite copies the mode
        assert mode(extra) == 0o600


def test_an_existing_world_readable_database_is_tightened(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    (data_dir / "embargo.db").touch(mode=0o644)
    os.chmod(data_dir / "embargo.db", 0o644)
    settings = load_settings(environ={}, overrides={"data_dir": str(data_dir)})
    build_services(settings, migrate_schema=True).engine.dispose()  # as `db upgrade` would
    assert mode(data_dir / "embargo.db") == 0o600


def test_vault_staging_and_outbox_are_private(services: Services, bundle: Path,
                                              tmp_path: Path) -> None:
    release = ReleaseService(services, actor="t").queue(
        load_manifest(bundle, publish_on="2099-01-01"))
    # A replaced object (a re-sealed data key) goes through the vault's staging.
    key = dek_key(release.id)
    services.vault.put_bytes(key, services.vault.get_bytes(key))
    vault = services.vault.root  # type: ignore[attr-defined]
    assert mode(vault / ".staging") == 0o700
    from email.message import Message

    message = Message()
    message["Message-ID"] = "<x@embargo>"
    message.set_payload("hello")
    outbox = tmp_path / "outbox"
    path = Path(FileMailTransport(outbox).send(message))
    assert mode(outbox) == 0o700 and mode(path) == 0o600


@pytest.mark.parametrize("url", [
    "postgresql+psycopg://embargo:hunter2@db/embargo",
    "postgresql+psycopg://embargo@db/embargo?password=hunter2",
    "postgresql+psycopg://embargo@db/embargo?sslmode=require&PASSWORD=hunter2&x=1",
    "postgresql+psycopg:///embargo?host=db&user=embargo&password=hunter2",
    "host=db user=embargo password=hunter2 dbname=embargo",
])
def test_passwords_are_masked_wherever_they_sit(url: str) -> None:
    masked = mask_url(url)
    assert "hunter2" not in masked and "***" in masked
    assert "embargo" in masked


def test_config_show_masks_a_query_password(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBARGO_")}
    env.update(PYTHONPATH=str(ROOT),
               EMBARGO_DATABASE_URL="postgresql+psycopg://embargo@db/x?password=hunter2")
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "--data-dir", str(tmp_path),
                           "config", "show"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "hunter2" not in proc.stdout and "password=***" in proc.stdout


def test_log_timestamps_are_utc_with_z(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        record = logging.LogRecord("embargo", logging.WARNING, __file__, 1, "published", (),
                                   None)
        record.created = datetime(2014, 9, 3, 23, 1, tzinfo=UTC).timestamp()
        record.msecs = 0
        line = UTCFormatter("%(asctime)s %(message)s").format(record)
        assert line == "2014-09-03T23:01:00.000Z published"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_library_warnings_go_through_logging() -> None:
    code = ("from jobs.cli import configure_logging; import logging, warnings; "
            "configure_logging(logging.WARNING); warnings.warn('pypdf says so')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "TZ": "Asia/Tokyo"},
                          timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "WARNING py.warnings:" in lines[0] and "pypdf says so" in lines[0]
    assert lines[0].split(" ")[0].endswith("Z")


# -- no negative time left -------------------------------------------------------------------
INSTANT = datetime(2014, 9, 3, 23, 1, tzinfo=UTC)


def _release(state: str, attempts: int = 0, started_at: datetime | None = None) -> Release:
    return Release(id="rel_1", slug="s", title="t", state=state, instant=INSTANT,
                   zone="Europe/London", wall="2014-09-04T00:01", attempts=attempts,
                   started_at=started_at)


def test_time_left_at_the_boundary() -> None:
    queued = _release(QUEUED)
    assert time_left(queued, INSTANT - timedelta(seconds=1)) == "00:00:01"
    assert time_left(queued, INSTANT) == "00:00:00"
    assert time_left(queued, INSTANT + timedelta(microseconds=1)) == "due since 00:01"


def test_a_retrying_release_says_so() -> None:
    retrying = _release(PUBLISHING, attempts=3, started_at=INSTANT + timedelta(minutes=2))
    assert time_left(retrying, INSTANT + timedelta(minutes=5)) == \
        "retrying since 00:03 (3 attempts)"
    assert time_left(_release(PUBLISHING, attempts=1), INSTANT + timedelta(minutes=5)) == \
        "retrying since 00:01 (1 attempt)"
    assert time_left(_release("failed", attempts=10), INSTANT + timedelta(hours=1)) is None


def test_list_shows_retrying_not_a_negative_time(
        settings: Settings, services: Services, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from sqlalchemy import update

    from jobs.cli import main

    with freeze_time(INSTANT - timedelta(days=2)):
        release = ReleaseService(services, actor="t").queue(
            load_manifest(write_bundle(tmp_path / "b"), publish_on="2014-09-04"))
    with services.sessions.begin() as session:
        session.execute(update(Release).where(Release.id == release.id).values(
            state=PUBLISHING, attempts=2, started_at=INSTANT))
    with freeze_time(INSTANT + timedelta(minutes=3, seconds=28)):
        assert main(["--data-dir", str(settings.data_dir), "list"]) == 0
        assert main(["--data-dir", str(settings.data_dir), "show", release.id]) == 0
    out = capsys.readouterr().out
    assert out.count("retrying since 00:01 (2 attempts)") == 2 and "-00:03:28" not in out
