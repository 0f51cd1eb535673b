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
def _kill_a_queue(tmp_path: Path, settings: Settings) -> None:
    """A real `embargo queue` of a 100 MiB report, SIGKILLed part-way."""
    bundle = write_bundle(tmp_path / "big", report_bytes=os.urandom(1 << 20) * 100)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBARGO_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "--data-dir",
                             str(settings.data_dir), "queue", str(bundle),
                             "--publish-on", "2099-01-01"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    vault = settings.vault.path
    assert vault is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until sealing is under way
        parts = list((vault / ".staging").glob(".part-*")) if (vault / ".staging").is_dir() \
            else []
        if any(p.stat().st_size > (8 << 20) for p in parts):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_a_killed_queue_is_swept_and_a_live_one_is_not(
        settings: Settings, services: Services, tmp_path: Path) -> None:
    _kill_a_queue(tmp_path, settings)
    vault = settings.vault.path
    assert vault is not None
    left = [p for p in vault.rglob("*") if p.is_file()]
    assert any(p.name.startswith(".part-") for p in left)
    assert list(services.vault.keys(custody.PENDING_PREFIX))
    marker = next(iter(services.vault.keys(custody.PENDING_PREFIX)))
    started = datetime.fromisoformat(json.loads(services.vault.get_bytes(marker))["started_at"])
    # Younger than an hour: it might be a live queue; left alone.
    young = custody.sweep_orphans(services, now=started + timedelta(hours=1)
                                  - timedelta(microseconds=1), actor="ops")
    assert young.objects == 0 and young.kept and young.partials == 0
    assert [p for p in vault.rglob("*") if p.is_file()] == left
    # Backdate the partial file as the clock moves on; exactly an hour later: swept.
    for path in left:
        os.utime(path, (started.timestamp() - 1, started.timestamp() - 1))
    swept = custody.sweep_orphans(services, now=started + timedelta(hours=1), actor="ops")
    assert swept.partials >= 1 and swept.partial_bytes > (8 << 20)
    assert len(swept.releases) == 1
    assert [p for p in vault.rglob("*") if p.is_file()] == []
    with services.sessions() as session:
        event = session.scalars(select(AuditEvent).where(
            AuditEvent.action == "orphans_removed")).one()
    details = json.loads(event.details)
    assert details["partial_bytes"] == swept.partial_bytes
    assert details["releases"] == list(swept.releases)


def test_sweep_keeps_a_queue_that_is_running(settings: Settings, services: Services,
                                              bundle: Path) -> None:
    """A queue in progress (held inside its progress callback) loses nothing
    to a sweep run meanwhile, even one that thinks an hour has passed for
    the partial files."""
    entered, release_it = threading.Event(), threading.Event()
    results: list[Release] = []

    def progress(name: str, done: int, total: int) -> None:
        if name == "force-2.txt":
            entered.set()
            release_it.wait(30)

    spec = load_manifest(bundle, publish_on="2099-01-01")
    worker = threading.Thread(target=lambda: results.append(
        ReleaseService(services, actor="comms").queue(spec, progress=progress)))
    worker.start()
    assert entered.wait(30)
    swept = custody.sweep_orphans(services, now=services.clock.now(), actor="ops")
    assert swept.objects == 0 and len(swept.kept) == 1
    release_it.set()
    worker.join(30)
    assert results
    status, _out, err = run_cli(settings.data_dir, "check")
    assert status == 0, err
    assert not list(services.vault.keys(custody.PENDING_PREFIX))


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


def test_embargo_run_sweeps_old_orphans_at_start(settings: Settings, services: Services) -> None:
    """What a queue killed two hours ago left is gone once `embargo run` has
    started; what a queue started a minute ago left is not."""
    now = datetime.now(UTC)
    for release_id, started in (("rel_old", now - timedelta(hours=2)),
                                ("rel_young", now - timedelta(minutes=1))):
        services.vault.put_bytes(f"releases/{release_id}/doc_1.emb", b"x" * 1000)
        services.vault.put_bytes(custody.pending_key(release_id), json.dumps(
            {"release_id": release_id, "started_at": started.isoformat()}).encode())
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
    left = sorted(services.vault.keys(""))
    assert left == ["pending/rel_young.json", "releases/rel_young/doc_1.emb"]
    with services.sessions() as session:
        event = session.scalars(select(AuditEvent).where(
            AuditEvent.action == "orphans_removed")).one()
    assert json.loads(event.details)["releases"] == ["rel_old"]
    assert json.loads(event.details)["bytes"] == 1000
