"""Keys that cannot be lost by accident, checks that prove something, and
nothing left lying around by a killed queue."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from freezegun import freeze_time
from sqlalchemy import select

from config.errors import InputError, SealError
from config.settings import Settings, load_settings
from jobs.app import build_services
from jobs.cli import main
from release import custody, sealing
from release import keys as keyfile
from release.clock import Clock
from release.manifest import load_manifest
from release.publishing import Publisher
from release.records import PUBLISHED, AuditEvent, Release
from release.service import ReleaseService, Services
from release.vault_keys import dek_key, document_key
from tests.conftest import SEED_INSTANT, write_bundle

ROOT = Path(__file__).resolve().parent.parent
BEFORE = datetime(2014, 9, 1, 12, 0, tzinfo=UTC)


def run_cli(data_dir: Path, *args: str) -> tuple[int, str, str]:
    """``embargo`` in this process (no subprocess start-up per call)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(["--data-dir", str(data_dir), *args])
    return status, out.getvalue(), err.getvalue()


def queued(services: Services, bundle: Path, *, title: str | None = None) -> Release:
    spec = load_manifest(bundle, publish_on="2014-09-04")
    if title:
        spec = dataclasses.replace(spec, title=title)
    with freeze_time(BEFORE):
        return ReleaseService(services, actor="comms").queue(spec)


# -- keys init never destroys what queued releases depend on ------------------------------
def test_keys_init_with_only_the_public_key_refuses_and_keeps_it(
        settings: Settings, services: Services, bundle: Path) -> None:
    queued(services, bundle)
    keys_dir = settings.keys_dir
    (keys_dir / keyfile.PRIVATE_NAME).unlink()  # the secrets mount did not come up
    before = (keys_dir / keyfile.PUBLIC_NAME).read_bytes()
    status, _, err = run_cli(settings.data_dir, "keys", "init")
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "restore it from its backup" in err and "1 release was sealed to it" in err
    status, _, err = run_cli(settings.data_dir, "keys", "init", "--force")
    assert status == 2 and "1 release was sealed to it" in err
    assert (keys_dir / keyfile.PUBLIC_NAME).read_bytes() == before
    assert not (keys_dir / keyfile.PRIVATE_NAME).exists()


def test_keys_init_force_replaces_a_public_key_nothing_depends_on(settings: Settings) -> None:
    keys_dir = settings.keys_dir
    (keys_dir / keyfile.PRIVATE_NAME).unlink()
    before = (keys_dir / keyfile.PUBLIC_NAME).read_bytes()
    status, _, err = run_cli(settings.data_dir, "keys", "init")
    assert status == 2 and "keys init --force" in err
    assert (keys_dir / keyfile.PUBLIC_NAME).read_bytes() == before
    status, _, err = run_cli(settings.data_dir, "keys", "init", "--force")
    assert status == 0, err
    _private, public = keyfile.check_pair(keys_dir)
    assert keyfile.public_pem(public) != before


def test_keys_init_never_overwrites_a_private_key(settings: Settings) -> None:
    keys_dir = settings.keys_dir
    before = (keys_dir / keyfile.PRIVATE_NAME).read_bytes()
    for extra in ((), ("--force",)):
        status, _, err = run_cli(settings.data_dir, "keys", "init", *extra)
        assert status == 2 and "refusing to overwrite" in err
    assert (keys_dir / keyfile.PRIVATE_NAME).read_bytes() == before


# -- keys check and check catch a broken vault ---------------------------------------------
def _flip_byte(services: Services, release: Release) -> None:
    root = services.vault.root  # type: ignore[attr-defined]
    path = root / document_key(release.id, release.documents[1].id)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _delete_document(services: Services, release: Release) -> None:
    services.vault.delete(document_key(release.id, release.documents[2].id))


def _delete_dek(services: Services, release: Release) -> None:
    services.vault.delete(dek_key(release.id))


BROKEN = {"flipped byte": (_flip_byte, "damaged or tampered"),
          "deleted document": (_delete_document, "sealed object is missing"),
          "deleted data key": (_delete_dek, "data key is missing")}


