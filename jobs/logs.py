"""Logs for machines: with ``log.format = "json"`` each record is one JSON
object a line, for the usual collectors (journald, Vector, Fluent Bit...):
when (UTC), level, logger, this node, the event (the message's template, the
same for every occurrence) and the message, and the release it is about."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from datetime import UTC, datetime
from typing import Any

_RELEASE_ID = re.compile(r"\brel_[0-9a-f]{16}\b")


def release_of(record: logging.LogRecord) -> str | None:
    """The release a record is about: ``extra={"release_id": ...}``, or the
    first release id among its arguments or in its message."""
    given = getattr(record, "release_id", None)
    if given:
        return str(given)
    args: Any = record.args
    values = args.values() if isinstance(args, dict) else (args or ())
    for value in values:
        if isinstance(value, str) and _RELEASE_ID.fullmatch(value):
            return value
    found = _RELEASE_ID.search(record.getMessage())
    return found.group(0) if found else None


class JsonFormatter(logging.Formatter):
    def __init__(self, node: str | None = None) -> None:
        super().__init__()
        self.node = node or f"{socket.gethostname()}:{os.getpid()}"

    def format(self, record: logging.LogRecord) -> str:
        at = datetime.fromtimestamp(record.created, UTC)
        line: dict[str, Any] = {
            "at": at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(), "logger": record.name, "node": self.node,
            "event": str(record.msg), "message": record.getMessage()}
        release = release_of(record)
        if release:
            line["release"] = release
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def use_format(form: str) -> None:
    """Switch the root logger's handlers to ``form`` ("text" leaves them)."""
    if form == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
