"""Staging a 2 GiB release uses disk, not memory: peak RSS growth of queueing
and publishing one 2 GiB document.

    python bench/staging_memory.py [--quick] [--size-mib 2048]

One fresh data dir (SQLite, local vault, local public folder) in the temp
folder. The document is a sparse file (random first and last MiB, a hole in
between: made in no time, and read back as zeros) of --size-mib MiB (--quick:
512). Each step runs in a fresh child process that imports and builds
everything first, then resets its peak RSS (``echo 5 > /proc/self/clear_refs``,
then VmHWM) and reports the growth of the peak during the step alone:

1. queue: ReleaseService.queue of a release holding the document (sealed
   into the vault as it is read);
2. publish: Publisher.publish of that release, as `embargo run` does it on a
   folder: claim, stage (decrypt and verify into the private staging
   folder), wait for the instant (a second or two after the queue), make it
   public, manifest, finish. A thread samples every 20 ms the bytes allocated
   on disk under the staging folder and the filesystem's free space;
3. control: the first 256 MiB of the sealed object read into memory at once,
   to show the method sees growth.

Before anything is written the filesystem must have three times the size free
(sealed object, staged file and public copy are one inode for the last two:
two sizes, plus a margin); everything is removed at the end, also on Ctrl-C.
Target: peak RSS growth <= 64 MiB for queue and publish.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from _common import (
    REPO,
    Cleanup,
    MiB,
    Peak,
    base_parser,
    child_env,
    emit_summary,
    fmt,
    machine,
    run_main,
    table,
    verdict,
)

MEMORY_TARGET_MIB = 64.0
CONTROL_MIB = 256


# -- in the child ---------------------------------------------------------------------
class DiskSampler(threading.Thread):
    """Every 20 ms: bytes allocated under ``folder``, and ``fs``'s free bytes."""

    def __init__(self, folder: Path, fs: Path) -> None:
        super().__init__(name="disk-sampler", daemon=True)
        self.folder, self.fs = folder, fs
        self.max_staged = 0
        self.min_free = self._free()
        self.free_before = self.min_free
        self.done = threading.Event()

    def _free(self) -> int:
        st = os.statvfs(self.fs)
        return st.f_bavail * st.f_frsize

    def _staged(self) -> int:
        total = 0
        for dirpath, _dirs, files in os.walk(self.folder):
            for name in files:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
                except OSError:
                    continue
        return total

    def run(self) -> None:
        while not self.done.wait(0.02):
            self.max_staged = max(self.max_staged, self._staged())
            self.min_free = min(self.min_free, self._free())

    def stop(self) -> None:
        self.done.set()
        self.join(5)


def _services(data: Path) -> Any:
    from config.settings import load_settings
    from jobs.app import build_services

    settings = load_settings(environ={}, overrides={"data_dir": str(data)})
    return settings, build_services(settings)


def child_queue(data: Path, manifest: Path, publish_on: str) -> dict[str, Any]:
    from release.manifest import load_manifest
    from release.service import ReleaseService

    settings, services = _services(data)
    service = ReleaseService(services, actor="bench@staging")
    spec = load_manifest(manifest, publish_on=publish_on)
    peak = Peak()
    start = time.perf_counter()
    release = service.queue(spec)
    took = time.perf_counter() - start
    growth = peak.growth_mib()
    sealed = sum(p.stat().st_blocks * 512 for p in (settings.vault.path or data).rglob("*.emb"))
    return {"growth_mib": growth, "method": peak.method, "seconds": took,
            "release_id": release.id, "disk_bytes": sealed,
            "instant": release.instant.isoformat()}


def child_publish(data: Path, release_id: str) -> dict[str, Any]:
    from release.keys import load_private_key
    from release.publishing import Publisher, PublishStatus

    settings, services = _services(data)
    publisher = Publisher(services, load_private_key(settings.keys_dir), claimant="bench@staging")
    staging = services.public.staging.root
    staging.mkdir(mode=0o700, parents=True, exist_ok=True)
    sampler = DiskSampler(staging, staging)
    peak = Peak()
    sampler.start()
    start = time.perf_counter()
    try:
        outcome = publisher.publish(release_id, wait_up_to=timedelta(hours=1))
    finally:
        sampler.stop()
    took = time.perf_counter() - start
    growth = peak.growth_mib()
    if outcome.status != PublishStatus.PUBLISHED:
        raise RuntimeError(f"publish ended {outcome.status}: {outcome.detail}")
    public = [p for p in (settings.public.path or data).rglob("*") if p.is_file()
              and p.name != "manifest.json"]
    return {"growth_mib": growth, "method": peak.method, "seconds": took,
            "max_staged_bytes": sampler.max_staged,
            "free_drop_bytes": sampler.free_before - sampler.min_free,
            "public_bytes": sum(p.stat().st_size for p in public)}


def child_control(sealed: Path) -> dict[str, Any]:
    peak = Peak()
    with sealed.open("rb") as src:
        data = src.read(CONTROL_MIB * MiB)
    growth = peak.growth_mib()
    return {"growth_mib": growth, "method": peak.method, "bytes": len(data)}


