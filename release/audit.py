"""The audit chain: every action is an event whose hash covers the previous
event's hash, so an edit, a deletion or a reordering breaks the chain at the
first event it touches."""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from release.records import AuditEvent, AuditHead, table_of

GENESIS = "0" * 64
_HEAD = table_of(AuditHead)
_EVENTS = table_of(AuditEvent)


def default_actor() -> str:
    """Who is acting: the operating-system user and host, unless
    ``EMBARGO_ACTOR``-style identity is passed in explicitly by the caller."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def _digest(seq: int, at: datetime, actor: str, action: str, release_id: str | None,
            details: str, prev_hash: str) -> str:
    body = json.dumps(
        [seq, at.isoformat(), actor, action, release_id, details, prev_hash],
        separators=(",", ":"), ensure_ascii=False,
    )
    return hashlib.sha256(body.encode()).hexdigest()


# Built once: an append runs on the path of every notice after the instant.
_BUMP = (update(_HEAD).where(_HEAD.c.id == 1).values(seq=_HEAD.c.seq + bindparam("n"))
         .returning(_HEAD.c.seq, _HEAD.c.hash))
_APPEND = _EVENTS.insert()
_MOVE_HEAD = update(_HEAD).where(_HEAD.c.id == 1).values(hash=bindparam("new_hash"))


def record(session: Session, *, action: str, actor: str, at: datetime,
           release_id: str | None = None, details: Mapping[str, Any] | None = None) -> int:
    """Append one event in the caller's transaction (so the event and the
    change it describes commit together, or neither does); return its seq.

    Plain SQL statements on the session's connection, not the ORM's unit of
    work: the ORM's bookkeeping cost more than the statements themselves."""
    return record_many(session, [Entry(action=action, actor=actor, at=at,
                                       release_id=release_id, details=details)])[0]


@dataclass(frozen=True, kw_only=True)
class Entry:
    """One event for :func:`record_many`."""

    action: str
    actor: str
    at: datetime
    release_id: str | None = None
    details: Mapping[str, Any] | None = None


def record_many(session: Session, entries: Sequence[Entry]) -> list[int]:
    """Append ``entries`` in order, in the caller's transaction, as
    :func:`record` would one by one (the same chain), in three statements
    whatever their number: the relay records a batch of deliveries at once."""
    if not entries:
        return []
    connection = session.connection()
    step = {"n": len(entries)}
    head = connection.execute(_BUMP, step).first()
    if head is None:  # the very first event: create the head, race-free
        insert = pg_insert if connection.dialect.name == "postgresql" else sqlite_insert
        connection.execute(insert(_HEAD).values(id=1, seq=0, hash=GENESIS)
                           .on_conflict_do_nothing(index_elements=["id"]))
        head = connection.execute(_BUMP, step).one()
    last, prev = head
    rows = []
    for seq, entry in enumerate(entries, start=int(last) - len(entries) + 1):
        text = json.dumps(dict(entry.details or {}), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False, default=str)
        digest = _digest(seq, entry.at, entry.actor, entry.action, entry.release_id, text, prev)
        rows.append({"seq": seq, "at": entry.at, "actor": entry.actor, "action": entry.action,
                     "release_id": entry.release_id, "details": text, "prev_hash": prev,
                     "hash": digest})
        prev = digest
    connection.execute(_APPEND, rows[0] if len(rows) == 1 else rows)
    connection.execute(_MOVE_HEAD, {"new_hash": prev})
    return [int(row["seq"]) for row in rows]


@dataclass(frozen=True, kw_only=True)
class ChainReport:
    events: int
    first_bad: int | None  # seq of the first event that does not check out
    problem: str | None

    @property
    def ok(self) -> bool:
        return self.first_bad is None


def verify(session: Session) -> ChainReport:
    """Walk the chain in order. Reports the first event whose hash, link or
    sequence number does not check out, and what is wrong with it."""
    prev = GENESIS
    expected_seq = 1
    count = 0
    for event in session.scalars(select(AuditEvent).order_by(AuditEvent.seq)):
        count += 1
        if event.seq != expected_seq:
            return ChainReport(events=count, first_bad=event.seq,
                               problem=f"event {expected_seq} is missing (deleted?)")
        if event.prev_hash != prev:
            return ChainReport(events=count, first_bad=event.seq,
                               problem="it does not follow the event before it "
                                       "(deleted or reordered)")
        digest = _digest(event.seq, event.at, event.actor, event.action, event.release_id,
                         event.details, event.prev_hash)
        if digest != event.hash:
            return ChainReport(events=count, first_bad=event.seq,
                               problem="its contents were changed after it was written")
        prev = event.hash
        expected_seq += 1
    head = session.get(AuditHead, 1)
    if head is not None and (head.seq != expected_seq - 1 or head.hash != prev):
        return ChainReport(events=count, first_bad=expected_seq,
                           problem=f"the chain ends at event {expected_seq - 1} but the head "
                                   f"records event {head.seq} (events removed from the end?)")
    return ChainReport(events=count, first_bad=None, problem=None)
