"""`embargo run` as a user runs it: a subprocess, changed from another
process while it runs, stopped with SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from config.settings import Settings
from release.manifest import load_manifest
from release.records import CANCELLED, PUBLISHED
from release.service import ReleaseService, Services
from tests.conftest import release_row, wait_until, write_bundle

ROOT = Path(__file__).resolve().parent.parent


def embargo(*args: str, data_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "--data-dir", str(data_dir), *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "EMBARGO_SCHEDULER_POLL_SECONDS": "0.2"})


@pytest.fixture
def runner(settings: Settings) -> Iterator[subprocess.Popen[str]]:
    proc = embargo("run", data_dir=settings.data_dir)
    assert proc.stderr is not None
    before = []  # log lines may come first (a rehearsal, a metrics port in use)
    while (line := proc.stderr.readline()) and "scheduler running" not in line:
        before.append(line)
    assert "scheduler running" in line, before
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_cancel_and_reschedule_reach_a_running_scheduler(
        settings: Settings, services: Services, runner: subprocess.Popen[str],
        tmp_path: Path) -> None:
    service = ReleaseService(services, actor="comms")
    instant = (datetime.now(UTC) + timedelta(seconds=4)).replace(microsecond=0)
    doomed = service.queue(load_manifest(write_bundle(tmp_path / "a", letters=1),
                                         publish_on=instant.isoformat()))
    moved = service.queue(load_manifest(write_bundle(tmp_path / "b", letters=1),
                                        publish_on=instant.isoformat()))
    time.sleep(0.5)  # the running scheduler has seen both
    service.cancel(doomed.id, reason="withdrawn")
    new_instant = instant + timedelta(seconds=3)
    service.reschedule(moved.id, publish_on=new_instant.isoformat(), at=None, zone=None)
    # Past the original instant: neither is public.
    time.sleep(max(0.0, instant.timestamp() + 1.0 - time.time()))
    public = settings.public.path
    assert public is not None
    assert not any(public.rglob("*.txt"))
    assert wait_until(lambda: service.get(moved.id).state == PUBLISHED, 10)
    done = release_row(service.s, moved.id)
    assert done.started_at is not None and done.started_at >= new_instant
    assert service.get(doomed.id).state == CANCELLED
    assert not (public / doomed.slug).exists()
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=15) == 0


def test_sigterm_while_waiting_gives_the_claim_back(
        settings: Settings, services: Services, runner: subprocess.Popen[str],
        tmp_path: Path) -> None:
    service = ReleaseService(services, actor="comms")
    instant = (datetime.now(UTC) + timedelta(seconds=2)).replace(microsecond=0)
    release = service.queue(load_manifest(write_bundle(tmp_path / "a", letters=1),
                                          publish_on=instant.isoformat()))
    # The job wakes lead_seconds (0.5 s) early and waits for the instant.
    time.sleep(max(0.0, instant.timestamp() - 0.25 - time.time()))
    runner.send_signal(signal.SIGTERM)
    _, err = runner.communicate(timeout=15)
    assert runner.returncode == 0, err
    assert "Traceback" not in err
    after = release_row(service.s, release.id)
    assert after.state == "queued" and after.claimant is None
    public = settings.public.path
    assert public is not None and not any(public.rglob("*.txt"))


def test_run_without_a_private_key_is_one_clear_error(tmp_path: Path) -> None:
    proc = embargo("run", data_dir=tmp_path / "empty")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert err.strip().count("\n") == 0
    # Never the advice to make a new key: that would orphan every queued release.
    assert "restore it from its backup" in err and "Traceback" not in err
    assert "do not run `embargo keys init`" in err
