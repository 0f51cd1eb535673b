"""Terminal helpers shared by the commands: tables and Ctrl-C/SIGTERM."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


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
