"""100 releases due at one instant: how late is the last one public, against
the raw work, and is any missed or early? (issue 16)

    python bench/burst.py [--trials N] [--quick] [--releases 100] [--background N]
                          [--ahead S] [--set KEY=VALUE ...]

One fresh data dir and one `embargo -v run` child, running before the first
trial and reused. Each trial queues --releases releases (one small document
each, no recipients) through the service API in this process
(release.service.ReleaseService.queue, the API the CLI calls: one `embargo
queue` child per release would take a minute per trial), all due at the same
whole second about --ahead seconds after the last is queued. Meanwhile this
process checks every ~2 ms which public files exist. --background N first
queues N more releases weeks ahead (default 0), for a scheduler that also
holds many.

Witnesses, not the project's records: a file is public at the latest at the
end of the first sweep that found it, at the earliest at the start of the
sweep before; early if a sweep that ended before the instant found it, or if
its st_ctime (set by the link or rename that made it public) is before the
instant by more than the file clock's lag, measured in the same run (Linux
stamps files from its coarse clock). Missed: not public within 60 s, or not
in state published (read from the database).

The limit, measured after every trial (the child is idle then): the same
number of small documents (sealed once by this process) decrypted, written
and fsynced on scheduler.workers threads, plus as many SQLite commits (WAL,
synchronous=FULL, BEGIN IMMEDIATE, one UPDATE each, as the project's
engine), one after the other.

Targets (issue 16): last public <= 150 ms after the instant in every trial,
and <= 2.5x its limit (median of the per-trial ratios); 0 missed, 0 early.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

from _common import (
    Cleanup,
    EmbargoRun,
    Queuer,
    Summary,
    base_parser,
    child_env,
    effective_settings,
    emit_summary,
    file_clock,
    fmt,
    machine,
    one_document_manifest,
    run_embargo,
    run_main,
    table,
    trials_of,
    verdict,
)

LAST_TARGET_MS = 150.0
RATIO_TARGET = 2.5
MISS_AFTER_S = 60.0
DOC_TEXT = b"A short published notice for the burst bench.\n"


def _manifest(folder: Path) -> Path:
    return one_document_manifest(folder, "Burst", DOC_TEXT)


class RawBurst:
    """The limit: N small documents decrypted + written + fsynced on
    ``threads`` threads, plus N SQLite commits."""

    def __init__(self, work: Path, count: int, threads: int) -> None:
        from release import sealing

        self.work = work
        self.threads = max(1, threads)
        sealed = work / "sealed"
        sealed.mkdir(parents=True)
        self.docs: list[tuple[bytes, str, Path]] = []
        for i in range(count):
            dek, doc_id = sealing.new_dek(), f"doc_{i:04d}"
            src = work / "plain"
            src.write_bytes(DOC_TEXT)
            with src.open("rb") as fin, (sealed / doc_id).open("wb") as fout:
                sealing.seal_stream(dek, doc_id, fin, fout)
            self.docs.append((dek, doc_id, sealed / doc_id))
        self.db = work / "limit.db"
        with contextlib.closing(self._connect()) as conn:
            conn.execute("CREATE TABLE releases (id TEXT PRIMARY KEY, state TEXT, "
                         "published_at TEXT, revision INTEGER)")
            conn.executemany("INSERT INTO releases VALUES (?, 'queued', NULL, 0)",
                             [(f"rel_{i:04d}",) for i in range(count)])
        self._n = 0

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db, timeout=30, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def decrypt(self) -> float:
        """ms: every document decrypted, written and fsynced, ``threads`` at a time."""
        from release import sealing

        self._n += 1
        out = self.work / f"out-{self._n}"
        out.mkdir()

        def one(item: tuple[bytes, str, Path]) -> None:
            dek, doc_id, path = item
            fd = os.open(out / doc_id, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
            with path.open("rb") as fin, os.fdopen(fd, "wb") as fout:
                sealing.open_stream(dek, doc_id, fin, fout)
                fout.flush()
                os.fsync(fout.fileno())

        with ThreadPoolExecutor(self.threads) as pool:
            start = time.perf_counter()
            list(pool.map(one, self.docs))
            took = time.perf_counter() - start
        for p in out.iterdir():
            p.unlink()
        out.rmdir()
        return took * 1000

    def commits(self) -> float:
        """ms: one committed transaction per release, one after the other."""
        self._n += 1
        with contextlib.closing(self._connect()) as conn:
            start = time.perf_counter()
            for i in range(len(self.docs)):
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("UPDATE releases SET state = 'published', published_at = ?, "
                             "revision = revision + 1 WHERE id = ?",
                             (datetime.now(UTC).isoformat(), f"rel_{i:04d}"))
                conn.execute("COMMIT")
            return (time.perf_counter() - start) * 1000


@dataclasses.dataclass
class Trial:
    queue_s: float
    lead_s: float
    first_ms: float = math.nan
    last_ms: float = math.nan
    last_lo_ms: float = math.nan
    ctime_last_ms: float = math.nan
    missed: int = 0
    not_published: int = 0
    early_poll: int = 0
    early_ctime: int = 0
    ctime_within_lag: int = 0
    decrypt_ms: float = math.nan
    commits_ms: float = math.nan

    @property
    def limit_ms(self) -> float:
        return self.decrypt_ms + self.commits_ms

    @property
    def ratio(self) -> float:
        return self.last_ms / self.limit_ms


def one_burst(queuer: Queuer, data: Path, count: int, trial_no: int, estimate: float,
              ahead: float, lag_ms: float) -> Trial:
    instant = math.ceil(time.time() + estimate * 1.3 + ahead)
    moment = datetime.fromtimestamp(instant, UTC)
    began = time.time()
    targets = queuer.queue_many(f"Burst {trial_no:02d}", count, moment, data / "public")
    queued = time.time()
    trial = Trial(queue_s=queued - began, lead_s=instant - queued)
    seen: dict[Path, float] = {}
    absent: dict[Path, float] = {}
    pending = set(targets)
    deadline = instant + MISS_AFTER_S
    previous_start = math.nan
    while pending and time.time() < deadline:
        started = time.time()
        found = [path for path in pending if path.exists()]
        ended = time.time()
        for path in found:
            seen[path] = ended
            absent[path] = previous_start
            pending.discard(path)
        previous_start = started
        time.sleep(0.002)
    trial.missed = len(pending)
    times = {p: (t - instant) * 1000 for p, t in seen.items()}
    trial.early_poll = sum(1 for t in times.values() if t < 0)
    if times:
        last = max(times, key=lambda p: times[p])
        trial.first_ms, trial.last_ms = min(times.values()), times[last]
        trial.last_lo_ms = (absent[last] - instant) * 1000
    ctimes = []
    for path in seen:
        at = (os.stat(path).st_ctime_ns / 1e9 - instant) * 1000
        ctimes.append(at)
        if at < -lag_ms:
            trial.early_ctime += 1
        elif at < 0:
            trial.ctime_within_lag += 1
    if ctimes:
        trial.ctime_last_ms = max(ctimes)
    ids = ",".join(f"'{r}'" for r in targets.values())
    db = data / "embargo.db"
    while True:  # the state follows the last document by a few milliseconds
        with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
            trial.not_published = int(conn.execute(
                f"SELECT count(*) FROM releases WHERE id IN ({ids}) "
                "AND state != 'published'").fetchone()[0])
        if trial.not_published == 0 or time.time() > deadline:
            return trial
        time.sleep(0.05)


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0], trials=10, quick=3)
    parser.add_argument("--releases", type=int, default=100, help="due at one instant")
    parser.add_argument("--background", type=int, default=0,
                        help="releases queued weeks ahead first (default 0)")
    parser.add_argument("--ahead", type=float, default=1.5,
                        help="seconds from the last queue to the instant (about)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for the embargo child, e.g. scheduler.workers=16")
    args = parser.parse_args()
    trials = trials_of(args)
    count = args.releases
    settings_env: dict[str, str] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        settings_env["EMBARGO_" + key.replace(".", "_").upper()] = value
    with Cleanup() as cleanup:
        root = cleanup.tempdir("burst")
        data = root / "var"
        env = child_env(settings_env)
        values = effective_settings(env, "scheduler.workers", "scheduler.publish_workers",
                                    "scheduler.lead_seconds", "scheduler.poll_seconds")
        threads = int(values["scheduler.workers"] or 16)
        print(f"burst: {count} releases at one instant, {trials} trials", flush=True)
        clocks = [file_clock(root / "clock")]
        lag = clocks[0].max_lag_ms
        raw = RawBurst(root / "raw", count, threads)
        run_embargo(data, "keys", "init", env=env)
        queuer = Queuer(data, _manifest(root / "doc"), actor="bench@burst", env=env)
        cleanup.on_close(queuer.close)
        if args.background:
            base = datetime.now(UTC).replace(microsecond=0) + timedelta(days=30)
            began = time.perf_counter()
            for i in range(args.background):
                queuer.queue(f"Background release {i:05d}", base + timedelta(minutes=i))
            print(f"  queued {args.background} background releases in "
                  f"{time.perf_counter() - began:.1f} s", flush=True)
        run = EmbargoRun(cleanup, data, env)
        run.wait_for(r"embargo scheduler running", timeout=300)
        results: list[Trial] = []
        estimate = 1.5
        try:
            for n in range(trials):
                trial = one_burst(queuer, data, count, n, estimate, args.ahead, lag)
                estimate = trial.queue_s
                trial.decrypt_ms = raw.decrypt()
                trial.commits_ms = raw.commits()
                results.append(trial)
                print(f"  trial {n + 1}/{trials}: queued in {trial.queue_s:.2f} s, lead "
                      f"{trial.lead_s:.2f} s; first {fmt(trial.first_ms)} ms, last "
                      f"{fmt(trial.last_ms)} ms (ctime {fmt(trial.ctime_last_ms)}); limit "
                      f"{fmt(trial.limit_ms)} ms ({fmt(trial.decrypt_ms)} + "
                      f"{fmt(trial.commits_ms)}); missed {trial.missed}, not published "
                      f"{trial.not_published}, early {trial.early_poll}/{trial.early_ctime}",
                      flush=True)
        finally:
            run.stop()
        problems = run.errors()
        kinds = run.error_kinds()
        clocks.append(file_clock(root / "clock-after"))
        lag = max(c.max_lag_ms for c in clocks)

        print()
        print(f"burst — {count} releases (one small document each) due at one instant, "
              f"{trials} trials, one `embargo run` child"
              + (f", beside {args.background} queued weeks ahead" if args.background else ""))
        print(f"machine: {machine()}")
        print("settings: " + ", ".join(f"{k}={v}" for k, v in values.items()))
        for clock in clocks:
            print(clock.describe())
        print()
        limit_rows = []
        for label, vals in (
            (f"{count} x decrypt + write + fsync, {threads} threads",
             [t.decrypt_ms for t in results]),
            (f"{count} SQLite commits (WAL, synchronous=FULL), one after the other",
             [t.commits_ms for t in results]),
            ("limit = the two together", [t.limit_ms for t in results]),
        ):
            s = Summary.of(vals)
            limit_rows.append([label, str(s.n), fmt(s.p50), fmt(s.max)])
        print(table(limit_rows, ["limit (same run, ms)", "n", "p50", "max"],
                    title="limit, measured after every trial"))
        print()
        last = Summary.of([t.last_ms for t in results])
        limit = Summary.of([t.limit_ms for t in results])
        ratios = [t.ratio for t in results if not math.isnan(t.ratio)]
        ratio = Summary.of(ratios)
        missed = sum(t.missed + t.not_published for t in results)
        early_poll = sum(t.early_poll for t in results)
        early_ctime = sum(t.early_ctime for t in results)
        within = sum(t.ctime_within_lag for t in results)
        complete = last.n == trials == len(ratios)
        last_ok = complete and missed == 0 and last.max <= LAST_TARGET_MS
        ratio_ok = complete and missed == 0 and ratio.p50 <= RATIO_TARGET
        ratio_cell = f"{fmt(ratio.p50, 2)}x ({fmt(ratio.max, 2)}x)"

        def srow(label: str, vals: list[float], target: str = "", lim: str = "",
                 rat: str = "", ok: bool | None = None) -> list[str]:
            s = Summary.of(vals)
            return [label, str(s.n), fmt(s.p50), fmt(s.max), target, lim, rat,
                    verdict(ok) if target else ""]

        rows = [
            srow("last document public (poll, at the latest)", [t.last_ms for t in results],
                 f"max<={LAST_TARGET_MS:g}", fmt(limit.p50), "", last_ok),
            srow("  the same against its limit", [t.last_ms for t in results],
                 f"<={RATIO_TARGET:g}x limit", fmt(limit.p50), ratio_cell, ratio_ok),
            srow("last document public (poll, at the earliest)",
                 [t.last_lo_ms for t in results]),
            srow("last document public (file ctime)", [t.ctime_last_ms for t in results]),
            srow("first document public (poll)", [t.first_ms for t in results]),
            [f"missed (not public in {MISS_AFTER_S:g} s, or not published)", str(trials),
             f"total {missed}", "", "0", "", "", verdict(missed == 0)],
            ["early, by polling", str(trials), f"total {early_poll}", "", "0", "", "",
             verdict(early_poll == 0)],
            ["early, by file ctime", str(trials), f"total {early_ctime}", "", "0", "",
             f"{within} within the {lag:.1f} ms file-clock lag", verdict(early_ctime == 0)],
        ]
        print(table(rows, ["figure (ms after the instant)", "n", "p50", "max", "target",
                           "limit p50 (same run)", "ratio p50 (max)", "verdict"],
                    title="results"))
        queue = Summary.of([t.queue_s for t in results])
        leads = Summary.of([t.lead_s for t in results])
        print(f"queueing {count} took p50 {fmt(queue.p50, 2)} s and finished "
              f"{fmt(leads.min, 2)}-{fmt(leads.max, 2)} s before the instant; ratio: per "
              "trial, last public / that trial's limit")
        if problems:
            print(f"embargo run logged {len(problems)} warnings or errors, most often:")
        for kind in kinds:
            print(f"  {kind}")
        early_total = early_poll + early_ctime
        emit_summary("burst", [
            {"figure": f"{count} releases at one instant: last public",
             "target": f"<= {LAST_TARGET_MS:g} ms (every trial)",
             "limit": f"{fmt(limit.p50)} ms",
             "measured": f"p50 {fmt(last.p50)} ms, max {fmt(last.max)} ms",
             "verdict": verdict(last_ok)},
            {"figure": f"{count} releases at one instant: last public / limit",
             "target": f"<= {RATIO_TARGET:g}x", "limit": f"{fmt(limit.p50)} ms",
             "measured": f"ratio p50 {ratio_cell}", "verdict": verdict(ratio_ok)},
            {"figure": f"{count} releases at one instant: missed", "target": "0", "limit": "",
             "measured": f"{missed} in {trials} trials", "verdict": verdict(missed == 0)},
            {"figure": f"{count} releases at one instant: early", "target": "0", "limit": "",
             "measured": f"{early_total} in {trials} trials (polling, file ctime)",
             "verdict": verdict(early_total == 0)},
        ])
    return 0


if __name__ == "__main__":
    run_main(main)
