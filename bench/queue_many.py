"""Queue 1,000 one-document releases, against the fsyncs and commits they need.

    python bench/queue_many.py [--trials N] [--quick] [--releases 1000] [--chunk 50]

Per trial, in a fresh data dir (SQLite database, local vault) on the temp
folder's filesystem, three rows take turns, --chunk releases at a time, so
that noise from the machine's other users (six people on two cores) hits
each row alike, not whichever ran during a burst:

- queue: --releases releases through ReleaseService.queue in this process,
  one tiny document each, no recipients (the real path: the document
  sealed into the vault, the data key sealed with HPKE, the release, its
  document and its audit event recorded, the detail built).
  os.fsync is wrapped (counted, not changed) and told apart by what it syncs
  (a file or a folder); SQLAlchemy's commit event counts transactions, and
  which of them wrote (an INSERT, UPDATE or DELETE ran in it).
- limit, new model: the same number of raw fsyncs and commits as the queue
  made in the chunk just before, and nothing else: per release a fresh
  folder beside the vault, as many small files as the queue fsynced files
  (each written and fsynced), as many folder fsyncs as it made (the new
  folder, then its parent, in turn), and as many SQLite commits as it made
  transactions, each one INSERT of a 1 KiB row into a WAL database with
  synchronous=FULL (as storage.db opens it), on the same filesystem.
- limit, old cost model: the issue's limit, 4 fsyncs (2 files, 2 folders) and
  2 commits per release, done the same raw way.

Target: queue <= 2x the new-model limit (the limit of its own fsyncs and
commits), judged on the median of the per-trial ratios.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sqlite3
import stat
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from _common import (
    Cleanup,
    Summary,
    base_parser,
    emit_summary,
    fmt,
    machine,
    one_document_manifest,
    run_main,
    table,
    trials_of,
    verdict,
)

RATIO_TARGET = 2.0
OLD_MODEL = (2, 2, 2)  # the limit per release: file fsyncs, folder fsyncs, commits
SMALL = 256  # bytes per raw file: about a tiny sealed document or a sealed data key


@dataclasses.dataclass
class Counts:
    file_fsyncs: int = 0
    dir_fsyncs: int = 0
    commits: int = 0
    writing_commits: int = 0

    def per(self, n: int) -> tuple[float, float, float, float]:
        return (self.file_fsyncs / n, self.dir_fsyncs / n, self.commits / n,
                self.writing_commits / n)


@contextlib.contextmanager
def counting_fsyncs(counts: Counts) -> Iterator[None]:
    """os.fsync wrapped to count file and folder fsyncs (the call is unchanged)."""
    real = os.fsync

    def fsync(fd: Any) -> None:
        try:
            is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        except (OSError, TypeError):
            is_dir = False
        if is_dir:
            counts.dir_fsyncs += 1
        else:
            counts.file_fsyncs += 1
        real(fd)

    os.fsync = fsync
    try:
        yield
    finally:
        os.fsync = real


def count_commits(engine: Any, counts: Counts) -> None:
    from sqlalchemy import event

    @event.listens_for(engine, "before_cursor_execute")
    def _statement(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip()[:6].upper() in ("INSERT", "UPDATE", "DELETE"):
            conn.info["wrote"] = True

    @event.listens_for(engine, "commit")
    def _commit(conn: Any) -> None:
        counts.commits += 1
        if conn.info.pop("wrote", False):
            counts.writing_commits += 1


def _manifest(folder: Path) -> Path:
    return one_document_manifest(folder, "Queue many",
                                 b"A short published notice for the queue bench.\n")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RawLimit:
    """Releases' worth of raw fsyncs and commits, a chunk at a time: per
    release a fresh folder, ``files`` small files written and fsynced,
    ``folders`` folder fsyncs, ``commits`` one-row SQLite commits (fractions
    spread evenly over the releases)."""

    def __init__(self, root: Path) -> None:
        self.parent = root / "raw"
        self.parent.mkdir(parents=True)
        self.db = sqlite3.connect(root / "raw.db", isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
        self.row = os.urandom(1024)
        self.payload = os.urandom(SMALL)
        self.releases = 0
        self.seconds = 0.0

    def run(self, count: int, files: float, folders: float, commits: float) -> None:
        done_files = done_folders = done_commits = 0
        start = time.perf_counter()
        for i in range(count):
            folder = self.parent / f"r{self.releases + i:06d}"
            folder.mkdir()
            while done_files < round(files * (i + 1)):
                fd = os.open(folder / f"f{done_files}", os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                             0o644)
                try:
                    os.write(fd, self.payload)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                done_files += 1
            while done_folders < round(folders * (i + 1)):
                _fsync_path(folder if done_folders % 2 == 0 else self.parent)
                done_folders += 1
            while done_commits < round(commits * (i + 1)):
                self.db.execute("BEGIN IMMEDIATE")
                self.db.execute("INSERT INTO t (v) VALUES (?)", (self.row,))
                self.db.execute("COMMIT")
                done_commits += 1
        self.seconds += time.perf_counter() - start
        self.releases += count

    def close(self) -> None:
        self.db.close()


@dataclasses.dataclass
class Trial:
    queue_s: float
    new_s: float
    old_s: float
    counts: Counts


def one_trial(root: Path, count: int, chunk: int) -> Trial:
    """``count`` releases queued into a fresh data dir under ``root``, each
    chunk followed by the same chunk of both raw limits."""
    from config.settings import load_settings
    from jobs.app import build_services
    from release import keys
    from release.manifest import load_manifest
    from release.service import ReleaseService

    data = root / "q" / "data"
    settings = load_settings(environ={}, overrides={"data_dir": str(data)})
    services = build_services(settings)
    new, old = RawLimit(root / "new"), RawLimit(root / "old")
    try:
        keys.init_keys(settings.keys_dir)
        service = ReleaseService(services, actor="bench@queue")
        spec = load_manifest(_manifest(root / "q" / "doc"), publish_on="2030-01-01T00:00:00Z")
        base = datetime.now(UTC).replace(microsecond=0) + timedelta(days=30)
        specs = [dataclasses.replace(spec, title=f"Queue many {i:05d}", publish_on=(
            base + timedelta(minutes=i)).strftime("%Y-%m-%dT%H:%M:%SZ")) for i in range(count)]
        counts = Counts()
        count_commits(services.engine, counts)
        took = 0.0
        for first in range(0, count, chunk):
            part = specs[first:first + chunk]
            before = dataclasses.replace(counts)
            with counting_fsyncs(counts):
                start = time.perf_counter()
                for one in part:
                    service.queue(one)
                took += time.perf_counter() - start
            n = len(part)
            new.run(n, (counts.file_fsyncs - before.file_fsyncs) / n,
                    (counts.dir_fsyncs - before.dir_fsyncs) / n,
                    (counts.commits - before.commits) / n)
            old.run(n, *OLD_MODEL)
        return Trial(queue_s=took, new_s=new.seconds, old_s=old.seconds, counts=counts)
    finally:
        new.close()
        old.close()
        services.engine.dispose()


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0], trials=5, quick=2)
    parser.add_argument("--releases", type=int, default=1000,
                        help="releases per trial (default 1000)")
    parser.add_argument("--chunk", type=int, default=50,
                        help="releases each row runs before the next takes its turn (default 50)")
    args = parser.parse_args()
    trials = trials_of(args)
    count = max(1, args.releases)
    chunk = max(1, args.chunk)
    queue_s: list[float] = []
    new_s: list[float] = []
    old_s: list[float] = []
    ratio_new: list[float] = []
    ratio_old: list[float] = []
    per: list[tuple[float, float, float, float]] = []
    with Cleanup() as cleanup:
        work = cleanup.tempdir("queue-many")
        print(f"queue_many: {count} releases a trial, {chunk} a turn, {trials} trials, in {work}")
        for trial in range(trials):
            root = work / f"t{trial}"
            done = one_trial(root, count, chunk)
            files, folders, commits, writing = done.counts.per(count)
            queue_s.append(done.queue_s)
            new_s.append(done.new_s)
            old_s.append(done.old_s)
            ratio_new.append(done.queue_s / done.new_s)
            ratio_old.append(done.queue_s / done.old_s)
            per.append((files, folders, commits, writing))
            print(f"  trial {trial + 1}/{trials}: queue {done.queue_s:.2f} s "
                  f"({files:g} file + {folders:g} folder fsyncs, {commits:g} commits "
                  f"({writing:g} writing) per release); limit {done.new_s:.2f} s; "
                  f"old model {done.old_s:.2f} s", flush=True)
            shutil.rmtree(root, ignore_errors=True)
        files, folders, commits, writing = per[-1]
        print()
        print(f"queue_many — {count} one-document releases per trial, {trials} trials, "
              f"fresh SQLite data dir each trial, rows taking turns {chunk} releases at a time")
        print(f"machine: {machine()}")
        print(f"counted in the queue (last trial, per release): {files:g} file fsyncs, "
              f"{folders:g} folder fsyncs, {commits:g} transactions ({writing:g} writing)")
        print()
        rows = []
        for name, model, values in (
                ("queue (ReleaseService.queue)", "-", queue_s),
                ("limit: raw, its own fsyncs + commits",
                 f"{files + folders:g} ({files:g}+{folders:g}) + {commits:g}", new_s),
                ("limit: raw, old cost model (the issue's)",
                 f"{sum(OLD_MODEL[:2])} ({OLD_MODEL[0]}+{OLD_MODEL[1]}) + {OLD_MODEL[2]}",
                 old_s)):
            s = Summary.of(values)
            rows.append([name, model, str(s.n), fmt(s.p50, 2), fmt(s.min, 2), fmt(s.max, 2),
                         fmt(s.p50 / count * 1000, 2)])
        print(table(rows, ["row", "fsyncs (files+folders) + commits per release", "n",
                           "median s", "min s", "max s", "ms per release"],
                    title=f"{count} releases"))
        print()
        ratios = []
        for name, values, judged in (("queue / its own fsyncs + commits", ratio_new, True),
                                     ("queue / old cost model", ratio_old, False)):
            s = Summary.of(values)
            ratios.append([name, str(s.n), f"{s.p50:.2f}x", f"{s.max:.2f}x",
                           f"<= {RATIO_TARGET:g}x" if judged else "(info)",
                           verdict(s.p50 <= RATIO_TARGET) if judged else ""])
        print(table(ratios, ["ratio (same trial)", "n", "median", "worst", "target",
                             "verdict"]))
        judged = Summary.of(ratio_new)
        emit_summary("queue_many", [{
            "figure": f"queue {count} one-document releases / its own fsyncs + commits",
            "target": f"<= {RATIO_TARGET:g}x (median of trials)",
            "limit": (f"{fmt(Summary.of(new_s).p50 / count * 1000, 2)} ms a release "
                      f"({files + folders:g} fsyncs + {commits:g} commits)"),
            "measured": (f"{fmt(Summary.of(queue_s).p50 / count * 1000, 2)} ms a release; "
                         f"ratio p50 {judged.p50:.2f}x, worst {judged.max:.2f}x "
                         f"({trials} trials)"),
            "verdict": verdict(judged.p50 <= RATIO_TARGET)}])
    return 0


if __name__ == "__main__":
    run_main(main, cleaned="temporary files")
