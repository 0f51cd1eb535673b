"""The seed-shaped bundle at the embargo instant: how late is it public, how
late are the notices, and is anything early? (issue 16)

    python bench/publish_latency.py [--trials N] [--quick] [--backend local|s3|all]
                                    [--ahead S] [--set KEY=VALUE ...] [--log]

Per backend, one fresh data dir and ONE `embargo -v run` child, started and
ready before the first instant and reused across trials (a long-running
scheduler, as in production). Each trial queues a new release of the
seed-shaped bundle (a 5 MiB report, 43 letters of 100 KiB, 43 liaison
officers and the owner) with `embargo queue --publish-on <ISO Z>` at a whole
second about --ahead seconds after `queue` returns; the running scheduler
finds it at its next poll. Settings reach the children as EMBARGO_*
variables (--set scheduler.publish_workers=8 and so on); the bench reads the
effective values the same way, so its limits use the same concurrency.

What is measured, never from the project's own records:

- Public appearance, folder: by polling (the release's folder listed every
  ~1 ms; a document is public at the latest at the end of the first listing
  that shows it, at the earliest at the start of the listing before) AND by
  file timestamps: each public file's st_ctime, set by the link or rename
  that made it public, or by a later change of the inode (the staged name
  unlinked): never before the moment it became public. A ctime before the
  instant is therefore early for sure; a later change could hide an early
  link from the ctime, which is why the listing runs as well.
  Linux stamps files from its coarse clock, which lags the true time by up
  to a scheduler tick: the lag is measured in the same run (a staged file
  renamed right after reading time.time()) and printed; a ctime up to that
  lag before the instant is counted apart, not as early. st_mtime is when
  the bytes were written, i.e. staged before the instant: shown, not used.
- Public appearance, S3: by polling the bucket (every 10 ms plus the call,
  as each listing costs the moto server CPU) and by each object's
  LastModified (whole seconds, so exact for early at whole-second instants).
- Notices: the time this process's aiosmtpd server ran its DATA handler.

The limits, measured in the same run, after every trial (the child is idle
then), so that load hits figure and limit alike:

- raw decrypt + write + fsync each, on scheduler.publish_workers threads
  (release.sealing.open_stream of the same sealed bytes); the same with one
  fsync of the folder at the end instead of one per file; and the floor of
  "stage before, rename at the instant": renaming 44 staged files into a new
  folder and fsyncing it once;
- S3: plain PUTs of the same 44 plaintexts to the same moto server (its own
  process) at the same concurrency, with the same headers (Content-Type,
  Cache-Control, x-amz-checksum-sha256, If-None-Match), timed from the first
  PUT to the last object listed by the same poll as in a trial (so figure and
  limit carry the same poll load and resolution; the last answer is shown);
- notices: the time until the last document is public (that trial) plus
  smtplib alone sending the same 44 messages (as the server received them)
  to the same server over mail.workers connections, opened beforehand;
- the wake-up lag of a bare APScheduler 3 date job, at the start.

Targets (issue 16): folder, last document public p50 <= 10 ms and max <= 25
ms, first and last within 5 ms (every trial); S3, last document public <=
1.2x the plain PUTs (median of the per-trial ratios); last notice accepted
<= 1.3x its limit (median of the per-trial ratios); 0 early, 0 missed.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import math
import os
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _common import (
    Cleanup,
    EmbargoRun,
    FileClock,
    MotoServer,
    SmtpSink,
    Summary,
    base_parser,
    child_env,
    effective_settings,
    emit_summary,
    file_clock,
    fmt,
    iso_z,
    machine,
    run_embargo,
    run_main,
    s3_backend_missing,
    table,
    trials_of,
    verdict,
    write_bundle,
)

from storage.local import _fsync_dir

LETTERS = 43
DOCS = LETTERS + 1
NOTICES = LETTERS + 1  # 43 officers and the owner's summary
FOLDER_P50_MS, FOLDER_MAX_MS, SPREAD_MS = 10.0, 25.0, 5.0
S3_RATIO, NOTICE_RATIO = 1.2, 1.3
TRIAL_TIMEOUT = 30.0  # seconds after the instant before a trial is declared missed
S3_POLL_S = 0.010
PUBLIC_BUCKET, VAULT_BUCKET, RAW_BUCKET = "bench-public", "bench-vault", "bench-raw"


# -- the limits ---------------------------------------------------------------------
def aps_lag(trials: int) -> list[float]:
    """Wake-up lag (ms) of a bare APScheduler 3 date job that does nothing."""
    from apscheduler.executors.pool import ThreadPoolExecutor as ApsPool
    from apscheduler.schedulers.background import BackgroundScheduler

    lags: list[float] = []
    done = threading.Event()

    def job(due: float) -> None:
        lags.append((time.time() - due) * 1000)
        done.set()

    scheduler = BackgroundScheduler(executors={"default": ApsPool(4)},
                                    job_defaults={"misfire_grace_time": None}, timezone=UTC)
    scheduler.start()
    try:
        for _ in range(trials):
            due = math.ceil((time.time() + 0.1) * 10) / 10
            done.clear()
            scheduler.add_job(job, "date", run_date=datetime.fromtimestamp(due, UTC), args=[due])
            if not done.wait(5):
                lags.append(math.nan)
    finally:
        scheduler.shutdown(wait=True)
    return lags


class RawWork:
    """The same documents, sealed once by this process, for the limit rows."""

    def __init__(self, bundle: Path, names: list[str], work: Path, threads: int) -> None:
        from release import sealing

        self.work = work
        self.threads = max(1, threads)
        self.dek = sealing.new_dek()
        sealed = work / "sealed"
        sealed.mkdir(parents=True)
        self.docs: list[tuple[str, Path]] = []
        self.blobs: list[tuple[bytes, str]] = []  # plaintext, base64 SHA-256
        for i, name in enumerate(names):
            src = bundle / name if i == 0 else bundle / "letters" / name
            doc_id = f"doc_{i:04d}"
            with src.open("rb") as fin, (sealed / doc_id).open("wb") as fout:
                sealing.seal_stream(self.dek, doc_id, fin, fout)
            self.docs.append((doc_id, sealed / doc_id))
            blob = src.read_bytes()
            self.blobs.append((blob, base64.b64encode(hashlib.sha256(blob).digest()).decode()))
        self._n = 0

    def _folder(self) -> Path:
        self._n += 1
        path = self.work / f"out-{self._n}"
        path.mkdir()
        return path

    def _open_all(self, target: Path, fsync_each: bool) -> None:
        from release import sealing

        def one(item: tuple[str, Path]) -> None:
            doc_id, path = item
            fd = os.open(target / doc_id, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
            with path.open("rb") as fin, os.fdopen(fd, "wb") as fout:
                sealing.open_stream(self.dek, doc_id, fin, fout)
                if fsync_each:
                    fout.flush()
                    os.fsync(fout.fileno())

        with ThreadPoolExecutor(self.threads) as pool:
            list(pool.map(one, self.docs))

    def decrypt_fsync_each(self) -> float:
        """ms: decrypt + write + fsync every document, on ``threads`` threads."""
        target = self._folder()
        start = time.perf_counter()
        self._open_all(target, fsync_each=True)
        took = time.perf_counter() - start
        _remove(target)
        return took * 1000

    def decrypt_fsync_once(self) -> float:
        """ms: decrypt + write every document on ``threads`` threads, then one
        fsync of the folder (the file data is not made durable)."""
        target = self._folder()
        start = time.perf_counter()
        self._open_all(target, fsync_each=False)
        _fsync_dir(target)
        took = time.perf_counter() - start
        _remove(target)
        return took * 1000

    def rename_floor(self) -> float:
        """ms: rename 44 staged (written, fsynced) files into a new folder and
        fsync it once: what is left at the instant when everything else
        happened before it."""
        staged = self._folder()
        for doc_id, blob in zip((d for d, _ in self.docs), self.blobs, strict=True):
            fd = os.open(staged / doc_id, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as out:
                out.write(blob[0])
                out.flush()
                os.fsync(out.fileno())
        _fsync_dir(staged)
        public = self.work / f"public-{self._n}"
        start = time.perf_counter()
        public.mkdir()
        for doc_id, _ in self.docs:
            os.rename(staged / doc_id, public / doc_id)
        _fsync_dir(public)
        took = time.perf_counter() - start
        _remove(staged)
        _remove(public)
        return took * 1000

    def s3_puts(self, client: Any, poll_client: Any, prefix: str, concurrency: int,
                cache_control: str | None) -> tuple[float, float, float]:
        """PUT the 44 plaintexts, ``concurrency`` at a time, as the publisher's
        create-only PUTs are made, while the bucket is listed as in a trial.
        Returns ms from the first PUT to: the last PUT's answer; the last
        object listed (at the latest); … not yet listed (at the earliest)."""
        def put(item: tuple[int, tuple[bytes, str]]) -> None:
            i, (blob, checksum) = item
            extra: dict[str, Any] = {"ContentType": "text/plain"}
            if cache_control:
                extra["CacheControl"] = cache_control
            client.put_object(Bucket=RAW_BUCKET, Key=f"{prefix}/{i:04d}", Body=blob,
                              IfNoneMatch="*", ChecksumAlgorithm="SHA256",
                              ChecksumSHA256=checksum, **extra)

        want = {f"{i:04d}" for i in range(len(self.blobs))}
        poller = Poller(s3_lister(poll_client, RAW_BUCKET, f"{prefix}/"), S3_POLL_S, want)
        with ThreadPoolExecutor(max(1, concurrency)) as pool:
            poller.start()
            start = time.time()
            list(pool.map(put, enumerate(self.blobs)))
            answered = time.time()
        deadline = time.time() + 10
        while not want <= poller.seen.keys() and time.time() < deadline and poller.is_alive():
            time.sleep(0.005)
        poller.stop()
        if not want <= poller.seen.keys():
            return (answered - start) * 1000, math.nan, math.nan
        last = max(want, key=lambda k: poller.seen[k])
        return ((answered - start) * 1000, (poller.seen[last] - start) * 1000,
                (poller.absent[last] - start) * 1000)


def _remove(folder: Path) -> None:
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()


# -- watching the public location -------------------------------------------------------
class Poller(threading.Thread):
    """Lists one release's public folder (or S3 prefix) in a loop. For each
    name: ``seen`` = end of the first listing that showed it (it was public
    by then), ``absent`` = start of the last listing before that one (it was
    not public before then). Stops by itself once every name in ``want`` was
    seen, so it does not compete with the notices that follow."""

    def __init__(self, lister: Callable[[], list[str]], interval: float, want: set[str]
                 ) -> None:
        super().__init__(name="bench-poller", daemon=True)
        self.lister = lister
        self.interval = interval
        self.want = want
        self.seen: dict[str, float] = {}
        self.absent: dict[str, float] = {}
        self.periods: list[float] = []
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        previous_start = math.nan
        last_end = None
        try:
            while not self.stop_event.is_set():
                started = time.time()
                names = self.lister()
                ended = time.time()
                for name in names:
                    if name not in self.seen:
                        self.seen[name] = ended
                        self.absent[name] = previous_start
                previous_start = started
                if last_end is not None:
                    self.periods.append(ended - last_end)
                last_end = ended
                if self.want <= self.seen.keys():
                    return
                time.sleep(self.interval)
        except BaseException as exc:  # reported by the trial
            self.error = exc

    def stop(self) -> None:
        self.stop_event.set()
        self.join(5)


def local_lister(folder: Path) -> Callable[[], list[str]]:
    def names() -> list[str]:
        try:
            return [n for n in os.listdir(folder) if not n.startswith(".")]
        except FileNotFoundError:
            return []

    return names


def s3_lister(client: Any, bucket: str, prefix: str) -> Callable[[], list[str]]:
    def names() -> list[str]:
        out = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
        return [o["Key"][len(prefix):] for o in out.get("Contents", [])]

    return names


# -- one backend ----------------------------------------------------------------------
@dataclass
class Trial:
    lead_s: float  # instant minus the time `embargo queue` returned
    first_ms: float = math.nan  # poll: the first document public, at the latest
    last_ms: float = math.nan  # poll: the last document public, at the latest
    last_lo_ms: float = math.nan  # poll: … at the earliest
    spread_ms: float = math.nan  # poll: last - first
    ctime_first_ms: float = math.nan
    ctime_last_ms: float = math.nan
    ctime_spread_ms: float = math.nan
    start_ms: float = math.nan  # manifest.json lateness_ms (the project's own figure)
    notice_ms: float = math.nan  # last notice accepted by the SMTP server
    notices: int = 0
    early_poll: int = 0  # listed by a listing that ended before the instant
    early_stamp: int = 0  # ctime more than the file clock's lag before the instant / LastModified
    stamp_within_lag: int = 0  # ctime before the instant, but within the file clock's lag
    written_before: int = 0  # documents whose mtime (bytes written) is before the instant
    early_notices: int = 0
    missed: int = 0
    failed: bool = False
    poll_ms: float = math.nan
    problem: str = ""
    # the limits, measured right after this trial
    raw_fsync_ms: float = math.nan
    raw_once_ms: float = math.nan
    rename_ms: float = math.nan
    put_ms: float = math.nan  # the plain PUTs: until the last answer
    put_seen_ms: float = math.nan  # … until the last object listed, at the latest
    put_seen_lo_ms: float = math.nan  # … at the earliest
    smtp_alone_ms: float = math.nan

    @property
    def notice_limit_ms(self) -> float:
        return self.last_ms + self.smtp_alone_ms

    @property
    def notice_ratio(self) -> float:
        return self.notice_ms / self.notice_limit_ms

    @property
    def put_ratio(self) -> float:
        return self.last_ms / self.put_seen_ms  # both by the same poll, at the latest


@dataclass
class Backend:
    kind: str
    trials: list[Trial] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped: str = ""


def notices_of(sink: SmtpSink, release_id: str) -> list[tuple[float, str]]:
    """The "published" notices and the owner's summary of ``release_id``."""
    return [(t, m) for t, m in sink.for_release(release_id)
            if ".published." in m or ".owner_summary." in m]


