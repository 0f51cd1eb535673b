"""Shared helpers for the bench scripts: statistics, tables, child processes,
temporary folders, a seed-shaped bundle, an SMTP sink and a moto S3 server.

Everything listens on and talks to 127.0.0.1 only. Every temporary folder and
child process is registered with :class:`Cleanup` and removed or stopped on
exit, also on Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MiB = 1 << 20
KiB = 1 << 10


# -- statistics and tables ---------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): with fewer than 100 values, p99
    is the maximum."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


@dataclass(frozen=True)
class Summary:
    n: int
    p50: float
    p99: float
    max: float
    min: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        vals = [v for v in values if not math.isnan(v)]
        if not vals:
            return cls(0, math.nan, math.nan, math.nan, math.nan)
        return cls(len(vals), median(vals), percentile(vals, 99), max(vals), min(vals))


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str], title: str = "") -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if title:
        lines.insert(0, title)
    return "\n".join(lines)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("MET" if ok else "NOT MET")


# -- the machine ----------------------------------------------------------------
def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = f", {int(line.split()[1]) / 1024 / 1024:.1f} GiB RAM"
                break
    commit = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True, timeout=10).stdout
        if dirty.strip():
            commit += f" + uncommitted changes to {len(dirty.splitlines())} files"
    load = ""
    with contextlib.suppress(OSError):
        load = f", load {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    return (f"{os.cpu_count()} CPUs ({cpu}){ram}{load}; Python {platform.python_version()}; "
            f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}; commit {commit}")


# -- clean-up ---------------------------------------------------------------------
class Cleanup:
    """Collects temporary folders and child processes and removes/stops them
    on exit. Use as a context manager around the whole script; SIGTERM is
    turned into KeyboardInterrupt so the ``finally`` runs."""

    def __init__(self) -> None:
        self.folders: list[Path] = []
        self.procs: list[subprocess.Popen[Any]] = []
        self.callbacks: list[Callable[[], None]] = []

    def __enter__(self) -> Cleanup:
        def on_term(signum: int, _frame: Any) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        signal.signal(signal.SIGTERM, on_term)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tempdir(self, prefix: str, base: str | None = None) -> Path:
        path = Path(tempfile.mkdtemp(prefix=f"embargo-bench-{prefix}-", dir=base))
        self.folders.append(path)
        return path

    def spawn(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a child in its own process group (so Ctrl-C in the terminal
        reaches only us, and we stop it in order)."""
        proc = subprocess.Popen(list(argv), start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any], timeout: float = 15.0) -> int | None:
        """SIGTERM the child's group, wait, then SIGKILL if it will not stop."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if proc in self.procs:
            self.procs.remove(proc)
        return proc.returncode

    def on_close(self, callback: Callable[[], None]) -> None:
        self.callbacks.append(callback)

    def close(self) -> None:
        for proc in list(reversed(self.procs)):
            with contextlib.suppress(Exception):
                self.stop(proc, timeout=10)
        for callback in reversed(self.callbacks):
            with contextlib.suppress(Exception):
                callback()
        self.callbacks.clear()
        for folder in self.folders:
            shutil.rmtree(folder, ignore_errors=True)
        self.folders.clear()


# -- the embargo command ------------------------------------------------------------
def embargo_argv(data_dir: Path, *args: str, verbose: bool = False) -> list[str]:
    """``embargo`` run as ``python -m jobs.cli`` from this checkout, so a fresh
    clone works whether or not the console script is on PATH."""
    argv = [sys.executable, "-m", "jobs.cli", "--data-dir", str(data_dir)]
    if verbose:
        argv.append("-v")
    return argv + list(args)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for ``embargo`` children: ours without any EMBARGO_*
    settings, plus ``extra``; the checkout first on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBARGO_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_embargo(data_dir: Path, *args: str, env: dict[str, str] | None = None,
                timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(embargo_argv(data_dir, *args), cwd=REPO, env=env or child_env(),
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"embargo {' '.join(args)} failed ({done.returncode}): "
                           f"{done.stderr.strip()[-2000:]}")
    return done


class EmbargoRun:
    """``embargo -v run`` in a child process; its log lines are collected by
    a reader thread with the (wall-clock) time each arrived."""

    def __init__(self, cleanup: Cleanup, data_dir: Path, env: dict[str, str]) -> None:
        self.cleanup = cleanup
        if "EMBARGO_METRICS_BIND" not in env:  # not the default port: others may hold it
            env = {**env, "EMBARGO_METRICS_BIND": f"127.0.0.1:{free_port()}"}
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self.started_at = time.time()
        self.proc = cleanup.spawn(embargo_argv(data_dir, "run", verbose=True), cwd=REPO,
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, bufsize=1)
        self._reader = threading.Thread(target=self._read, name="embargo-run-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append((time.time(), line.rstrip("\n")))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 60.0, since: int = 0) -> tuple[float,
                                                                                      str]:
        """Wait for a log line matching ``pattern``; return (arrival time, line)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for at, line in self.lines[since:]:
                    if regex.search(line):
                        return at, line
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise RuntimeError("embargo run exited early:\n" + self.tail())
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {pattern!r} from embargo run:\n" + self.tail())
                self._cond.wait(min(left, 0.2))

    def tail(self, n: int = 30) -> str:
        with self._cond:
            return "\n".join(line for _, line in self.lines[-n:])

    def errors(self) -> list[str]:
        with self._cond:
            return [line for _, line in self.lines
                    if " ERROR " in line or "Traceback" in line or " WARNING " in line]

    def error_kinds(self, top: int = 3) -> list[str]:
        """The most frequent kinds of warning or error, with their counts
        (times, ids and numbers taken out)."""
        from collections import Counter

        kinds: Counter[str] = Counter()
        for line in self.errors():
            text = re.sub(r"^\S+\s+", "", line)  # the timestamp
            text = re.sub(r"rel_[0-9A-Za-z]+|\d[\d:.\-]*", "#", text)
            kinds[text[:160]] += 1
        return [f"{count} x {text}" for text, count in kinds.most_common(top)]

    def stop(self) -> int | None:
        code = self.cleanup.stop(self.proc)
        self._reader.join(5)
        return code


