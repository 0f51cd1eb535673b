"""Scale: 10,000 queued releases, and 100 releases due at the same instant.

    python bench/scale.py [--trials N] [--quick] [--releases 10000]

1. Queue --releases releases (default 10,000) through ReleaseService.queue, in
   this process, one tiny sealed document each (the real path: sealed into the
   vault, DEK sealed with HPKE, records and audit event written), no
   recipients, embargoes spread over the coming weeks. The time it takes is
   reported.
2. `embargo -v run` (child process) over them: time from spawn to its
   "scheduler started: N releases scheduled" log line and to "embargo scheduler
   running". The first start is reported on its own: it also runs one copies
   job per release (copies_at is set on every release, recipients or not); it
   is given COPIES_WAIT_S to work through them and is then stopped, and the
   copies still not issued are marked issued in the database (bench set-up
   only, as if they had gone out earlier), so later starts are like a
   production restart. Then the same in this process:
   jobs.scheduler.EmbargoScheduler.start() timed and its count.
3. `embargo list` over them: wall time of the child process.
4. 100 releases (one tiny document each) due at the same whole second, queued
   1-2 s ahead while one `embargo run` child (over the 10,000) is running: time
   from the instant until the last document is readable in the public folder
   (polled every ~2 ms), and how many were missed (not public within 60 s, or
   not in state published) or early.
Targets: scheduler ready <= 2 s; last public <= 2 s after the instant; 0 missed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from _common import (
    Cleanup,
    EmbargoRun,
    Queuer,
    Summary,
    base_parser,
    child_env,
    fmt,
    machine,
    one_document_manifest,
    run_embargo,
    run_main,
    table,
    trials_of,
    verdict,
)

READY_TARGET_S = 2.0
LAST_PUBLIC_TARGET_S = 2.0
AT_ONCE = 100
MISS_AFTER_S = 60.0
COPIES_WAIT_S = 20.0  # how long the first start may work through its copies jobs


def _manifest(folder: Path) -> Path:
    return one_document_manifest(folder, "Scale",
                                 b"A short published notice for the scale bench.\n")


def insert_many(queuer: Queuer, count: int) -> float:
    """Queue ``count`` releases; returns seconds taken."""
    base = datetime.now(UTC).replace(microsecond=0) + timedelta(days=30)
    start = time.perf_counter()
    for i in range(count):
        queuer.queue(f"Scale release {i:05d}", base + timedelta(minutes=i))
        if (i + 1) % 1000 == 0:
            took = time.perf_counter() - start
            print(f"  queued {i + 1}/{count} ({took / (i + 1) * 1000:.1f} ms each)", flush=True)
    return time.perf_counter() - start


def db_count(db: Path, sql: str) -> int:
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        return int(conn.execute(sql).fetchone()[0])


@dataclasses.dataclass
class Start:
    ready_s: float  # spawn -> "scheduler started: N releases scheduled"
    running_s: float  # spawn -> "embargo scheduler running"
    count: int
    stop_s: float


def start_child(cleanup: Cleanup, data: Path) -> tuple[EmbargoRun, Start]:
    run = EmbargoRun(cleanup, data, child_env())
    at, line = run.wait_for(r"scheduler started: \d+ releases scheduled", timeout=300)
    match = re.search(r"scheduler started: (\d+)", line)
    running_at, _ = run.wait_for(r"embargo scheduler running", timeout=300)
    return run, Start(ready_s=at - run.started_at, running_s=running_at - run.started_at,
                      count=int(match.group(1)) if match else -1, stop_s=math.nan)


def stop_child(run: EmbargoRun, start: Start) -> None:
    began = time.perf_counter()
    run.stop()
    start.stop_s = time.perf_counter() - began


def in_process_start(data: Path, trials: int) -> list[tuple[float, int]]:
    """EmbargoScheduler.start() timed in this process (wrapped, not changed)."""
    from config.settings import load_settings
    from jobs import app, cli
    from jobs.app import build_services
    from jobs.scheduler import EmbargoScheduler

    # Whatever wires a node up in this checkout (the name has moved before).
    starter = getattr(app, "start_node", None) or getattr(cli, "start_scheduler", None)
    if starter is None:
        raise RuntimeError("found neither jobs.app.start_node nor jobs.cli.start_scheduler")

    results: list[tuple[float, int]] = []
    original = EmbargoScheduler.start

    def timed_start(self: Any) -> int:
        began = time.perf_counter()
        count = original(self)
        results.append((time.perf_counter() - began, count))
        return count

    settings = load_settings(environ={}, overrides={"data_dir": str(data)})
    EmbargoScheduler.start = timed_start  # type: ignore[method-assign]
    try:
        for _ in range(trials):
            services = build_services(settings)
            stop = threading.Event()
            node = starter(settings, services, stop)
            stop.set()
            node.shutdown()
            services.engine.dispose()
    finally:
        EmbargoScheduler.start = original  # type: ignore[method-assign]
    return results


@dataclasses.dataclass
class Burst:
    queue_s: float
    lead_s: float
    first_s: float = math.nan
    last_s: float = math.nan
    missed: int = 0
    early: int = 0
    not_published: int = 0


def burst(queuer: Queuer, data: Path, trial: int, estimate: float) -> Burst:
    instant = math.ceil(time.time() + estimate * 1.3 + 1.0)
    moment = datetime.fromtimestamp(instant, UTC)
    began = time.time()
    targets = queuer.queue_many(f"Burst {trial:02d}", AT_ONCE, moment, data / "public")
    queued = time.time()
    result = Burst(queue_s=queued - began, lead_s=instant - queued)
    seen: dict[Path, float] = {}
    pending = set(targets)
    deadline = instant + MISS_AFTER_S
    while pending and time.time() < deadline:
        for path in list(pending):
            if path.exists():
                seen[path] = time.time()
                pending.discard(path)
        time.sleep(0.002)
    times = [(t - instant) for t in seen.values()]
    result.missed = len(pending)
    result.early = sum(1 for t in times if t < 0)
    if times:
        result.first_s, result.last_s = min(times), max(times)
    ids = ",".join(f"'{r}'" for r in targets.values())
    db = data / "embargo.db"
    while True:  # the state follows the last document by a few milliseconds
        result.not_published = db_count(
            db, f"SELECT count(*) FROM releases WHERE id IN ({ids}) AND state != 'published'")
        if result.not_published == 0 or time.time() > deadline:
            return result
        time.sleep(0.05)


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0], trials=5, quick=2)
    parser.add_argument("--releases", type=int, default=10_000,
                        help="how many releases to queue (default 10000)")
    args = parser.parse_args()
    trials = trials_of(args)
    count = args.releases
    with Cleanup() as cleanup:
        root = cleanup.tempdir("scale")
        data = root / "var"
        print(f"scale: {count} releases, {trials} trials", flush=True)
        run_embargo(data, "keys", "init")
        queuer = Queuer(data, _manifest(root / "doc"), actor="bench@scale")
        cleanup.on_close(queuer.close)
        insert_s = insert_many(queuer, count)
        db = data / "embargo.db"

        # -- scheduler start -----------------------------------------------------
        print("starting `embargo run` over them…", flush=True)
        run, first = start_child(cleanup, data)
        copies_sql = ("SELECT count(*) FROM releases "
                      "WHERE copies_at IS NOT NULL AND copies_issued_at IS NULL")
        copies_left = count
        while time.time() - run.started_at < COPIES_WAIT_S:
            copies_left = db_count(db, copies_sql)
            if copies_left == 0:
                break
            time.sleep(0.5)
        copies_s = time.time() - run.started_at
        stop_child(run, first)
        copies_left = db_count(db, copies_sql)
        if copies_left:  # bench set-up only: as if the rest had gone out earlier
            with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn, conn:
                conn.execute("UPDATE releases SET copies_issued_at = created_at "
                             "WHERE copies_at IS NOT NULL AND copies_issued_at IS NULL")
        starts: list[Start] = []
        for _ in range(trials):
            run, start = start_child(cleanup, data)
            stop_child(run, start)
            starts.append(start)
        inproc = in_process_start(data, trials)

        # -- embargo list ----------------------------------------------------------
        lists = []
        lines = 0
        for _ in range(trials):
            began_pc = time.perf_counter()
            out = run_embargo(data, "list", timeout=600)
            lists.append(time.perf_counter() - began_pc)
            lines = len(out.stdout.splitlines())

        # -- 100 at one instant ------------------------------------------------------
        print(f"{AT_ONCE} releases at one instant, {trials} trials…", flush=True)
        run, _ = start_child(cleanup, data)
        bursts: list[Burst] = []
        estimate = 2.0
        try:
            for trial in range(trials):
                b = burst(queuer, data, trial, estimate)
                estimate = b.queue_s
                bursts.append(b)
                print(f"  trial {trial + 1}/{trials}: queued in {b.queue_s:.2f} s, lead "
                      f"{b.lead_s:.2f} s, first {fmt(b.first_s * 1000)} ms, last "
                      f"{fmt(b.last_s * 1000)} ms, missed {b.missed}, early {b.early}, not "
                      f"published {b.not_published}", flush=True)
        finally:
            run.stop()
        problems = run.errors()

        # -- report ------------------------------------------------------------------
        print()
        print(f"scale — {count} queued releases; {AT_ONCE} releases at one instant; "
              f"{trials} trials")
        print(f"machine: {machine()}")
        print(f"insert: {count} releases through ReleaseService.queue (in process, one tiny "
              f"sealed document each, no recipients) took {insert_s:.1f} s "
              f"({insert_s / count * 1000:.1f} ms each)")
        print()
        ready = Summary.of([s.ready_s for s in starts])
        running = Summary.of([s.running_s for s in starts])
        stop = Summary.of([s.stop_s for s in starts])
        ip = Summary.of([t for t, _ in inproc])
        lst = Summary.of(lists)
        counts = sorted({s.count for s in starts} | {c for _, c in inproc})
        rows = [
            ["`embargo run`, first start: spawn -> 'scheduler started' (+ copies jobs)", "1",
             fmt(first.ready_s, 2), "", "", "", ""],
            [f"`embargo run`, first start: copies jobs done in {copies_s:.0f} s",
             "1", f"{count - copies_left}/{count}", "", "", "", ""],
            ["`embargo run`: spawn -> 'scheduler started: N releases scheduled'",
             str(ready.n), fmt(ready.p50, 2), fmt(ready.p99, 2), fmt(ready.max, 2),
             f"<= {READY_TARGET_S:g}", verdict(ready.max <= READY_TARGET_S
                                               and counts == [count])],
            ["`embargo run`: spawn -> 'embargo scheduler running'", str(running.n),
             fmt(running.p50, 2), fmt(running.p99, 2), fmt(running.max, 2), "", ""],
            ["in process: EmbargoScheduler.start()", str(ip.n), fmt(ip.p50, 2),
             fmt(ip.p99, 2), fmt(ip.max, 2), f"<= {READY_TARGET_S:g}",
             verdict(ip.max <= READY_TARGET_S)],
            ["`embargo run`: SIGTERM -> exited", str(stop.n), fmt(stop.p50, 2),
             fmt(stop.p99, 2), fmt(stop.max, 2), "", ""],
            [f"`embargo list` ({lines} lines)", str(lst.n), fmt(lst.p50, 2), fmt(lst.p99, 2),
             fmt(lst.max, 2), "", ""],
        ]
        print(table(rows, ["measure (seconds)", "n", "median", "p99", "max", "target",
                           "verdict"], title=f"{count} queued releases"))
        print(f"releases scheduled, as reported: {counts} (expected {count})")
        print()
        last = Summary.of([b.last_s for b in bursts])
        first_b = Summary.of([b.first_s for b in bursts])
        qs = Summary.of([b.queue_s for b in bursts])
        missed = sum(b.missed + b.not_published for b in bursts)
        early = sum(b.early for b in bursts)
        rows = [
            [f"queue {AT_ONCE} releases (in process)", str(qs.n), fmt(qs.p50, 2),
             fmt(qs.p99, 2), fmt(qs.max, 2), "", ""],
            ["first document public after the instant", str(first_b.n), fmt(first_b.p50, 3),
             fmt(first_b.p99, 3), fmt(first_b.max, 3), "", ""],
            ["last document public after the instant", str(last.n), fmt(last.p50, 3),
             fmt(last.p99, 3), fmt(last.max, 3), f"<= {LAST_PUBLIC_TARGET_S:g}",
             verdict(last.n == len(bursts) and last.max <= LAST_PUBLIC_TARGET_S)],
            ["missed (not public in 60 s, or not 'published')", str(len(bursts)),
             f"total {missed}", "", "", "0", verdict(missed == 0)],
            ["early (public before the instant)", str(len(bursts)), f"total {early}", "", "",
             "0", verdict(early == 0)],
        ]
        print(table(rows, ["measure (seconds)", "n", "median", "p99", "max", "target",
                           "verdict"],
                    title=f"{AT_ONCE} releases due at one instant, beside the {count} queued, "
                          "one `embargo run` child"))
        leads = Summary.of([b.lead_s for b in bursts])
        print(f"queueing finished {fmt(leads.min, 2)}-{fmt(leads.max, 2)} s before the instant")
        for line in problems[:5]:
            print(f"embargo run logged: {line}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    run_main(main)