# -- in the parent --------------------------------------------------------------------
def make_sparse(path: Path, size: int) -> None:
    """``size`` bytes: random first and last MiB, a hole between."""
    with path.open("wb") as out:
        out.write(os.urandom(min(MiB, size)))
        if size > 2 * MiB:
            out.seek(size - MiB)
            out.write(os.urandom(MiB))
        out.truncate(size)


def run_child(cleanup: Cleanup, *args: str, timeout: float = 1800) -> dict[str, Any]:
    proc = cleanup.spawn([sys.executable, str(Path(__file__).resolve()), "--child", *args],
                         cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        cleanup.stop(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed ({proc.returncode}): {err.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def gib(n: float) -> str:
    return f"{n / (1 << 30):.2f}"


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0], trials=1, quick=1)
    parser.add_argument("--size-mib", type=int, default=None,
                        help="document size in MiB (default 2048; --quick 512)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        op, rest = args.child[0], args.child[1:]
        if op == "queue":
            result = child_queue(Path(rest[0]), Path(rest[1]), rest[2])
        elif op == "publish":
            result = child_publish(Path(rest[0]), rest[1])
        else:
            result = child_control(Path(rest[0]))
        print(json.dumps(result))
        return 0
    size_mib = args.size_mib or (512 if args.quick else 2048)
    size = size_mib * MiB
    with Cleanup() as cleanup:
        work = cleanup.tempdir("staging-memory")
        st = os.statvfs(work)
        free = st.f_bavail * st.f_frsize
        need = 3 * size + 256 * MiB
        print(f"staging_memory: a {size_mib} MiB document, in {work} "
              f"({gib(free)} GiB free, {gib(need)} GiB needed)")
        if free < need:
            print(f"not enough free space in {work.parent}: {gib(free)} GiB free, "
                  f"{gib(need)} GiB needed; use --size-mib", file=sys.stderr)
            return 2
        data = work / "data"
        docs = work / "docs"
        docs.mkdir()
        make_sparse(docs / "big-report.txt", size)
        manifest = docs / "manifest.toml"
        manifest.write_text('title = "Staging memory"\npublish_on = "2030-01-01"\n\n'
                            '[[documents]]\npath = "big-report.txt"\nkind = "report"\n')
        from release import keys

        keys.init_keys(data / "keys")
        # The instant: a little after the queue is expected to end (~1 GiB/s), so
        # that the publisher stages before it and waits, as in production.
        instant = (datetime.now(UTC) + timedelta(seconds=5 + size / (1 << 30) * 2)
                   ).replace(microsecond=0)
        queued = run_child(cleanup, "queue", str(data), str(manifest),
                           instant.strftime("%Y-%m-%dT%H:%M:%SZ"))
        print(f"  queued in {queued['seconds']:.1f} s", flush=True)
        published = run_child(cleanup, "publish", str(data), queued["release_id"])
        print(f"  published in {published['seconds']:.1f} s (staging, then the wait for the "
              "instant)", flush=True)
        sealed = next((data / "vault").rglob("*.emb"))
        control = run_child(cleanup, "control", str(sealed))
        print()
        print(f"staging_memory — one {size_mib} MiB document (sparse source), a fresh "
              "child process per step, peak RSS growth during the step alone")
        print(f"machine: {machine()}")
        print()
        rows = [
            ["queue (seal into the vault)", fmt(queued["growth_mib"], 1), queued["method"],
             f"sealed object {gib(queued['disk_bytes'])} GiB", fmt(queued["seconds"], 1),
             f"<= {MEMORY_TARGET_MIB:g}", verdict(queued["growth_mib"] <= MEMORY_TARGET_MIB)],
            ["publish (claim, stage, wait, go public)", fmt(published["growth_mib"], 1),
             published["method"],
             f"staged up to {gib(published['max_staged_bytes'])} GiB (free space fell "
             f"{gib(published['free_drop_bytes'])} GiB); public {gib(published['public_bytes'])}"
             " GiB", fmt(published["seconds"], 1), f"<= {MEMORY_TARGET_MIB:g}",
             verdict(published["growth_mib"] <= MEMORY_TARGET_MIB)],
            [f"control: {CONTROL_MIB} MiB read into memory at once",
             fmt(control["growth_mib"], 1), control["method"], "", "",
             "(shows the method sees growth)", ""],
        ]
        print(table(rows, ["step", "peak RSS growth MiB", "method", "disk", "seconds",
                           "target", "verdict"]))
        emit_summary("staging_memory", [
            {"figure": f"{label}, one {size_mib} MiB document: peak RSS growth",
             "target": f"<= {MEMORY_TARGET_MIB:g} MiB",
             "limit": f"control: {CONTROL_MIB} MiB read at once grew "
                      f"{fmt(control['growth_mib'], 1)} MiB",
             "measured": f"{fmt(step['growth_mib'], 1)} MiB ({step['method']}); {disk}",
             "verdict": verdict(step["growth_mib"] <= MEMORY_TARGET_MIB)}
            for label, step, disk in (
                ("queue", queued, f"sealed object {gib(queued['disk_bytes'])} GiB"),
                ("publish", published,
                 f"staged on disk up to {gib(published['max_staged_bytes'])} GiB"))])
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    run_main(main, cleaned="temporary files")