# -- loopback services -----------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0, proc: subprocess.Popen[Any] | None = None
              ) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server on port {port} exited ({proc.returncode})")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


REPLAY_FROM = "replay@bench.invalid"  # MAIL FROM of the bench's own smtplib replays


@dataclass
class SmtpSink:
    """An aiosmtpd server on a free loopback port that records, for each
    message, the wall-clock time its DATA handler ran (the time the server
    accepted it: the bench's witness, not the project's records) and its
    X-Embargo-Release. The envelopes of "published" notices and owner
    summaries are kept (small; copies, with their attachments, are not), so
    the same messages can be sent again by smtplib alone (:meth:`replay`);
    replayed messages (MAIL FROM ``REPLAY_FROM``) are recorded apart."""

    port: int = 0
    # (time accepted, X-Embargo-Release, Message-ID, recipient)
    accepted: list[tuple[float, str, str, str]] = field(default_factory=list)
    # Message-ID -> (MAIL FROM, RCPT TOs, content) of notices
    envelopes: dict[str, tuple[str, list[str], bytes]] = field(default_factory=dict)
    replayed: list[float] = field(default_factory=list)  # DATA times of replayed messages
    _controller: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> SmtpSink:
        from aiosmtpd.controller import Controller

        sink = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                at = time.time()
                if envelope.mail_from == REPLAY_FROM:
                    with sink._lock:
                        sink.replayed.append(at)
                    return "250 Message accepted for delivery"
                content = bytes(envelope.content)
                head = content.split(b"\r\n\r\n", 1)[0]
                match = re.search(rb"^X-Embargo-Release:\s*(\S+)", head, re.M | re.I)
                release = match.group(1).decode() if match else ""
                match = re.search(rb"^Message-ID:\s*(\S+)", head, re.M | re.I)
                message_id = match.group(1).decode() if match else ""
                with sink._lock:
                    for rcpt in envelope.rcpt_tos:
                        sink.accepted.append((at, release, message_id, rcpt))
                    if ".published." in message_id or ".owner_summary." in message_id:
                        sink.envelopes[message_id] = (envelope.mail_from,
                                                      list(envelope.rcpt_tos), content)
                return "250 Message accepted for delivery"

        self.port = free_port()
        self._controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self._controller.start()
        return self

    def for_release(self, release_id: str) -> list[tuple[float, str]]:
        """(time accepted, Message-ID) of each message about ``release_id``."""
        with self._lock:
            return [(at, mid) for at, rel, mid, _ in self.accepted if rel == release_id]

    def envelopes_of(self, message_ids: Sequence[str]) -> list[tuple[str, list[str], bytes]]:
        with self._lock:
            return [self.envelopes[m] for m in message_ids if m in self.envelopes]

    def replay(self, messages: Sequence[tuple[str, list[str], bytes]], connections: int
               ) -> float:
        """ms for smtplib alone to hand ``messages`` to this server over
        ``connections`` connections at once (opened and greeted before the
        clock starts, as a relay that opens them before the instant): from
        the start until this server's DATA handler accepted the last one."""
        import smtplib

        connections = max(1, min(connections, len(messages)))
        clients = []
        try:
            for _ in range(connections):
                client = smtplib.SMTP("127.0.0.1", self.port, timeout=30)
                client.ehlo("bench.invalid")
                clients.append(client)
            shares = [list(messages[i::connections]) for i in range(connections)]
            with self._lock:
                self.replayed.clear()
            barrier = threading.Barrier(connections + 1)
            errors: list[BaseException] = []

            def send(client: Any, share: list[tuple[str, list[str], bytes]]) -> None:
                barrier.wait()
                try:
                    for _from, rcpts, content in share:
                        client.sendmail(REPLAY_FROM, rcpts, content)
                except BaseException as exc:  # reported below
                    errors.append(exc)

            threads = [threading.Thread(target=send, args=(c, share), daemon=True)
                       for c, share in zip(clients, shares, strict=True)]
            for thread in threads:
                thread.start()
            start = time.time()
            barrier.wait()
            for thread in threads:
                thread.join(60)
            if errors:
                raise errors[0]
            with self._lock:
                if len(self.replayed) < len(messages):
                    raise RuntimeError(f"replay: {len(self.replayed)} of {len(messages)} "
                                       "accepted")
                last = max(self.replayed)
            return (last - start) * 1000
        finally:
            for client in clients:
                with contextlib.suppress(Exception):
                    client.quit()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None