def run_backend(kind: str, trials: int, cleanup: Cleanup, sink: SmtpSink, raw: RawWork,
                moto: MotoServer | None, ahead: float, settings_env: dict[str, str],
                log_all: bool) -> Backend:
    root = cleanup.tempdir(f"latency-{kind}")
    data = root / "var"
    bundle = root / "bundle"
    env = child_env({"EMBARGO_MAIL_TRANSPORT": "smtp", "EMBARGO_MAIL_SMTP_HOST": "127.0.0.1",
                     "EMBARGO_MAIL_SMTP_PORT": str(sink.port),
                     "EMBARGO_MAIL_SMTP_SECURITY": "none", **settings_env})
    poll_client = put_client = None
    if kind == "s3":
        assert moto is not None
        admin = moto.client()
        for bucket in (PUBLIC_BUCKET, VAULT_BUCKET):
            admin.create_bucket(Bucket=bucket)
        env.update(moto.env())
        env["EMBARGO_STORAGE_VAULT"] = f"s3://{VAULT_BUCKET}/vault"
        env["EMBARGO_STORAGE_PUBLIC"] = f"s3://{PUBLIC_BUCKET}/public"
        poll_client, put_client = moto.client(), moto.client()
    values = effective_settings(env, "scheduler.publish_workers", "mail.workers",
                                "s3.cache_control", "scheduler.lead_seconds",
                                "scheduler.poll_seconds", "s3.verify")
    if kind != "s3" or values["s3.verify"] is None:
        values.pop("s3.verify")
    out = Backend(kind=kind, settings=values)
    publish_workers = int(values["scheduler.publish_workers"] or 4)
    mail_workers = int(values["mail.workers"] or 4)
    run_embargo(data, "keys", "init", env=env)
    run = EmbargoRun(cleanup, data, env)
    run.wait_for(r"embargo scheduler running", timeout=60)
    db = data / "embargo.db"
    queue_estimate = 1.5
    try:
        for i in range(trials):
            manifest, names = write_bundle(bundle, letters=LETTERS,
                                           title=f"Bench {kind} trial {i + 1}")
            instant = math.ceil(time.time() + queue_estimate * 1.3 + ahead)
            began = time.time()
            done = run_embargo(data, "queue", str(manifest), "--publish-on", iso_z(instant),
                               env=env)
            queued = time.time()
            queue_estimate = queued - began
            ids = re.findall(r"\brel_[0-9A-Za-z]+\b", done.stdout)
            if not ids:
                raise RuntimeError(f"no release id in the output of embargo queue: "
                                   f"{done.stdout[-500:]!r}")
            release_id = ids[-1]
            with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
                (slug,) = conn.execute("SELECT slug FROM releases WHERE id = ?",
                                       (release_id,)).fetchone()
            if kind == "local":
                lister = local_lister(data / "public" / slug)
            else:
                lister = s3_lister(poll_client, PUBLIC_BUCKET, f"public/{slug}/")
            want = set(names) | {"manifest.json"}
            poller = Poller(lister, 0.001 if kind == "local" else S3_POLL_S, want)
            poller.start()
            trial = Trial(lead_s=instant - queued)
            deadline = instant + TRIAL_TIMEOUT
            try:
                while time.time() < deadline:
                    if poller.error is not None:
                        raise poller.error
                    if want <= poller.seen.keys() and \
                            len(notices_of(sink, release_id)) >= NOTICES:
                        break
                    time.sleep(0.02)
            finally:
                poller.stop()
            _judge(trial, kind, instant, names, poller, sink, release_id)
            if kind == "local":
                _stamps_local(trial, instant, data / "public" / slug, names, raw_clock_lag())
            else:
                _stamps_s3(trial, instant, poll_client, f"public/{slug}/", names)
            _state(trial, db, release_id)
            # the limits, now, while the child is idle
            if kind == "local":
                trial.raw_fsync_ms = raw.decrypt_fsync_each()
                trial.raw_once_ms = raw.decrypt_fsync_once()
                trial.rename_ms = raw.rename_floor()
            else:
                trial.put_ms, trial.put_seen_ms, trial.put_seen_lo_ms = raw.s3_puts(
                    put_client, poll_client, f"{kind}{i}", publish_workers,
                    values["s3.cache_control"])
            messages = sink.envelopes_of([m for _, m in notices_of(sink, release_id)])
            if messages:
                trial.smtp_alone_ms = sink.replay(messages, mail_workers)
            out.trials.append(trial)
            print(f"  {kind} trial {i + 1}/{trials}: lead {trial.lead_s:.2f} s; last document "
                  f"{fmt(trial.last_ms)} ms (ctime {fmt(trial.ctime_last_ms)}), spread "
                  f"{fmt(trial.spread_ms)}; last notice {fmt(trial.notice_ms)} ms "
                  f"({trial.notices}); limits: fsync-each {fmt(trial.raw_fsync_ms)}, rename "
                  f"{fmt(trial.rename_ms)}, put {fmt(trial.put_ms)}, smtplib "
                  f"{fmt(trial.smtp_alone_ms)}; early {trial.early_poll}/{trial.early_stamp}/"
                  f"{trial.early_notices}{', ' + trial.problem if trial.problem else ''}",
                  flush=True)
    finally:
        run.stop()
    if log_all:
        print(run.tail(100000))
    errors = run.errors()
    if errors:
        out.notes.append(f"embargo run logged {len(errors)} warnings or errors, most often:")
        out.notes += [f"  {kind}" for kind in run.error_kinds()]
    return out