@pytest.mark.parametrize("case", list(BROKEN))
@pytest.mark.parametrize("command", [("keys", "check"), ("check",)])
def test_checks_find_a_broken_vault(settings: Settings, services: Services, bundle: Path,
                                    case: str, command: tuple[str, ...]) -> None:
    release = queued(services, bundle)
    status, out, err = run_cli(settings.data_dir, *command)
    assert status == 0, err
    assert f"release {release.id}: 4 documents, opens and decrypts" in out
    breaks, needle = BROKEN[case]
    breaks(services, release)
    status, out, err = run_cli(settings.data_dir, *command)
    assert status == custody_failed()
    failures = err.strip().splitlines()
    assert len(failures) == 1 and needle in failures[0] and release.id in failures[0]
    status, out, _ = run_cli(settings.data_dir, *command, "--json")
    rows = json.loads(out)
    assert any(not r["ok"] and needle in r["detail"] for r in rows)


def custody_failed() -> int:
    from jobs.cli import CHECK_FAILED

    return CHECK_FAILED


def test_a_sealed_object_of_the_wrong_size_is_found_without_the_private_key(
        settings: Settings, services: Services, bundle: Path) -> None:
    release = queued(services, bundle)
    root = services.vault.root  # type: ignore[attr-defined]
    path = root / document_key(release.id, release.documents[0].id)
    path.write_bytes(path.read_bytes()[:-1])
    findings = custody.check_release(services, release, None)
    assert [f.ok for f in findings] == [False]
    assert "expected" in findings[0].detail


def test_check_fails_without_the_private_key(settings: Settings, services: Services,
                                             bundle: Path) -> None:
    queued(services, bundle)
    (settings.keys_dir / keyfile.PRIVATE_NAME).unlink()
    status, out, err = run_cli(settings.data_dir, "check")
    assert status == custody_failed()
    assert "keys ok" not in out and "restore it from its backup" in err
    # The queued release's objects are still looked at: present, sizes right.
    assert "objects present, sizes match" in out