AWS_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def s3_backend_missing() -> str | None:
    """Why the S3 rows cannot run, or None if they can."""
    try:
        import storage.s3  # noqa: F401
    except Exception as exc:  # not written yet, or broken
        return f"storage.s3 does not import ({type(exc).__name__}: {exc})"
    try:
        import moto.server  # noqa: F401
    except Exception as exc:
        return f"moto[server] is not installed ({type(exc).__name__}: {exc})"
    return None


class MotoServer:
    """moto's S3 server in its own process on a free loopback port."""

    def __init__(self, cleanup: Cleanup) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env.update(AWS_ENV)
        self.proc = cleanup.spawn(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id="test", aws_secret_access_key="test",
                            config=Config(s3={"addressing_style": "path"},
                                          retries={"max_attempts": 2}))

    def env(self) -> dict[str, str]:
        return {**AWS_ENV, "EMBARGO_S3_ENDPOINT_URL": self.url, "EMBARGO_S3_REGION": "us-east-1",
                "EMBARGO_S3_ADDRESSING_STYLE": "path"}


# -- the project's effective settings -------------------------------------------------
def effective_settings(env: dict[str, str], *keys: str) -> dict[str, Any]:
    """The values ``embargo`` children started with ``env`` will use for
    ``keys`` (None for a key this checkout does not know)."""
    from config.settings import load_settings

    project_env = {k: v for k, v in env.items() if k.startswith("EMBARGO_")}
    values = load_settings(environ=project_env, cwd=REPO).values
    return {key: values.get(key) for key in keys}


