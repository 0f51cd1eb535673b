"""Queue 1,000 one-document releases, against the fsyncs and commits they need.

    python bench/queue_many.py [--trials N] [--quick] [--releases 1000]

Per trial, in a fresh data dir (SQLite database, local vault) on the temp
folder's filesystem, three rows run one after the other, so that noise from
the machine's other users hits each trial's rows alike:

- queue: --releases releases through ReleaseService.queue in this process,
  one tiny document each, no recipients (the real path: the pending marker,
  the document sealed into the vault, the data key sealed with HPKE, the
  release, its document and its audit event recorded, the detail read back).
  os.fsync is wrapped (counted, not changed) and told apart by what it syncs
  (a file or a folder); SQLAlchemy's commit event counts transactions, and
  which of them wrote (an INSERT, UPDATE or DELETE ran in it).
- limit, new model: the same number of raw fsyncs and commits per release as
  this trial's queue made, and nothing else: per release a fresh folder
  beside the vault, as many small files as the queue fsynced files (each
  written and fsynced), as many folder fsyncs as it made (the new folder,
  then its parent, in turn), and as many SQLite commits as it made
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
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from _common import Cleanup, Summary, base_parser, fmt, machine, table, trials_of, verdict

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
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notice.txt").write_text("A short published notice for the queue bench.\n")
    manifest = folder / "manifest.toml"
    manifest.write_text('title = "Queue many"\npublish_on = "2030-01-01"\n\n'
                        '[[documents]]\npath = "notice.txt"\nkind = "report"\n')
    return manifest


def queue_many(root: Path, count: int) -> tuple[float, Counts]:
    """``count`` releases queued into a fresh data dir under ``root``;
    returns the seconds taken and what they cost in fsyncs and commits."""
    from config.settings import load_settings
    from jobs.app import build_services
    from release import keys
    from release.manifest import load_manifest
    from release.service import ReleaseService

    data = root / "data"
    settings = load_settings(environ={}, overrides={"data_dir": str(data)})
    services = build_services(settings)
    try:
        keys.init_keys(settings.keys_dir)
        service = ReleaseService(services, actor="bench@queue")
        spec = load_manifest(_manifest(root / "doc"), publish_on="2030-01-01T00:00:00Z")
        base = datetime.now(UTC).replace(microsecond=0) + timedelta(days=30)
        specs = [dataclasses.replace(spec, title=f"Queue many {i:05d}", publish_on=(
            base + timedelta(minutes=i)).strftime("%Y-%m-%dT%H:%M:%SZ")) for i in range(count)]
        counts = Counts()
        count_commits(services.engine, counts)
        with counting_fsyncs(counts):
            start = time.perf_counter()
            for one in specs:
                service.queue(one)
            took = time.perf_counter() - start
        return took, counts
    finally:
        services.engine.dispose()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_limit(root: Path, count: int, files: float, folders: float, commits: float) -> float:
    """Seconds for ``count`` releases' worth of raw fsyncs and commits: per
    release ``files`` small files written and fsynced, ``folders`` folder
    fsyncs, ``commits`` one-row SQLite commits (fractions spread evenly)."""
    parent = root / "raw"
    parent.mkdir(parents=True)
    db = sqlite3.connect(root / "raw.db", isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
        row = os.urandom(1024)
        payload = os.urandom(SMALL)
        done_files = done_folders = done_commits = 0
        start = time.perf_counter()
        for i in range(count):
            folder = parent / f"r{i:06d}"
            folder.mkdir()
            while done_files < round(files * (i + 1)):
                fd = os.open(folder / f"f{done_files}", os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                             0o644)
                try:
                    os.write(fd, payload)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                done_files += 1
            while done_folders < round(folders * (i + 1)):
                _fsync_path(folder if done_folders % 2 == 0 else parent)
                done_folders += 1
            while done_commits < round(commits * (i + 1)):
                db.execute("BEGIN IMMEDIATE")
                db.execute("INSERT INTO t (v) VALUES (?)", (row,))
                db.execute("COMMIT")
                done_commits += 1
        return time.perf_counter() - start
    finally:
        db.close()


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0], trials=5, quick=2)
    parser.add_argument("--releases", type=int, default=1000,
                        help="releases per trial (default 1000)")
    args = parser.parse_args()
    trials = trials_of(args)
    count = max(1, args.releases)
    queue_s: list[float] = []
    new_s: list[float] = []
    old_s: list[float] = []
    ratio_new: list[float] = []
    ratio_old: list[float] = []
    per: list[tuple[float, float, float, float]] = []
    with Cleanup() as cleanup:
        work = cleanup.tempdir("queue-many")
        print(f"queue_many: {count} releases a trial, {trials} trials, in {work}")
        for trial in range(trials):
            root = work / f"t{trial}"
            took, counts = queue_many(root / "q", count)
            files, folders, commits, writing = counts.per(count)
            limit_new = raw_limit(root / "new", count, files, folders, commits)
            limit_old = raw_limit(root / "old", count, *OLD_MODEL)
            queue_s.append(took)
            new_s.append(limit_new)
            old_s.append(limit_old)
            ratio_new.append(took / limit_new)
            ratio_old.append(took / limit_old)
            per.append((files, folders, commits, writing))
            print(f"  trial {trial + 1}/{trials}: queue {took:.2f} s "
                  f"({files:g} file + {folders:g} folder fsyncs, {commits:g} commits "
                  f"({writing:g} writing) per release); limit {limit_new:.2f} s; "
                  f"old model {limit_old:.2f} s", flush=True)
            shutil.rmtree(root, ignore_errors=True)
        files, folders, commits, writing = per[-1]
        print()
        print(f"queue_many — {count} one-document releases per trial, {trials} trials, "
              "fresh SQLite data dir each trial, rows interleaved per trial")
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
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; temporary files removed", file=sys.stderr)
        sys.exit(130)
