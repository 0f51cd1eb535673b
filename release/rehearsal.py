"""Pre-flight rehearsal: prove, some time before the instant, that a release
would publish, without publishing anything (DESIGN.md, invariant 7).

Each check is one function returning a :class:`Check` (ok, or the problem in
one line). The result is recorded (``rehearsals``), audited
(``rehearsal_passed`` / ``rehearsal_failed``) and mailed through the alerts
outbox to the owner and ``alerts.to``. A failed rehearsal never blocks the
publication: at the instant the publisher tries anyway."""

from __future__ import annotations

import io
import json
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from config.errors import EmbargoError
from release import audit, sealing, timerules
from release.alerts import Alert, raise_alert
from release.context import Services
from release.instants import embargo_of
from release.records import (
    QUEUED,
    Document,
    Node,
    Rehearsal,
    Release,
    ReleaseState,
    table_of,
)
from release.vault_keys import dek_key, document_key
from storage.db import transaction

log = logging.getLogger(__name__)

_REHEARSALS = table_of(Rehearsal)
# An automatic rehearsal is not started this close to the instant: the
# publication then has the node to itself.
QUIET = timedelta(seconds=5)
LIVE = timedelta(seconds=10)  # a node silent for longer is not counted (as jobs/nodes.py)


class MailProbe(Protocol):
    """The mail server's side of a rehearsal (``jobs/mail.py`` implements it):
    connect, STARTTLS or TLS as configured, authenticate, ``NOOP``, quit.
    Raises DeliveryError saying what failed; returns where it went."""

    def probe(self) -> str: ...