# -- the filesystem's clock ---------------------------------------------------------
@dataclass(frozen=True)
class FileClock:
    """How far behind the true time Linux stamps a file. The kernel takes
    file times from its coarse clock, updated once per scheduler tick, so a
    change made at true time t can carry a stamp up to one tick before t."""

    samples: int
    max_lag_ms: float  # largest (time.time() read just before a rename) - (its ctime)
    p50_lag_ms: float
    step_ms: float  # median step between distinct stamps: the tick, when they are coarse

    def describe(self) -> str:
        return (f"file clock: a rename right after reading time.time() is stamped up to "
                f"{self.max_lag_ms:.2f} ms earlier than that time (median "
                f"{self.p50_lag_ms:.2f} ms, {self.samples} samples; median step between "
                f"distinct stamps {self.step_ms:.2f} ms)")


def file_clock(folder: Path, samples: int = 300) -> FileClock:
    """Measure the file clock's lag in ``folder`` the way a publication meets
    it: each sample writes and fsyncs a fresh file (a staged document, that
    nobody has looked at since), waits 0-5 ms, reads time.time(), then
    renames it (or, every other sample, links it) into a second folder, and
    reads the ctime that change got."""
    import random

    staged, public = folder / "staged", folder / "public"
    staged.mkdir(parents=True, exist_ok=True)
    public.mkdir(exist_ok=True)
    lags: list[float] = []
    stamps: list[int] = []
    rng = random.Random(16)
    for i in range(samples):
        src, dst = staged / f"s{i}", public / f"p{i}"
        fd = os.open(src, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"x" * 1024)
            os.fsync(fd)
        finally:
            os.close(fd)
        time.sleep(rng.uniform(0, 0.005))
        before = time.time_ns()
        if i % 2:
            os.link(src, dst)
            os.unlink(src)
        else:
            os.rename(src, dst)
        stamp = os.stat(dst).st_ctime_ns
        dst.unlink()
        lags.append((before - stamp) / 1e6)
        stamps.append(stamp)
    distinct = sorted(set(stamps))
    steps = [(b - a) / 1e6 for a, b in itertools.pairwise(distinct)]
    return FileClock(samples=samples, max_lag_ms=max(0.0, max(lags)), p50_lag_ms=median(lags),
                     step_ms=median(steps) if steps else math.nan)


# -- the summary rows that bench/run_all.py collects ----------------------------------
SUMMARY_ENV = "BENCH_SUMMARY"  # a file: each bench appends its target rows, one JSON a line


def commit_id() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True, timeout=10).stdout
        return commit + ("+dirty" if dirty.strip() else "")
    return "unknown"


def emit_summary(bench: str, rows: Sequence[dict[str, str]]) -> None:
    """Append ``rows`` (keys: figure, target, limit, measured, verdict) to the
    file named by $BENCH_SUMMARY, if set, each with the bench and commit."""
    path = os.environ.get(SUMMARY_ENV)
    if not path:
        return
    import json

    commit = commit_id()
    with open(path, "a", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps({"bench": bench, "commit": commit, **row}) + "\n")