def test_check_finds_a_full_public_filesystem(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    full = tmp_path / "full"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        data_dir = tmp_path / "var"
        keyfile.init_keys(data_dir / "keys")
        monkeypatch.setenv("EMBARGO_STORAGE_PUBLIC", str(full / "public"))
        status, out, err = run_cli(data_dir, "check")
        assert status == 0, err
        assert "takes a write" in out
        fd = os.open(full / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass  # full
        finally:
            os.close(fd)
        status, out, err = run_cli(data_dir, "check")
        assert status == custody_failed()
        assert err.strip().splitlines() == [
            f"public   FAIL {full / 'public'}: a probe write failed: the probe write was "
            "refused: No space left on device"]  # PublicTarget.probe, as the rehearsal's
        assert not [p for p in (full / "public").rglob("*") if p.is_file()]
    finally:
        subprocess.run(["umount", str(full)], check=False)


# -- rotation -------------------------------------------------------------------------------
def test_rotate_leaves_every_queued_release_publishable_with_the_new_key_only(
        settings: Settings, services: Services, bundle: Path, tmp_path: Path) -> None:
    first = queued(services, bundle)
    second = queued(services, write_bundle(tmp_path / "b2"), title="Second report")
    old_private = keyfile.load_private_key(settings.keys_dir)
    status, out, err = run_cli(settings.data_dir, "keys", "rotate")
    assert status == 0, err
    assert "2 queued release data keys re-sealed" in out
    assert sorted(p.name for p in settings.keys_dir.iterdir()) == [
        keyfile.PRIVATE_NAME, keyfile.PUBLIC_NAME]
    new_private, _ = keyfile.check_pair(settings.keys_dir)
    for release in (first, second):
        with pytest.raises(SealError):  # the old key opens nothing any more
            sealing.open_dek(services.vault.get_bytes(dek_key(release.id)), old_private,
                             release.id)
    with freeze_time(SEED_INSTANT + timedelta(seconds=1)):
        publisher = Publisher(services, new_private, claimant="after-rotation")
        for release in (first, second):
            outcome = publisher.publish(release.id)
            assert outcome.status == "published", outcome
    service = ReleaseService(services, actor="x")
    assert {service.get(r.id).state for r in (first, second)} == {PUBLISHED}
    with services.sessions() as session:
        actions = [e.action for e in session.scalars(select(AuditEvent))]
    assert actions.count("data_key_resealed") == 2 and actions.count("keys_rotated") == 1


def test_rotate_run_again_after_a_stop_half_way_finishes(
        settings: Settings, services: Services, bundle: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    first = queued(services, bundle)
    second = queued(services, write_bundle(tmp_path / "b2"), title="Second report")
    calls = {"n": 0}
    real = services.vault.put_bytes

    def dies_on_second(key: str, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the operator's Ctrl-C, half-way
        real(key, data)

    monkeypatch.setattr(services.vault, "put_bytes", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        custody.rotate(services, settings.keys_dir, actor="ops")
    monkeypatch.setattr(services.vault, "put_bytes", real)
    # Both pairs are still there; the old one still opens the second release.
    assert (settings.keys_dir / "publisher.key.next").exists()
    old = keyfile.load_private_key(settings.keys_dir)
    sealing.open_dek(services.vault.get_bytes(dek_key(second.id)), old, second.id)
    rotation = custody.rotate(services, settings.keys_dir, actor="ops")
    assert rotation.resealed == (second.id,)
    new, _ = keyfile.check_pair(settings.keys_dir)
    for release in (first, second):
        sealing.open_dek(services.vault.get_bytes(dek_key(release.id)), new, release.id)


# -- orphans of a killed queue ---------------------------------------------------------------
def _unnamed_file_of(pid: int, vault: Path) -> int:
    """Bytes in the largest unnamed (O_TMPFILE) file process ``pid`` has open
    in ``vault``: an object being written, with no name until it is whole."""
    largest = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
            if target.startswith(str(vault)) and target.endswith(" (deleted)"):
                largest = max(largest, os.stat(fd).st_size)
        except OSError:
            continue
    return largest


def _kill_a_queue(tmp_path: Path, settings: Settings) -> None:
    """A real `embargo queue` of a small report and a 100 MiB letter,
    SIGKILLed part-way through the letter (the report sealed)."""
    bundle = write_bundle(tmp_path / "big", letters=1, letter_bytes=100 << 20)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBARGO_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "--data-dir",
                             str(settings.data_dir), "queue", str(bundle),
                             "--publish-on", "2099-01-01"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    vault = settings.vault.path
    assert vault is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until the letter's sealing is under way
        if _unnamed_file_of(proc.pid, vault) > (8 << 20):
            break
        time.sleep(0.01)
    else:
        raise AssertionError("the queue never got 8 MiB into the letter")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_a_killed_queue_is_swept_and_a_live_one_is_not(
        settings: Settings, services: Services, tmp_path: Path) -> None:
    _kill_a_queue(tmp_path, settings)
    vault = settings.vault.path
    assert vault is not None
    left = [p for p in vault.rglob("*") if p.is_file()]
    # The letter being written had no name: all that is left is the sealed report.
    assert [p.parent.parent.name for p in left] == ["releases"]
    written = [e.modified for e in services.vault.entries("releases/")]
    assert len(written) == 1
    # Its newest object younger than an hour: it might be a live queue; left alone.
    young = custody.sweep_orphans(services, now=max(written) + timedelta(hours=1)
                                  - timedelta(microseconds=1), actor="ops")
    assert young.objects == 0 and young.kept and young.partials == 0
    assert [p for p in vault.rglob("*") if p.is_file()] == left
    # Exactly an hour later: swept (and no partial file to sweep).
    size = left[0].stat().st_size
    swept = custody.sweep_orphans(services, now=max(written) + timedelta(hours=1), actor="ops")
    assert swept.partials == 0 and (swept.objects, swept.bytes) == (1, size)
    assert len(swept.releases) == 1
    assert [p for p in vault.rglob("*") if p.is_file()] == []
    with services.sessions() as session:
        event = session.scalars(select(AuditEvent).where(
            AuditEvent.action == "orphans_removed")).one()
    details = json.loads(event.details)
    assert details["bytes"] == swept.bytes
    assert details["releases"] == list(swept.releases)


def _queue_held(services: Services, bundle: Path, at: str) -> tuple[
        threading.Thread, threading.Event, list[Release]]:
    """A queue of ``bundle`` in a thread, held inside its progress callback
    when it starts sealing the document ``at`` (the documents before it
    sealed); set the event to let it finish."""
    entered, release_it = threading.Event(), threading.Event()
    results: list[Release] = []

    def progress(name: str, done: int, total: int) -> None:
        if name == at:
            entered.set()
            release_it.wait(30)

    spec = load_manifest(bundle, publish_on="2099-01-01")
    worker = threading.Thread(target=lambda: results.append(
        ReleaseService(services, actor="comms").queue(spec, progress=progress)))
    worker.start()
    assert entered.wait(30)
    return worker, release_it, results


def _let_finish_then_check(settings: Settings, worker: threading.Thread,
                           release_it: threading.Event, results: list[Release]) -> None:
    """Let a queue held by :func:`_queue_held` finish; it queued, and
    `embargo check` finds everything whole."""
    release_it.set()
    worker.join(30)
    assert results
    status, _out, err = run_cli(settings.data_dir, "check")
    assert status == 0, err


def test_sweep_keeps_a_queue_that_is_running(settings: Settings, services: Services,
                                              bundle: Path) -> None:
    """A queue in progress (held inside its progress callback) loses nothing
    to a sweep run meanwhile, even one that thinks an hour has passed for
    the partial files."""
    worker, release_it, results = _queue_held(services, bundle, "force-2.txt")
    swept = custody.sweep_orphans(services, now=services.clock.now(), actor="ops")
    assert swept.objects == 0 and len(swept.kept) == 1
    _let_finish_then_check(settings, worker, release_it, results)
    assert not list(services.vault.keys(custody.PENDING_PREFIX))


def test_sweep_keeps_a_queue_that_started_over_an_hour_ago_and_still_writes(
        settings: Settings, services: Services, bundle: Path) -> None:
    """What counts is how long ago the queue last wrote an object, not when
    it started: a queue that began two hours ago (big documents to a slow
    store) and sealed a document a moment ago keeps every object, and the
    release it then records opens whole."""
    started_early = dataclasses.replace(services, clock=Clock(offset=-timedelta(hours=2)))
    worker, release_it, results = _queue_held(started_early, bundle, "force-2.txt")
    swept = custody.sweep_orphans(services, now=services.clock.now(), actor="ops")
    assert swept.objects == 0 and len(swept.kept) == 1
    _let_finish_then_check(settings, worker, release_it, results)


def test_sweep_judges_a_folder_by_its_newest_object(settings: Settings,
                                                    services: Services) -> None:
    """A row-less release folder is a killed queue's once its newest object
    is an hour old: one old object beside a young one keeps both."""
    vault = settings.vault.path
    assert vault is not None
    now = datetime.now(UTC).replace(microsecond=0)
    for name, age in (("doc_1.emb", timedelta(hours=3)), ("doc_2.emb", timedelta(minutes=5))):
        services.vault.put_bytes(f"releases/rel_x/{name}", b"x" * 100)
        os.utime(vault / "releases" / "rel_x" / name,
                 ns=(int((now - age).timestamp()) * 10**9,) * 2)
    newest = now - timedelta(minutes=5)
    kept = custody.sweep_orphans(services, now=newest + timedelta(hours=1)
                                 - timedelta(microseconds=1), actor="ops")
    assert kept.kept == ("rel_x",) and kept.objects == 0
    assert len(list(services.vault.keys("releases/rel_x/"))) == 2
    swept = custody.sweep_orphans(services, now=newest + timedelta(hours=1), actor="ops")
    assert swept.releases == ("rel_x",) and (swept.objects, swept.bytes) == (2, 200)
    assert list(services.vault.keys("")) == []


# -- read once, seal what was checked --------------------------------------------------------
def test_a_file_truncated_after_validation_is_refused(
        settings: Settings, services: Services, tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "b", report_bytes=b"x" * (3 << 20))
    spec = load_manifest(bundle, publish_on="2099-01-01")
    report = spec.documents[0].path
    with report.open("r+b") as handle:
        handle.truncate(1 << 20)
    with pytest.raises(InputError, match="changed while being queued"):
        ReleaseService(services, actor="comms").queue(spec)
    assert list(services.vault.keys("")) == []
    with services.sessions() as session:
        assert session.scalars(select(Release)).first() is None


# -- slugs under concurrency -------------------------------------------------------------------
@pytest.mark.postgres
def test_six_concurrent_same_title_queues_on_postgresql(pg_url: str, data_dir: Path,
                                                        tmp_path: Path) -> None:
    settings = load_settings(environ={}, overrides={"data_dir": str(data_dir),
                                                    "database.url": pg_url})
    keyfile.init_keys(settings.keys_dir)
    services = build_services(settings, migrate_schema=True)
    try:
        spec = load_manifest(write_bundle(tmp_path / "b"), publish_on="2099-01-01")
        barrier = threading.Barrier(6)
        errors: list[BaseException] = []
        made: list[Release] = []

        def queue_one() -> None:
            service = ReleaseService(services, actor="comms")
            barrier.wait()
            try:
                made.append(service.queue(spec))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=queue_one) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        slugs = sorted(r.slug for r in made)
        base = "2099-01-01-core-business-a-test-inspection"
        assert slugs == sorted([base] + [f"{base}-{n}" for n in range(2, 7)])
    finally:
        services.engine.dispose()


def test_embargo_run_sweeps_old_orphans_at_start(settings: Settings, services: Services,
                                                  bundle: Path) -> None:
    """What a queue killed two hours ago left is gone once `embargo run` has
    started; what a queue writing a minute ago left is not; nor is a
    release's folder that has a row, however old; and a queue marker an
    earlier version left two hours ago goes too."""
    vault = settings.vault.path
    assert vault is not None
    now = datetime.now(UTC)
    recorded = ReleaseService(services, actor="comms").queue(
        load_manifest(bundle, publish_on="2099-01-01"))
    for path in vault.rglob("*"):  # the recorded release's objects: old, not orphans
        os.utime(path, ((now - timedelta(hours=5)).timestamp(),) * 2)
    for release_id, written in (("rel_old", now - timedelta(hours=2)),
                                ("rel_young", now - timedelta(minutes=1))):
        services.vault.put_bytes(f"releases/{release_id}/doc_1.emb", b"x" * 1000)
        os.utime(vault / "releases" / release_id / "doc_1.emb", (written.timestamp(),) * 2)
    services.vault.put_bytes("pending/rel_older.json", b"{}")
    os.utime(vault / "pending" / "rel_older.json", ((now - timedelta(hours=2)).timestamp(),) * 2)
    before = sorted(services.vault.keys(f"releases/{recorded.id}/"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBARGO_")}
    env["PYTHONPATH"] = str(ROOT)
    env["EMBARGO_METRICS_BIND"] = "127.0.0.1:0"  # a port of its own: 9464 may be taken
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "--data-dir",
                             str(settings.data_dir), "run"], env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        first, second = proc.stderr.readline(), proc.stderr.readline()
        assert "Z WARNING release.custody: removed 1 orphaned sealed objects (1000 bytes)" \
            in first, first
        assert "scheduler running" in second, second
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert sorted(services.vault.keys(f"releases/{recorded.id}/")) == before
    left = sorted(k for k in services.vault.keys("")
                  if not k.startswith(f"releases/{recorded.id}/"))
    assert left == ["releases/rel_young/doc_1.emb"]
    with services.sessions() as session:
        event = session.scalars(select(AuditEvent).where(
            AuditEvent.action == "orphans_removed")).one()
    assert json.loads(event.details)["releases"] == ["rel_old"]
    assert json.loads(event.details)["bytes"] == 1000