@dataclass(frozen=True, kw_only=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True, kw_only=True)
class RehearsalReport:
    """One rehearsal's result. ``lead`` is how long before the instant it was
    due (None: asked for by hand)."""

    id: str
    release_id: str
    title: str
    embargo: str
    at: datetime
    lead: timedelta | None
    checks: tuple[Check, ...]

    @property
    def ready(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [check for check in self.checks if not check.ok]

    def lines(self) -> list[str]:
        """The report as printed and mailed: a verdict, then one line a check."""
        verdict = (f"READY: {self.title} will publish {self.embargo}" if self.ready else
                   f"NOT READY: {self.title} ({self.embargo}): "
                   f"{len(self.failed)} of {len(self.checks)} checks failed")
        return [verdict, *(f"  {'ok  ' if c.ok else 'FAIL'} {c.name:16} {c.detail}"
                           for c in self.checks)]


def lead_text(lead: timedelta | None) -> str:
    return "by hand" if lead is None else f"{timerules.format_delta(lead)} before"


# -- the checks ---------------------------------------------------------------------------
def check_data_key(services: Services, private_key: X25519PrivateKey,
                   release_id: str) -> tuple[Check, bytes | None]:
    try:
        dek = sealing.open_dek(services.vault.get_bytes(dek_key(release_id)), private_key,
                               release_id)
    except EmbargoError as exc:
        return Check(name="data key", ok=False,
                     detail=f"the private key does not open the sealed data key: {exc}"), None
    return Check(name="data key", ok=True, detail="the private key opens it"), dek


class _NullSink(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return len(memoryview(data))


def check_documents(services: Services, dek: bytes | None, release_id: str,
                    documents: Sequence[Document]) -> Check:
    if dek is None:
        return Check(name="documents", ok=False, detail="not tried: no data key")
    problems: list[str] = []
    total = 0
    for document in documents:
        try:
            with services.vault.reader(document_key(release_id, document.id)) as sealed:
                opened = sealing.open_stream(dek, document.id, sealed, _NullSink())  # type: ignore[arg-type]
        except EmbargoError as exc:
            problems.append(f"{document.filename} does not decrypt: {exc}")
            continue
        if opened.sha256 != document.sha256 or opened.size != document.size:
            problems.append(f"{document.filename} decrypts to other content than was queued "
                            f"({opened.size} bytes, expected {document.size})")
        total += opened.size
    if problems:
        return Check(name="documents", ok=False, detail="; ".join(problems))
    return Check(name="documents", ok=True,
                 detail=f"all {len(documents)} decrypt and match ({total} bytes)")


def check_public(services: Services) -> Check:
    try:
        services.public.probe()
    except EmbargoError as exc:
        return Check(name="public location", ok=False, detail=str(exc))
    return Check(name="public location", ok=True,
                 detail="a probe object was created, read back and deleted")


def check_mail(mail: MailProbe | None) -> Check:
    if mail is None:
        return Check(name="mail server", ok=True, detail="file transport: nothing to reach")
    try:
        where = mail.probe()
    except EmbargoError as exc:
        return Check(name="mail server", ok=False, detail=str(exc))
    return Check(name="mail server", ok=True, detail=f"{where} answers")


def check_nodes(session: Session, *, now: datetime, min_nodes: int) -> Check:
    live = list(session.scalars(select(Node).where(Node.stopped_at.is_(None),
                                                   Node.heartbeat_at >= now - LIVE)))
    good = [node for node in live if node.clock_ok]
    detail = (f"{len(good)} live node{'s' if len(good) != 1 else ''} with a good clock "
              f"(at least {min_nodes} wanted)")
    if len(live) > len(good):
        detail += f"; {len(live) - len(good)} refusing for clock skew"
    return Check(name="nodes", ok=len(good) >= min_nodes, detail=detail)


def check_zone(release: Release) -> Check:
    """This node's time-zone database gives the stored instant for the
    release's wall time (a tzdata update can move it)."""
    try:
        naive = datetime.fromisoformat(release.wall)
        tz = ZoneInfo(release.zone)
    except (ValueError, KeyError) as exc:
        return Check(name="time zone", ok=False, detail=f"cannot read {release.wall} "
                     f"{release.zone}: {exc}")
    candidates = {naive.replace(tzinfo=tz, fold=fold).astimezone(UTC) for fold in (0, 1)}
    if candidates != {release.instant}:
        found = " or ".join(sorted(c.isoformat() for c in candidates))
        return Check(name="time zone", ok=False,
                     detail=f"{release.wall} in {release.zone} is now {found} here, not the "
                            f"stored {release.instant.isoformat()}")
    return Check(name="time zone", ok=True,
                 detail=f"{release.wall} {release.zone} is still "
                        f"{release.instant.isoformat().replace('+00:00', 'Z')}")


def check_approval(release: Release, *, required: bool) -> Check:
    """The release will be published: approved where ``approval.required``
    is set (a release still awaiting approval, or a draft, never is)."""
    state = release.state
    if state == ReleaseState.AWAITING_APPROVAL:
        who = f" (submitted by {release.submitted_by})" if release.submitted_by else ""
        return Check(name="approval", ok=False,
                     detail=f"awaiting approval{who}: it will not publish unless an approver "
                            "approves it before the instant")
    if state == ReleaseState.DRAFT:
        return Check(name="approval", ok=False,
                     detail="still a draft: it will not publish unless it is submitted and "
                            "approved")
    if release.approved_by:
        detail = f"approved by {release.approved_by}"
        if release.forced_reason:
            detail += f" (force-approved by the submitter: {release.forced_reason})"
        return Check(name="approval", ok=True, detail=detail)
    return Check(name="approval", ok=True,
                 detail="approval is not required" if not required
                 else "queued before approval was required")


def _describe(release: Release) -> str:
    try:
        return str(embargo_of(release).describe())
    except EmbargoError:  # the zone check says why
        return f"{release.wall} {release.zone}"


# -- running one ----------------------------------------------------------------------------
class Rehearser:
    """Runs rehearsals and records them. ``mail`` is None with the file
    transport."""

    def __init__(self, services: Services, private_key: X25519PrivateKey, *,
                 mail: MailProbe | None = None, min_nodes: int = 1,
                 mail_passed: bool = True, actor: str = "rehearsal") -> None:
        self.s = services
        self.key = private_key
        self.mail = mail
        self.min_nodes = min_nodes
        self.mail_passed = mail_passed
        self.actor = actor

    def rehearse(self, release_id: str, *, now: datetime,
                 lead: timedelta | None = None) -> RehearsalReport | None:
        """Rehearse the release now and record the result. With a ``lead``
        (an automatic rehearsal), returns None without recording anything
        when that lead's rehearsal of this instant is already recorded (by
        this node before a restart, or by another node)."""
        with transaction(self.s.sessions) as session:
            release = session.get(Release, release_id)
            if release is None:
                raise LookupError(release_id)
            documents = list(session.scalars(select(Document).where(
                Document.release_id == release_id).order_by(Document.position)))
            nodes = check_nodes(session, now=now, min_nodes=self.min_nodes)
            instant, title, owner = release.instant, release.title, release.owner
            embargo = _describe(release)
            zone = check_zone(release)
            approval = check_approval(release, required=self.s.approval_required)
        key_check, dek = check_data_key(self.s, self.key, release_id)
        checks = (key_check, check_documents(self.s, dek, release_id, documents),
                  check_public(self.s), check_mail(self.mail), nodes, zone, approval)
        del dek
        report = RehearsalReport(id=f"reh_{secrets.token_hex(8)}", release_id=release_id,
                                 title=title, embargo=embargo, at=now, lead=lead,
                                 checks=checks)
        if not self._record(report, instant, owner):
            return None
        log.log(logging.INFO if report.ready else logging.ERROR, "rehearsal of %s (%s): %s",
                release_id, lead_text(lead), "; ".join(line.strip() for line in report.lines()))
        return report

    def _record(self, report: RehearsalReport, instant: datetime, owner: str | None) -> bool:
        lead_seconds = None if report.lead is None else int(report.lead.total_seconds())
        checks = [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in report.checks]
        with transaction(self.s.sessions) as session:
            connection = session.connection()
            dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
            added = connection.execute(dialect.insert(_REHEARSALS).values(
                id=report.id, release_id=report.release_id, instant=instant,
                lead_seconds=lead_seconds, at=report.at, actor=self.actor, ready=report.ready,
                checks=json.dumps(checks, ensure_ascii=False)).on_conflict_do_nothing()
                .returning(_REHEARSALS.c.id))
            if added.first() is None:  # recorded already (rowcount is -1 on psycopg)
                return False
            action = "rehearsal_passed" if report.ready else "rehearsal_failed"
            audit.record(session, action=action, actor=self.actor, at=report.at,
                         release_id=report.release_id,
                         details={"rehearsal": report.id, "lead": lead_text(report.lead),
                                  "failed": [f"{c.name}: {c.detail}" for c in report.failed]})
            if report.ready and not self.mail_passed:
                return True
            subject = (f"Ready: {report.title} publishes {report.embargo}" if report.ready
                       else f"REHEARSAL FAILED: {report.title} ({report.embargo})")
            raise_alert(session, Alert(kind=action, subject=subject[:300],
                                       lines=[*report.lines(), "",
                                              f"Rehearsal {report.id}, " + (
                                                  "run by hand." if report.lead is None else
                                                  f"{lead_text(report.lead)} the instant."),
                                              "A failed rehearsal does not stop the "
                                              "publication: at the instant it is tried anyway."],
                                       key=report.id if lead_seconds is None
                                       else f"{lead_seconds}@{instant.isoformat()}",
                                       urgent=not report.ready),
                        release_id=report.release_id, owner=owner,
                        alerts_to=self.s.alerts_to, now=report.at, actor=self.actor)
        return True

    # -- automatic --------------------------------------------------------------------
    def due(self, *, now: datetime, leads: Sequence[timedelta]) -> list[tuple[str, timedelta]]:
        """(release, lead) pairs whose rehearsal is due at ``now`` and not yet
        recorded: for each queued release whose instant is still ahead, the
        shortest lead whose time has come (a release queued 30 minutes ahead
        is rehearsed once, for the 1 h lead, not also for 24 h). None is
        started within ``QUIET`` of the instant."""
        if not leads:
            return []
        longest = max(leads)
        with transaction(self.s.sessions) as session:
            rows = session.execute(select(Release.id, Release.instant).where(
                Release.state.in_((QUEUED, ReleaseState.AWAITING_APPROVAL)),
                Release.instant > now,
                Release.instant <= now + longest)).all()
            done = {(r, lead, inst) for r, lead, inst in session.execute(
                select(Rehearsal.release_id, Rehearsal.lead_seconds, Rehearsal.instant)
                .where(Rehearsal.release_id.in_([row[0] for row in rows]),
                       Rehearsal.lead_seconds.is_not(None)))}
        due: list[tuple[str, timedelta]] = []
        for release_id, instant in rows:
            passed = [lead for lead in leads if instant - lead <= now]
            if not passed or instant - now < QUIET:
                continue
            lead = min(passed)
            if (release_id, int(lead.total_seconds()), instant) not in done:
                due.append((release_id, lead))
        return due

    def run_due(self, *, now: datetime, leads: Sequence[timedelta],
                stop: Callable[[], bool] = lambda: False) -> list[RehearsalReport]:
        reports: list[RehearsalReport] = []
        for release_id, lead in self.due(now=now, leads=leads):
            if stop():
                break
            try:
                report = self.rehearse(release_id, now=now, lead=lead)
            except Exception:
                log.exception("the rehearsal of %s failed to run; will try again", release_id)
                continue
            if report is not None:
                reports.append(report)
        return reports


def latest_reports(services: Services, release_id: str) -> list[RehearsalReport]:
    """Every recorded rehearsal of the release, oldest first."""
    with transaction(services.sessions) as session:
        release = session.get(Release, release_id)
        if release is None:
            return []
        rows = list(session.scalars(select(Rehearsal).where(
            Rehearsal.release_id == release_id).order_by(Rehearsal.at, Rehearsal.id)))
        return [report_of(row, release) for row in rows]


def latest(session: Session, release_ids: Sequence[str]) -> dict[str, Rehearsal]:
    """The newest recorded rehearsal of each release that has one."""
    newest: dict[str, Rehearsal] = {}
    for row in session.scalars(select(Rehearsal).where(Rehearsal.release_id.in_(release_ids))
                               .order_by(Rehearsal.at, Rehearsal.id)):
        newest[row.release_id] = row
    return newest


def report_of(row: Rehearsal, release: Release) -> RehearsalReport:
    """A recorded rehearsal as a report again (``embargo show``)."""
    return RehearsalReport(
        id=row.id, release_id=row.release_id, title=release.title,
        embargo=_describe(release), at=row.at,
        lead=None if row.lead_seconds is None else timedelta(seconds=row.lead_seconds),
        checks=tuple(Check(name=str(c["name"]), ok=bool(c["ok"]), detail=str(c["detail"]))
                     for c in json.loads(row.checks)))