# -- a seed-shaped bundle ---------------------------------------------------------
def write_bundle(folder: Path, *, letters: int = 43, report_bytes: int = 5 * MiB,
                 letter_bytes: int = 100 * KiB, title: str = "Bench: a thematic inspection",
                 publish_on: str = "2030-01-01") -> tuple[Path, list[str]]:
    """A report, ``letters`` letters (one per organisation) and one liaison
    officer per organisation, with invented content. Returns the manifest and
    the documents' file names."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "letters").mkdir(exist_ok=True)
    report = folder / "national-report.txt"
    if not report.exists() or report.stat().st_size != report_bytes:
        line = b"Bench national report: findings, recommendations and annexes.\n"
        report.write_bytes((line * (report_bytes // len(line) + 1))[:report_bytes])
    names = [report.name]
    docs = ['[[documents]]\npath = "national-report.txt"\nkind = "report"\n']
    people = []
    for i in range(1, letters + 1):
        path = folder / "letters" / f"area-{i:02d}.txt"
        if not path.exists() or path.stat().st_size != letter_bytes:
            line = f"Letter to Area Service {i}: what we found and what comes next.\n".encode()
            path.write_bytes((line * (letter_bytes // len(line) + 1))[:letter_bytes])
        names.append(path.name)
        docs.append(f'[[documents]]\npath = "letters/{path.name}"\nkind = "letter"\n'
                    f'organisation = "Area Service {i}"\n')
        people.append(f'[[recipients]]\nname = "Liaison Officer {i}"\n'
                      f'email = "liaison{i}@area{i}.example"\n'
                      f'organisation = "Area Service {i}"\n')
    manifest = folder / "manifest.toml"
    manifest.write_text(f'title = "{title}"\npublish_on = "{publish_on}"\n'
                        'owner = "press@inspectorate.example"\n\n' + "\n".join(docs + people))
    return manifest, names


def iso_z(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def base_parser(description: str, trials: int, quick: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--trials", type=int, default=None,
                        help=f"runs per measurement (default {trials}; --quick {quick})")
    parser.add_argument("--quick", action="store_true", help=f"{quick} trials, for a smoke run")
    parser.set_defaults(default_trials=trials, quick_trials=quick)
    return parser


def trials_of(args: argparse.Namespace) -> int:
    if args.trials is not None:
        return max(1, int(args.trials))
    return int(args.quick_trials if args.quick else args.default_trials)


@contextlib.contextmanager
def stopwatch() -> Iterator[list[float]]:
    box: list[float] = []
    start = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - start)


def run_main(main: Callable[[], int], *, cleaned: str = "temporary folders and child processes"
             ) -> None:
    """A bench script's entry point: its exit status, or 130 with one line on Ctrl-C
    (its Cleanup has removed what it made by then)."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print(f"interrupted; {cleaned} removed", file=sys.stderr)
        sys.exit(130)


def one_document_manifest(folder: Path, title: str, text: bytes) -> Path:
    """A manifest of one short report, for benches that queue many releases."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notice.txt").write_bytes(text)
    manifest = folder / "manifest.toml"
    manifest.write_text(f'title = "{title}"\npublish_on = "2030-01-01"\n\n'
                        '[[documents]]\npath = "notice.txt"\nkind = "report"\n')
    return manifest


class Queuer:
    """ReleaseService in this process, over the data dir of a bench's `embargo run`
    child (``env``: the child's EMBARGO_* settings, so both see the same ones)."""

    def __init__(self, data: Path, manifest: Path, *, actor: str,
                 env: dict[str, str] | None = None) -> None:
        from config.settings import load_settings
        from jobs.app import build_services
        from release.manifest import load_manifest
        from release.service import ReleaseService

        project_env = {k: v for k, v in (env or {}).items() if k.startswith("EMBARGO_")}
        self.settings = load_settings(environ=project_env, overrides={"data_dir": str(data)})
        self.services = build_services(self.settings)
        self.service = ReleaseService(self.services, actor=actor)
        self.spec = load_manifest(manifest, publish_on="2030-01-01T00:00:00Z")

    def queue(self, title: str, instant: datetime) -> tuple[str, str, str]:
        """Queue one release; returns (id, slug, document file name)."""
        spec = dataclasses.replace(self.spec, title=title,
                                   publish_on=instant.strftime("%Y-%m-%dT%H:%M:%SZ"))
        release = self.service.queue(spec)
        return release.id, release.slug, release.documents[0].filename

    def queue_many(self, title: str, count: int, instant: datetime,
                   public: Path) -> dict[Path, str]:
        """Queue ``count`` releases due at ``instant``; returns each one's public
        file (under the folder ``public``) and release id."""
        targets: dict[Path, str] = {}
        for i in range(count):
            release_id, slug, name = self.queue(f"{title} release {i:03d}", instant)
            targets[public / slug / name] = release_id
        return targets

    def close(self) -> None:
        self.services.engine.dispose()


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class Peak:
    """Peak RSS growth from now on: VmHWM after a reset on Linux, else ru_maxrss."""

    def __init__(self) -> None:
        self.method = "ru_maxrss"
        before: int | None = None
        try:
            Path("/proc/self/clear_refs").write_text("5")
            before = _status_kib("VmRSS")
            self.method = "VmHWM reset"
        except OSError:
            pass
        self.before = before if before is not None else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def after_kib(self) -> int:
        after = _status_kib("VmHWM") if self.method == "VmHWM reset" else None
        return after if after is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def growth_mib(self) -> float:
        return (self.after_kib() - self.before) / 1024
