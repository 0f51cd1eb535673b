"""Terminal helpers shared by the commands: tables, the sealing progress bar
and a countdown through ``rich`` on a terminal, plain text otherwise; and
Ctrl-C/SIGTERM."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType, TracebackType
from typing import Any, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table


def is_terminal(stream: TextIO) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """The plain table: columns padded, a rule under the headers."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], *,
                out: TextIO | None = None, title: str | None = None) -> None:
    """A table on ``out`` (standard output): drawn by rich on a terminal,
    the plain table when output goes to a file or a pipe."""
    stream = out or sys.stdout
    if not is_terminal(stream):
        if title:
            print(title, file=stream)
        print(table(rows, headers), file=stream)
        return
    drawn = Table(*headers, title=title, title_justify="left", header_style="bold")
    for row in rows:
        drawn.add_row(*("" if c is None else str(c) for c in row))
    Console(file=stream, highlight=False).print(drawn)


class SealingProgress:
    """The progress of sealing each document, on standard error, drawn by
    rich on a terminal and only for files big enough to take a moment;
    nothing otherwise. A context manager; call it as ``(name, done, total)``."""

    def __init__(self, stream: TextIO | None = None, min_size: int = 8 << 20) -> None:
        self.stream = stream or sys.stderr
        self.min_size = min_size
        self.enabled = is_terminal(self.stream)
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> SealingProgress:
        if self.enabled:
            self._progress = Progress(
                TextColumn("sealing {task.description}"), BarColumn(), DownloadColumn(),
                TimeRemainingColumn(), console=Console(file=self.stream), transient=False)
            self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, name: str, done: int, total: int) -> None:
        if self._progress is None or total < self.min_size:
            return
        task = self._tasks.get(name)
        if task is None:
            task = self._tasks[name] = self._progress.add_task(name[:30], total=total)
        self._progress.update(task, completed=done)


class Countdown:
    """"publishing in 4.2 s", redrawn in place on a terminal; one line
    ("waiting for the instant…") when output is not a terminal."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.live = is_terminal(out)
        self._status: Any = None

    def __enter__(self) -> Countdown:
        if self.live:
            self._status = Console(file=self.out).status("publishing …")
            self._status.start()
        else:
            print("  waiting for the instant…", file=self.out, flush=True)
        return self

    def show(self, seconds_left: float) -> None:
        if self._status is not None:
            self._status.update(f"publishing in {max(seconds_left, 0):5.1f} s")

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._status is not None:
            self._status.stop()


class Stopper:
    """Turns SIGTERM and Ctrl-C into a stop request; a second Ctrl-C is
    not needed and not harmful."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def install(self) -> None:
        def handler(signum: int, _frame: FrameType | None) -> None:
            if not self.event.is_set():
                print(f"\nstopping ({signal.Signals(signum).name}): finishing work in progress…",
                      file=sys.stderr)
            self.event.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