_CLOCK: list[FileClock] = []


def raw_clock_lag() -> float:
    """The largest file-clock lag measured in this run, ms."""
    return max((c.max_lag_ms for c in _CLOCK), default=0.0)


def _judge(trial: Trial, kind: str, instant: float, names: list[str], poller: Poller,
           sink: SmtpSink, release_id: str) -> None:
    seen = {n: (t - instant) * 1000 for n, t in poller.seen.items()}
    absent = {n: (t - instant) * 1000 for n, t in poller.absent.items()}
    docs = [n for n in names if n in seen]
    trial.missed = len(names) - len(docs)
    early = [f"{n} listed {-t:.1f} ms before" for n, t in seen.items() if t < 0]
    trial.early_poll = len(early)
    if docs:
        first = min(docs, key=lambda n: seen[n])
        last = max(docs, key=lambda n: seen[n])
        trial.first_ms, trial.last_ms = seen[first], seen[last]
        trial.last_lo_ms = absent.get(last, math.nan)
        trial.spread_ms = trial.last_ms - trial.first_ms
    notices = notices_of(sink, release_id)
    accepted = [t for t, _ in notices]
    trial.notices = len(accepted)
    late_notices = [f"notice {m} accepted {(instant - t) * 1000:.1f} ms before"
                    for t, m in notices if t < instant]
    trial.early_notices = len(late_notices)
    early += late_notices
    if accepted:
        trial.notice_ms = (max(accepted) - instant) * 1000
    if poller.periods:
        trial.poll_ms = sorted(poller.periods)[len(poller.periods) // 2] * 1000
    if early:
        trial.problem += "EARLY: " + "; ".join(early[:5]) + " "
    if trial.notices < NOTICES:
        trial.problem += f"{trial.notices} of {NOTICES} notices "


def _stamps_local(trial: Trial, instant: float, folder: Path, names: list[str],
                  lag_ms: float) -> None:
    """Each public file's ctime against the instant, allowing the file clock's lag."""
    ctimes: list[float] = []
    for name in [*names, "manifest.json"]:
        try:
            info = os.stat(folder / name)
        except FileNotFoundError:
            continue
        at = (info.st_ctime_ns / 1e9 - instant) * 1000
        if name != "manifest.json":
            ctimes.append(at)
            trial.written_before += info.st_mtime_ns / 1e9 < instant
        if at < -lag_ms:
            trial.early_stamp += 1
            trial.problem += f"EARLY: {name} ctime {-at:.1f} ms before the instant "
        elif at < 0:
            trial.stamp_within_lag += 1
    if ctimes:
        trial.ctime_first_ms, trial.ctime_last_ms = min(ctimes), max(ctimes)
        trial.ctime_spread_ms = trial.ctime_last_ms - trial.ctime_first_ms


def _stamps_s3(trial: Trial, instant: float, client: Any, prefix: str, names: list[str]
               ) -> None:
    """Each public object's LastModified (whole seconds) against the instant."""
    listing = client.list_objects_v2(Bucket=PUBLIC_BUCKET, Prefix=prefix)
    for item in listing.get("Contents", []):
        modified = item["LastModified"].timestamp()
        if modified < instant:
            trial.early_stamp += 1
            trial.problem += (f"EARLY: {item['Key']} LastModified {item['LastModified']} "
                              "before the instant ")


def _state(trial: Trial, db: Path, release_id: str) -> None:
    """The release's state (missed or failed?) and the manifest's own lateness."""
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        (state,) = conn.execute("SELECT state FROM releases WHERE id = ?",
                                (release_id,)).fetchone()
        try:
            (lateness,) = conn.execute("SELECT lateness_ms FROM releases WHERE id = ?",
                                       (release_id,)).fetchone()
        except sqlite3.OperationalError:  # the column went: the row shows "-"
            lateness = None
    if state != "published":
        trial.failed = True
        trial.problem += f"release {release_id} is {state} "
    if lateness is not None:
        trial.start_ms = float(lateness)


# -- the report ---------------------------------------------------------------------
HEADERS = ["backend", "figure (ms after the instant)", "n", "p50", "max", "target",
           "limit p50 (same run)", "ratio p50 (max)", "verdict"]


def _ratio_cell(ratios: list[float]) -> str:
    s = Summary.of(ratios)
    return f"{fmt(s.p50, 2)}x ({fmt(s.max, 2)}x)" if s.n else "-"


def report(backend: Backend, trials: int) -> tuple[list[list[str]], list[dict[str, str]]]:
    kind, ts = backend.kind, backend.trials
    rows: list[list[str]] = []
    summary: list[dict[str, str]] = []
    where = "folder" if kind == "local" else "S3 (moto)"

    def row(figure: str, values: list[float], target: str = "", limit: float | None = None,
            ratios: list[float] | None = None, ok: bool | None = None,
            summarise: bool = False) -> None:
        s = Summary.of(values)
        rows.append([kind, figure, str(s.n), fmt(s.p50), fmt(s.max), target, fmt(limit),
                     _ratio_cell(ratios) if ratios else "", verdict(ok) if target else ""])
        if summarise:
            measured = f"p50 {fmt(s.p50)} ms, max {fmt(s.max)} ms"
            if ratios:
                measured += f"; ratio p50 {_ratio_cell(ratios)}"
            summary.append({"figure": f"{where}: {figure}", "target": target,
                            "limit": f"{fmt(limit)} ms" if limit is not None else "",
                            "measured": measured, "verdict": verdict(ok)})

    def count(figure: str, total: int, extra: str = "", summarise: bool = True) -> None:
        rows.append([kind, figure, str(len(ts)), f"total {total}", "", "0", "", extra,
                     verdict(total == 0)])
        if summarise:
            summary.append({"figure": f"{where}: {figure}", "target": "0", "limit": "",
                            "measured": f"{total} in {len(ts)} trials" + (
                                f" ({extra})" if extra else ""),
                            "verdict": verdict(total == 0)})

    complete = len(ts) == trials and all(not math.isnan(t.last_ms) for t in ts)
    missed = sum(t.missed for t in ts) + sum(1 for t in ts if t.failed)
    last = Summary.of([t.last_ms for t in ts])
    notice_ratios = [t.notice_ratio for t in ts if not math.isnan(t.notice_ratio)]
    notices_ok = (complete and len(notice_ratios) == len(ts)
                  and all(t.notices >= NOTICES for t in ts)
                  and Summary.of(notice_ratios).p50 <= NOTICE_RATIO)
    if kind == "local":
        rename = Summary.of([t.rename_ms for t in ts]).p50
        row("last document public (poll, at the latest)", [t.last_ms for t in ts],
            f"p50<={FOLDER_P50_MS:g} max<={FOLDER_MAX_MS:g}", rename,
            [t.last_ms / t.rename_ms for t in ts],
            complete and missed == 0 and last.p50 <= FOLDER_P50_MS
            and last.max <= FOLDER_MAX_MS, summarise=True)
        row("last document public (poll, at the earliest)", [t.last_lo_ms for t in ts])
        row("last document public (file ctime)", [t.ctime_last_ms for t in ts], "", rename)
        row("first document public (poll)", [t.first_ms for t in ts])
        row("first document public (file ctime)", [t.ctime_first_ms for t in ts])
        spread = Summary.of([t.spread_ms for t in ts])
        row("first to last document (poll)", [t.spread_ms for t in ts],
            f"max<={SPREAD_MS:g}", None, None,
            complete and spread.max <= SPREAD_MS, summarise=True)
        row("first to last document (file ctime)", [t.ctime_spread_ms for t in ts])
    else:
        puts = Summary.of([t.put_seen_ms for t in ts]).p50
        put_ratios = [t.put_ratio for t in ts if not math.isnan(t.put_ratio)]
        met = (complete and missed == 0 and len(put_ratios) == len(ts)
               and Summary.of(put_ratios).p50 <= S3_RATIO)
        row("last document public (poll, at the latest)", [t.last_ms for t in ts],
            f"<={S3_RATIO:g}x limit", puts, put_ratios, met, summarise=True)
        # the most favourable reading the polls allow: the figure at its earliest,
        # the limit at its latest
        low = [t.last_lo_ms / t.put_seen_ms for t in ts]
        if not met and complete and missed == 0 and Summary.of(low).p50 <= S3_RATIO:
            rows[-1][-1] = summary[-1]["verdict"] = "UNDECIDED (poll resolution)"
        row("last document public (poll, at the earliest)", [t.last_lo_ms for t in ts],
            "", puts, low)
        row("first document public (poll)", [t.first_ms for t in ts])
    row("last document public, own record (lateness_ms)", [t.start_ms for t in ts])
    row(f"last notice accepted by SMTP ({NOTICES}/trial)", [t.notice_ms for t in ts],
        f"<={NOTICE_RATIO:g}x limit", Summary.of([t.notice_limit_ms for t in ts]).p50,
        notice_ratios, notices_ok, summarise=True)
    count("documents early, by polling", sum(t.early_poll for t in ts), summarise=False)
    if kind == "local":
        lag = raw_clock_lag()
        within = sum(t.stamp_within_lag for t in ts)
        count("documents early, by file ctime", sum(t.early_stamp for t in ts),
              f"{within} within the {lag:.1f} ms file-clock lag", summarise=False)
    else:
        count("documents early, by LastModified", sum(t.early_stamp for t in ts),
              summarise=False)
    count("notices early, by SMTP receive time", sum(t.early_notices for t in ts),
          summarise=False)
    early_total = sum(t.early_poll + t.early_stamp + t.early_notices for t in ts)
    summary.append({"figure": f"{where}: early documents and notices",
                    "target": "0", "limit": "",
                    "measured": f"{early_total} in {len(ts)} trials (polling, "
                                + ("file ctime" if kind == "local" else "LastModified")
                                + ", SMTP receive times)",
                    "verdict": verdict(early_total == 0)})
    count("missed/failed documents", missed)
    return rows, summary


def limit_rows(backends: list[Backend], aps: list[float]) -> list[list[str]]:
    rows: list[list[str]] = []

    def add(label: str, values: list[float]) -> None:
        s = Summary.of(values)
        if s.n:
            rows.append([label, str(s.n), fmt(s.p50), fmt(s.max)])

    add("bare APScheduler 3 date job: wake-up lag", aps)
    for backend in backends:
        ts = backend.trials
        workers = backend.settings.get("scheduler.publish_workers")
        mail = backend.settings.get("mail.workers")
        if backend.kind == "local":
            add(f"raw decrypt + write + fsync, {workers} threads: all {DOCS}",
                [t.raw_fsync_ms for t in ts])
            add(f"raw decrypt + write, {workers} threads, one fsync of the folder",
                [t.raw_once_ms for t in ts])
            add(f"rename {DOCS} staged files into a new folder + one fsync",
                [t.rename_ms for t in ts])
        else:
            add(f"S3: plain PUT of the same {DOCS} objects, {workers} at a time: last "
                "listed (poll, at the latest; the limit)", [t.put_seen_ms for t in ts])
            add("S3: the same, last listed at the earliest", [t.put_seen_lo_ms for t in ts])
            add("S3: the same, last PUT answered", [t.put_ms for t in ts])
        add(f"{backend.kind}: smtplib alone, the same {NOTICES} messages, {mail} connections",
            [t.smtp_alone_ms for t in ts])
        add(f"{backend.kind}: notices limit = last document public + smtplib alone",
            [t.notice_limit_ms for t in ts])
    return rows


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0], trials=20, quick=3)
    parser.add_argument("--backend", choices=("local", "s3", "all"), default="all")
    parser.add_argument("--ahead", type=float, default=1.5,
                        help="seconds from `embargo queue` returning to the instant (about)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for the embargo children, e.g. "
                             "scheduler.publish_workers=8 (as EMBARGO_SCHEDULER_PUBLISH_WORKERS)")
    parser.add_argument("--log", action="store_true", help="print the embargo run logs")
    args = parser.parse_args()
    trials = trials_of(args)
    settings_env: dict[str, str] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        settings_env["EMBARGO_" + key.replace(".", "_").upper()] = value
    sys.setswitchinterval(0.0005)  # the poller must not wait 5 ms for the GIL
    with Cleanup() as cleanup:
        print(f"publish_latency: seed-shaped bundle, {trials} trials per backend", flush=True)
        work = cleanup.tempdir("limit")
        _CLOCK.append(file_clock(work / "clock"))
        bundle_dir = work / "bundle"
        _, names = write_bundle(bundle_dir, letters=LETTERS)
        threads = int(effective_settings(child_env(settings_env),
                                         "scheduler.publish_workers")
                      ["scheduler.publish_workers"] or 4)
        raw = RawWork(bundle_dir, names, work / "raw", threads)
        aps = aps_lag(max(trials, 5))
        sink = SmtpSink().start()
        cleanup.on_close(sink.stop)
        kinds = ["local", "s3"] if args.backend == "all" else [args.backend]
        backends: list[Backend] = []
        moto: MotoServer | None = None
        for kind in kinds:
            if kind == "s3":
                missing = s3_backend_missing()
                if missing:
                    backends.append(Backend(kind=kind, skipped=f"not run: {missing}"))
                    continue
                moto = MotoServer(cleanup)
                moto.client().create_bucket(Bucket=RAW_BUCKET)
            backends.append(run_backend(kind, trials, cleanup, sink, raw, moto, args.ahead,
                                        settings_env, args.log))
        _CLOCK.append(file_clock(work / "clock-after"))

        print()
        print(f"publish_latency — seed-shaped bundle (1 x 5 MiB report + {LETTERS} x 100 KiB "
              f"letters, {LETTERS} officers + owner), {trials} trials per backend")
        print(f"machine: {machine()}")
        for backend in backends:
            if backend.settings:
                print(f"{backend.kind}: settings " + ", ".join(
                    f"{k}={v}" for k, v in backend.settings.items()))
        lag = raw_clock_lag()
        for clock in _CLOCK:
            print(clock.describe())
        print(f"early by file ctime means more than {lag:.2f} ms (the largest lag above) "
              "before the instant")
        print()
        print(table(limit_rows(backends, aps), ["limit (same run, ms)", "n", "p50", "max"],
                    title="limits, measured after every trial"))
        print()
        rows: list[list[str]] = []
        summary: list[dict[str, str]] = []
        for backend in backends:
            if backend.skipped:
                rows.append([backend.kind, backend.skipped, "", "", "", "", "", "", ""])
                summary.append({"figure": f"{backend.kind}: last document public",
                                "target": "", "limit": "", "measured": backend.skipped,
                                "verdict": "not run"})
                continue
            r, s = report(backend, trials)
            rows += r
            summary += s
        print(table(rows, HEADERS, title="results"))
        for backend in backends:
            ts = backend.trials
            if not ts:
                continue
            lead = Summary.of([t.lead_s for t in ts])
            poll = Summary.of([t.poll_ms for t in ts])
            written = Summary.of([float(t.written_before) for t in ts])
            problems = [t.problem.strip() for t in ts if t.problem]
            line = (f"{backend.kind}: queue returned {fmt(lead.min, 2)}-{fmt(lead.max, 2)} s "
                    f"before the instant; poll period median {fmt(poll.p50, 2)} ms")
            if backend.kind == "local":
                line += (f"; documents whose bytes were written (mtime) before the instant: "
                         f"median {fmt(written.p50, 0)}/{DOCS} (staged in the lead window)")
            print(line)
            for note in backend.notes + problems[:5]:
                print(f"  {note}")
        print("ratio: per trial, figure / that trial's limit; verdicts on the median ratio. "
              "Folder: limit = the rename floor (shown, not judged: its target is absolute). "
              "Notices: limit = that trial's last document public + smtplib alone.")
        emit_summary("publish_latency", summary)
    return 0


if __name__ == "__main__":
    run_main(main)
