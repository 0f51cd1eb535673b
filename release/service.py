"""The one service API of the domain. The command line (and later a web UI)
call this; it owns no clock, engine or storage of its own: all are passed in."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import unicodedata
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import and_, bindparam, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.orm.attributes import set_committed_value

from config.errors import (
    AmbiguousIdError,
    InputError,
    NotFoundError,
    ReleaseNotFoundError,
    StateError,
    StorageError,
)
from release import (
    audit,
    copy_holders,
    copy_timing,
    marking,
    presenting,
    sealing,
    timerules,
    tracing,
)
from release import rehearsal as rehearsals
from release import text as texts
from release.context import Services
from release.instants import describe_instant, embargo_of
from release.keys import load_public_key
from release.manifest import DocumentSpec, ReleaseSpec, check_email
from release.records import (
    AWAITING_APPROVAL,
    CANCELLED,
    DRAFT,
    FAILED,
    PUBLISHED,
    PUBLISHING,
    QUEUED,
    AuditEvent,
    Document,
    Node,
    OutboxMessage,
    Purpose,
    Recipient,
    Release,
    ReleaseState,
    table_of,
)
from release.vault_keys import dek_key, document_key
from release.views import (
    AccessEntry,
    Counts,
    DocumentView,
    NodeStatus,
    NoticeView,
    RehearsalView,
    ReleaseDetail,
    ReleaseSummary,
    TraceResult,
)
from storage.base import VaultBatch
from storage.db import affected, read_transaction, server_time, transaction

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (file name, bytes done, bytes total)
PDF = "application/pdf"
_SLUG_TRIES = 20
_RELEASES, _DOCUMENTS, _RECIPIENTS = table_of(Release), table_of(Document), table_of(Recipient)
_RELEASE_COLUMNS = tuple(column.key for column in _RELEASES.columns)
# Built once: building a statement costs more than running it.
_INSERT_RELEASE, _INSERT_DOCUMENTS, _INSERT_RECIPIENTS = (
    insert(_RELEASES), insert(_DOCUMENTS), insert(_RECIPIENTS))
# The slugs a new release's could collide with: its base, and the base with "-N" after
# it: an index range ("-" is followed by "." in ASCII), not a LIKE, which SQLite's
# case-insensitive LIKE answers by reading every release.
_SLUGS_FROM = select(_RELEASES.c.slug).where(or_(
    _RELEASES.c.slug == bindparam("base"),
    and_(_RELEASES.c.slug > bindparam("dash"), _RELEASES.c.slug < bindparam("dot"))))


def trial_stamp(doc: DocumentSpec, headline: str, *, unstampable: str) -> str | None:
    """Stamp ``doc`` in memory as a pre-embargo copy would be; return the
    SHA-256 of the bytes read. A PDF that cannot be stamped is refused
    (InputError with pypdf's reason) unless ``unstampable`` is
    ``"send-unmarked"``. Other files are not read (None)."""
    if doc.content_type != PDF:
        return None
    try:
        data = doc.path.read_bytes()
    except OSError as exc:
        raise InputError(f"file {doc.path} cannot be read: {exc.strerror}") from None
    marking.trial_stamp(data, filename=doc.filename, headline=headline, unstampable=unstampable)
    return hashlib.sha256(data).hexdigest()


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def slugify(text: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:40].rstrip("-") or "release"


class ReleaseService:
    """Queue, inspect, cancel and reschedule releases."""

    def __init__(self, services: Services, *, actor: str) -> None:
        self.s = services
        self.actor = actor
        self.sessions = services.sessions

    # -- queue -------------------------------------------------------------
    def resolve_embargo(self, publish_on: str, at: str | None, zone: str | None,
                        now: datetime) -> timerules.Embargo:
        return timerules.resolve(publish_on, at=at, zone=zone or self.s.zone, now=now,
                                 default_at=self.s.default_at)

    def queue(self, spec: ReleaseSpec, *, progress: Progress | None = None) -> ReleaseDetail:
        """Seal every document into the vault and record the release.

        Everything is checked before the first byte is sealed; if anything
        fails part-way (including Ctrl-C), the objects already sealed are
        deleted and no release record is written.

        When it returns, the release is durable: its row, documents,
        recipients and audit event are committed (one transaction), and
        before that commit every sealed object it names (each document, the
        sealed data key) was made durable, the file and the folders whose
        entries it changed fsynced (one vault batch: each folder once, not
        once per object). What a crash leaves is objects without a row,
        removed by ``custody.sweep_orphans`` once the newest of them is an
        hour old (while a queue runs, its newest object is younger)."""
        now = self.s.clock.now()
        embargo = self.resolve_embargo(spec.publish_on, spec.at, spec.zone, now)
        copies_at = copy_timing.resolve_copies_at(spec.copies_at, embargo=embargo, now=now,
                                             max_lead=self.s.copies_max_lead,
                                             cutoff=self.s.copies_cutoff)
        if not spec.recipients:
            copies_at = None  # nobody to send copies to: no copies job either
        public_key = load_public_key(self.s.keys_dir)
        checked = [trial_stamp(doc, embargo.headline(), unstampable=self.s.copies_unstampable)
                   for doc in spec.documents]
        release_id = new_id("rel")
        written: list[str] = []
        batch = self.s.vault.batch()
        try:
            dek = sealing.new_dek()
            documents: list[dict[str, Any]] = []
            for position, (doc, digest) in enumerate(zip(spec.documents, checked, strict=True)):
                document_id = new_id("doc")
                key = document_key(release_id, document_id)
                written.append(key)
                result = self._seal_file(batch, dek, document_id, doc.path, doc.filename,
                                         doc.size, key, progress)
                _same_as_checked(doc, result, digest)
                documents.append(dict(
                    id=document_id, position=position, kind=doc.kind,
                    organisation=doc.organisation, filename=doc.filename,
                    content_type=doc.content_type, size=result.size, sha256=result.sha256))
            written.append(dek_key(release_id))
            batch.put_bytes(dek_key(release_id), sealing.seal_dek(dek, public_key, release_id))
            del dek
            batch.sync()  # the objects are durable before the row that names them
            recipients = [dict(id=new_id("rcp"), position=i, name=r.name, email=r.email,
                               organisation=r.organisation)
                          for i, r in enumerate(spec.recipients)]
            tried: set[str] = set()
            for attempt in range(_SLUG_TRIES):
                try:
                    recorded = self._record_queued(release_id, spec, embargo, copies_at, now,
                                                   documents, recipients, tried)
                    break
                except _SlugTaken as taken:
                    # Another queue took the slug between our look and our insert
                    # (PostgreSQL, READ COMMITTED): try the next suffix.
                    if attempt == _SLUG_TRIES - 1:
                        raise taken.error from taken.error.__cause__
                    tried.add(taken.slug)
        except BaseException:
            for key in written:
                try:
                    self.s.vault.delete(key)
                except Exception:  # clean-up must not hide the first error
                    log.exception("could not remove %s after a failed queue", key)
            raise
        log.info("queued %s for %s", release_id, embargo.describe())
        # Built after the commit (outside the writer lock, and outside the
        # clean-up above: the release is recorded), as get() would read it back.
        row, rows, people, event = recorded
        release = Release(**row)
        set_committed_value(release, "documents", [Document(**d) for d in rows])
        set_committed_value(release, "recipients", [Recipient(**r) for r in people])
        return presenting.detail(release, self.s.clock.now(), copies=[], notices=[],
                                 events=[event])

    def _record_queued(self, release_id: str, spec: ReleaseSpec,
                       embargo: timerules.Embargo, copies_at: datetime | None, now: datetime,
                       documents: list[dict[str, Any]], recipients: list[dict[str, Any]],
                       tried: set[str]) -> tuple[dict[str, Any], list[dict[str, Any]],
                                                 list[dict[str, Any]], AuditEvent]:
        """Choose a free slug, insert the release, its documents, recipients
        and audit event: one transaction. Returns what was inserted (the
        release's row, its documents' and recipients' rows) and the event.
        Raises _SlugTaken when the insert meets a slug another queue took
        meanwhile."""
        slug = ""
        # Plain rows for Core statements, not ORM objects for the unit of work
        # (as audit.record): its bookkeeping cost more than the statements.
        row: dict[str, Any] = dict.fromkeys(_RELEASE_COLUMNS)
        row.update(id=release_id, title=spec.title, owner=spec.owner,
                   state=AWAITING_APPROVAL if self.s.approval_required else QUEUED,
                   submitted_by=self.actor, instant=embargo.instant, zone=embargo.zone,
                   wall=embargo.wall, copies_at=copies_at, created_at=now,
                   created_by=self.actor, revision=1, attempts=0)
        rows = [dict(d, release_id=release_id) for d in documents]
        people = [dict(r, release_id=release_id) for r in recipients]
        details = {
            "awaiting_approval": self.s.approval_required,
            "title": spec.title, "embargo": embargo.describe(),
            "instant": embargo.instant.isoformat(),
            "copies_at": copies_at.isoformat() if copies_at else None,
            "documents": [{"id": d["id"], "name": d["filename"],
                           "sha256": d["sha256"]} for d in documents],
            "recipients": [r.email for r in spec.recipients]}
        try:
            with transaction(self.sessions) as session:
                slug = row["slug"] = self._free_slug(embargo, spec.title, tried, session)
                connection = session.connection()
                connection.execute(_INSERT_RELEASE, row)
                if rows:
                    connection.execute(_INSERT_DOCUMENTS, rows)
                if people:
                    connection.execute(_INSERT_RECIPIENTS, people)
                seq = audit.record(session, action="release_queued", actor=self.actor,
                                   at=now, release_id=release_id, details=details)
        except StorageError as exc:
            if slug and isinstance(exc.__cause__, IntegrityError) \
                    and "slug" in str(exc.__cause__.orig):
                raise _SlugTaken(slug, exc) from exc
            raise
        event = AuditEvent(seq=seq, at=now, actor=self.actor, action="release_queued",
                           release_id=release_id, details=json.dumps(details))
        return row, rows, people, event

    def _seal_file(self, batch: VaultBatch, dek: bytes, document_id: str, path: Path,
                   name: str, size: int, key: str,
                   progress: Progress | None) -> sealing.StreamResult:
        done = 0

        def step(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(name, done, size)

        try:
            src = path.open("rb")
        except OSError as exc:
            raise InputError(f"file {path} cannot be read: {exc.strerror}") from None
        with src, batch.writer(key) as out:
            return sealing.seal_stream(dek, document_id, src, out, on_progress=step)

    def _free_slug(self, embargo: timerules.Embargo, title: str, tried: set[str],
                   session: Session | None = None) -> str:
        """A slug no release has, looked up in ``session`` (or a
        transaction of its own)."""
        if session is None:
            with transaction(self.sessions) as own:
                return self._free_slug(embargo, title, tried, own)
        base = f"{embargo.wall[:10]}-{slugify(title)}"
        taken = tried | set(session.connection().execute(
            _SLUGS_FROM, {"base": base, "dash": f"{base}-", "dot": f"{base}."}).scalars())
        slug, n = base, 2
        while slug in taken:
            slug, n = f"{base}-{n}", n + 1
        return slug

    # -- read --------------------------------------------------------------
    def _row(self, session: Session, release_id: str) -> Release:
        """The release ``release_id`` (or the one whose id starts with it, six
        characters or more), documents and recipients loaded."""
        loaded = (selectinload(Release.documents), selectinload(Release.recipients))
        release = session.get(Release, release_id, options=loaded)
        if release is None and len(release_id) >= 6:
            matches = list(session.scalars(select(Release).options(*loaded).where(
                Release.id.startswith(release_id, autoescape=True)).limit(2)))
            if len(matches) > 1:
                raise AmbiguousIdError(release_id)
            release = matches[0] if matches else None
        if release is None:
            raise ReleaseNotFoundError(release_id)
        return release

    def get(self, release_id: str) -> ReleaseDetail:
        """One release in full: documents, recipients, pre-embargo copies,
        notices and audit events, read in one transaction.

        :raises ReleaseNotFoundError: no release has this id (or prefix)
        :raises AmbiguousIdError: the prefix matches more than one release"""
        with read_transaction(self.sessions) as session:
            return self._detail(session, self._row(session, release_id))

    def _detail(self, session: Session, release: Release) -> ReleaseDetail:
        notices = session.scalars(select(OutboxMessage).where(
            OutboxMessage.release_id == release.id).order_by(OutboxMessage.id))
        events = session.scalars(select(AuditEvent).where(
            AuditEvent.release_id == release.id).order_by(AuditEvent.seq))
        public_now: dict[str, str] | None = None
        if release.state in (FAILED, CANCELLED):  # a partial publication, perhaps
            found = set(self._public_keys(release.slug, release.documents))
            public_now = {d.id: self.s.public.url(key) for d in release.documents
                          if (key := f"{release.slug}/{d.filename}") in found}
        newest = rehearsals.latest(session, [release.id]).get(release.id)
        rehearsal = None
        if newest is not None:
            report = rehearsals.report_of(newest, release)
            rehearsal = RehearsalView(at=presenting.moment_at(report.at, release.zone),
                                      lead=rehearsals.lead_text(report.lead),
                                      ready=report.ready, lines=tuple(report.lines()))
        return presenting.detail(release, self.s.clock.now(),
                                 copies=tracing.copies_of(session, release.id),
                                 notices=list(notices), events=list(events),
                                 public_now=public_now, rehearsal=rehearsal)

    def list_releases(self) -> list[ReleaseSummary]:
        """Every release, soonest embargo first."""
        now = self.s.clock.now()
        with read_transaction(self.sessions) as session:
            return [presenting.summary(r, now) for r in session.scalars(
                select(Release).options(selectinload(Release.documents),
                                        selectinload(Release.recipients))
                .order_by(Release.instant))]

    def access_list(self, release_id: str) -> tuple[ReleaseSummary, list[AccessEntry]]:
        """The release and who received pre-embargo copies of it, of what,
        and when."""
        now = self.s.clock.now()
        with read_transaction(self.sessions) as session:
            release = self._row(session, release_id)
            return presenting.summary(release, now), list(tracing.access_list(session, release))

    def trace(self, what: str, data: bytes | None = None) -> TraceResult:
        """Who received the copy ``what`` (a copy id), or the copy whose
        bytes are ``data``.

        :raises NotFoundError: no copy id in it, or no such copy issued here"""
        copy_id = tracing.copy_id_in(what, data)
        with read_transaction(self.sessions) as session:
            return tracing.trace(session, copy_id)

    def nodes(self) -> list[NodeStatus]:
        """Every scheduler node that has run against this database, newest
        heartbeat first, as the database server's clock sees them."""
        with self.s.engine.connect() as connection:
            server = server_time(connection)
        with read_transaction(self.sessions) as session:
            return [presenting.node_status(node, server) for node in session.scalars(
                select(Node).order_by(Node.heartbeat_at.desc()))]

    def counts(self) -> Counts:
        with read_transaction(self.sessions) as session:
            rows = session.execute(select(Release.state, func.count()).group_by(Release.state))
            return Counts(**{ReleaseState(state).value: n for state, n in rows})

    # -- change ------------------------------------------------------------
    def _load(self, release_id: str) -> Release:
        with read_transaction(self.sessions) as session:
            return self._row(session, release_id)

    def cancel(self, release_id: str, *, reason: str) -> ReleaseDetail:
        """Cancel a queued (or failed) release and shred its data key."""
        if not isinstance(reason, str) or not reason.strip():
            raise InputError("a cancellation needs a --reason")
        reason = texts.clean_text(reason, field="--reason", max_len=texts.REASON_MAX)
        release = self._load(release_id)
        now = self.s.clock.now()
        with transaction(self.sessions) as session:
            changed = affected(session.execute(
                update(Release).where(Release.id == release.id,
                                      Release.state.in_((QUEUED, FAILED, AWAITING_APPROVAL,
                                                         DRAFT)))
                .values(state=CANCELLED, reason=reason, revision=Release.revision + 1)
            ))
            if not changed:
                current = session.get(Release, release.id)
                state = current.state if current else "gone"
                if state == CANCELLED and self.s.vault.exists(dek_key(release.id)):
                    # An earlier cancel committed but could not delete the key.
                    self.s.vault.delete(dek_key(release.id))
                    raise StateError(f"release {release.id} was already cancelled; its data "
                                     "key, left behind then, is now destroyed")
                raise StateError(f"release {release.id} is {state}; only a draft, awaiting, "
                                 "queued or failed release can be cancelled")
            current = session.get(Release, release.id)
            assert current is not None
            told = copy_holders.notify_copy_holders(session, current, purpose=Purpose.WITHDRAWN,
                                                    now=now, cutoff=self.s.copies_cutoff)
            audit.record(session, action="release_cancelled", actor=self.actor, at=now,
                         release_id=release.id, details={"reason": reason,
                                                         "officers_told": told})
        self.s.vault.delete(dek_key(release.id))
        return self.get(release.id)

    def resend(self, notice: str, *, to: str | None = None) -> list[NoticeView]:
        """Send failed or given-up notices again, under the same Message-ID.
        ``notice`` is a notice's number (as ``show`` lists them), its
        Message-ID, or a release id (then every failed or given-up notice of
        it). ``to`` sends one notice to another address. Returns the notices
        queued again. Raises NotFoundError, StateError, InputError."""
        if to is not None:  # the queue's own check: an address it refuses fails later
            to = check_email(to, "--to")
        now = self.s.clock.now()
        with transaction(self.sessions) as session:
            where = (OutboxMessage.id == int(notice) if notice.strip().isdigit()
                     else OutboxMessage.message_id == notice.strip()
                     if notice.strip().startswith("<") else OutboxMessage.release_id == notice)
            rows = list(session.scalars(select(OutboxMessage).where(where)
                                        .order_by(OutboxMessage.id)))
            if not rows:
                raise NotFoundError(f"no notice or release {notice!r}")
            if len(rows) > 1:
                rows = [r for r in rows if r.given_up_at is not None and r.delivered_at is None]
                if to is not None and len(rows) != 1:
                    raise InputError("another address goes with one notice: name the notice "
                                     "by its number")
            for row in rows:
                if row.delivered_at is not None or row.given_up_at is None:
                    state = "delivered" if row.delivered_at is not None else "still being sent"
                    raise StateError(f"notice {row.id} to {row.to_addr} is {state}; only a "
                                     "failed or given-up notice can be resent")
                if row.not_after is not None and now >= row.not_after:
                    raise StateError(f"notice {row.id} is a pre-embargo copy and the embargo "
                                     "has lifted: it can no longer be sent")
                release = session.get(Release, row.release_id)
                if row.purpose == Purpose.COPY and (release is None or release.state != QUEUED):
                    raise StateError(f"notice {row.id} is a pre-embargo copy of a release "
                                     "that is not queued; it cannot be sent")
                before = row.to_addr
                row.to_addr = to.strip() if to is not None else row.to_addr
                row.given_up_at = row.failed_at = row.claimed_by = None
                row.claim_expires_at = None
                row.not_before = row.next_attempt_at = now  # a fresh give_up_after
                audit.record(session, action="notice_resent", actor=self.actor, at=now,
                             release_id=row.release_id,
                             details={"to": row.to_addr, "was_to": before,
                                      "purpose": row.purpose, "message_id": row.message_id,
                                      "last_error": row.last_error})
            zones = dict(session.execute(select(Release.id, Release.zone).where(
                Release.id.in_({row.release_id for row in rows}))).all())
            return [presenting.notice_view(row, zones[row.release_id]) for row in rows]

    def reschedule(self, release_id: str, *, publish_on: str, at: str | None,
                   zone: str | None, reason: str | None = None) -> ReleaseDetail:
        """Move a queued (or awaiting) release. A date alone, without ``at``,
        keeps the release's wall time of day (in its zone, or the new one)."""
        publish_on = texts.clean_text(publish_on, field="--publish-on", max_len=texts.FLAG_MAX)
        at = texts.optional_text(at, field="--at", max_len=texts.FLAG_MAX)
        zone = texts.optional_text(zone, field="--zone", max_len=texts.FLAG_MAX)
        release = self._load(release_id)
        now = self.s.clock.now()
        if at is None and ":" not in publish_on:  # a date alone, not a timestamp
            at = release.wall.partition("T")[2] or None
        embargo = self.resolve_embargo(publish_on, at, zone or release.zone, now)
        old = embargo_of(release)
        if (release.copies_issued_at is None and release.copies_at is not None
                and release.copies_at >= embargo.instant - self.s.copies_cutoff):
            raise InputError(f"the pre-embargo copies are due after {embargo.describe()}; "
                             "choose a later embargo, or cancel and queue it again "
                             "with an earlier copies time")
        with transaction(self.sessions) as session:
            changed = affected(session.execute(
                update(Release).where(Release.id == release.id,
                                      Release.state.in_((QUEUED, AWAITING_APPROVAL)))
                .values(instant=embargo.instant, zone=embargo.zone, wall=embargo.wall,
                        revision=Release.revision + 1)
            ))
            if not changed:
                current = session.get(Release, release.id)
                raise StateError(f"release {release.id} is "
                                 f"{current.state if current else 'gone'}; "
                                 "only a queued (or awaiting) release can be rescheduled")
            current = session.get(Release, release.id)
            assert current is not None
            told = copy_holders.notify_copy_holders(session, current, purpose=Purpose.RESCHEDULED,
                                                    now=now, cutoff=self.s.copies_cutoff)
            audit.record(session, action="release_rescheduled", actor=self.actor, at=now,
                         release_id=release.id,
                         details={"from": old.describe(), "to": embargo.describe(),
                                  "instant": embargo.instant.isoformat(),
                                  "officers_told": told,
                                  **({"reason": reason} if reason else {})})
        return self.get(release.id)

    def retry(self, release_id: str) -> ReleaseDetail:
        """Put a failed release back in the queue: the scheduler publishes it
        at once if its instant has passed (what an earlier attempt made
        public is verified and kept, nothing is written twice). The reason
        stays until a publication succeeds."""
        release = self._load(release_id)
        now = self.s.clock.now()
        with transaction(self.sessions) as session:
            changed = affected(session.execute(
                update(Release).where(Release.id == release.id, Release.state == FAILED)
                .values(state=QUEUED, claimant=None, lease_expires_at=None,
                        failing_since=None, revision=Release.revision + 1)))
            if not changed:
                current = session.get(Release, release.id)
                raise StateError(f"release {release.id} is "
                                 f"{current.state if current else 'gone'}; only a failed "
                                 "release can be retried")
            audit.record(session, action="publication_retried", actor=self.actor, at=now,
                         release_id=release.id, details={"reason": release.reason})
        return self.get(release.id)

    def public_objects(self, release: ReleaseSummary) -> list[str]:
        """The keys of ``release`` (its documents, its manifest) that are
        public now, read from the public location itself."""
        return self._public_keys(release.slug, release.documents)

    def _public_keys(self, slug: str, documents: Iterable[DocumentView | Document]
                     ) -> list[str]:
        keys = [f"{slug}/{d.filename}" for d in documents]
        keys.append(f"{slug}/manifest.json")
        return [key for key in keys if self.s.public.exists(key)]

    def unpublish(self, release_id: str) -> list[str]:
        """Remove from the public location whatever of a cancelled release
        is there (a release cancelled after a partial publication). Returns
        the public addresses removed; audited."""
        release = self._load(release_id)
        if release.state != CANCELLED:
            raise StateError(f"release {release.id} is {release.state}; only a cancelled "
                             "release can be unpublished (cancel it first)")
        found = self._public_keys(release.slug, release.documents)
        removed = []
        for key in found:
            self.s.public.delete(key)
            removed.append(self.s.public.url(key))
        now = self.s.clock.now()
        with transaction(self.sessions) as session:
            session.execute(update(Document).where(Document.release_id == release.id)
                            .values(published_at=None, public_url=None))
            audit.record(session, action="release_unpublished", actor=self.actor, at=now,
                         release_id=release.id, details={"removed": removed})
        return removed

    def verify_audit(self) -> audit.ChainReport:
        with transaction(self.sessions) as session:
            return audit.verify(session)


class _SlugTaken(Exception):
    """The slug chosen was taken by another queue between the look and the insert."""

    def __init__(self, slug: str, error: Exception) -> None:
        super().__init__(slug)
        self.slug = slug
        self.error = error


def _same_as_checked(doc: DocumentSpec, result: sealing.StreamResult,
                     digest: str | None) -> None:
    """What was sealed is what was checked: the size seen at validation (and
    the SHA-256 of the trial stamp's read), and the file's size now."""
    try:
        size_now = doc.path.stat().st_size
    except OSError:
        size_now = -1
    if result.size != doc.size or size_now != result.size or (
            digest is not None and digest != result.sha256):
        raise InputError(f"{doc.filename} changed while being queued ({doc.size} bytes when "
                         f"checked, {result.size} sealed, {max(size_now, 0)} now); nothing "
                         "was queued: queue it again once the file is final")


__all__ = ["CANCELLED", "FAILED", "PUBLISHED", "PUBLISHING", "QUEUED", "ReleaseService",
           "Services", "dek_key", "describe_instant", "document_key", "embargo_of"]
