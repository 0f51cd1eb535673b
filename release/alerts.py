"""Alerts: a release at risk told to a person while there is still time to
act (DESIGN.md, invariant 7).

An alert goes to the release's owner and to every address in ``alerts.to``
through the outbox, like any notice: delivered with retries, recorded, and
audited. Each alert has a ``key`` that names one occurrence (a kind and,
for a fault that lasts, which repetition); raising the same alert again is a
no-op, so two nodes that notice the same fault send it once."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from release import audit
from release.records import OutboxMessage, Purpose, table_of

log = logging.getLogger(__name__)

ALERT = Purpose.ALERT
_OUTBOX = table_of(OutboxMessage)


@dataclass(frozen=True, kw_only=True)
class Alert:
    """What an alert says. ``kind`` is a short word in the past tense or a
    state (``publication_failed``, ``notice_failed``, ``overdue``...);
    ``key`` tells one occurrence from the next (empty: once per release and
    kind)."""

    kind: str
    subject: str
    lines: Sequence[str]
    key: str = ""
    urgent: bool = True  # False for good news (a rehearsal passed): logged at INFO, not WARNING

    def __post_init__(self) -> None:
        if not self.kind or not self.kind.replace("_", "").isalnum():
            raise ValueError(f"bad alert kind {self.kind!r}")
        if not self.subject or "\r" in self.subject or "\n" in self.subject:
            raise ValueError("an alert's subject is one line of text")


def alert_message_id(release_id: str, alert: Alert, address: str) -> str:
    """Stable per (release, kind, key, address), short enough never to fold."""
    scope = release_id.removeprefix("rel_")
    who = hashlib.sha256(address.lower().encode()).hexdigest()[:10]
    which = hashlib.sha256(f"{alert.kind}\0{alert.key}".encode()).hexdigest()[:10]
    return f"<{scope}.alert-{which}.{who}@embargo.invalid>"


def raise_alert(session: Session, alert: Alert, *, release_id: str,
                owner: str | None, alerts_to: Sequence[str], now: datetime,
                actor: str) -> int:
    """Put the alert in the outbox for the owner and ``alerts_to``, in the
    caller's transaction. Returns how many messages were added (0 when this
    alert was raised before, or when nobody is to be told: logged, since
    then only the logs and the metrics know)."""
    addresses: list[str] = []
    for address in ([owner] if owner else []) + list(alerts_to):
        if address.lower() not in (a.lower() for a in addresses):
            addresses.append(address)
    if not addresses:
        log.error("alert for %s with nobody to tell (set alerts.to): %s", release_id,
                  alert.subject)
        return 0
    details = json.dumps({"kind": alert.kind, "subject": alert.subject,
                          "lines": list(alert.lines)}, ensure_ascii=False)
    rows = [{"message_id": alert_message_id(release_id, alert, address),
             "release_id": release_id, "recipient_id": None, "purpose": ALERT,
             "to_addr": address, "created_at": now, "not_before": now, "attempts": 0,
             "next_attempt_at": now, "details": details} for address in addresses]
    connection = session.connection()
    existing = set(connection.execute(select(_OUTBOX.c.message_id).where(
        _OUTBOX.c.message_id.in_([r["message_id"] for r in rows]))).scalars())
    rows = [r for r in rows if r["message_id"] not in existing]
    if not rows:
        return 0
    # Two nodes noticing the same fault at once: the second insert is a no-op.
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    connection.execute(dialect.insert(_OUTBOX).on_conflict_do_nothing(
        index_elements=["message_id"]), rows)
    audit.record(session, action="alert_raised", actor=actor, at=now, release_id=release_id,
                 details={"kind": alert.kind, "subject": alert.subject,
                          "to": [r["to_addr"] for r in rows]})
    log.log(logging.WARNING if alert.urgent else logging.INFO, "alert for %s: %s", release_id,
            alert.subject)
    return len(rows)


def alert_text(row_details: str | None) -> tuple[str, list[str]]:
    """The subject and lines stored with an alert's outbox row. Raises
    ValueError when the row carries none (it is not an alert)."""
    if not row_details:
        raise ValueError("this outbox row carries no alert")
    facts = json.loads(row_details)
    return str(facts["subject"]), [str(line) for line in facts["lines"]]
