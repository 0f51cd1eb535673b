"""Releases built step by step (the console): a draft holds the title, the
embargo and the officers; its documents arrive as streams and are sealed as
they come, all of them under one fresh data key (a new upload replaces the
whole set, under a new key, since the console cannot open the old one).
Checks say what blocks a submission (errors) and what merely advises
(warnings); ``submit`` sends a clean draft for approval, or queues it when
approval is not required."""

from __future__ import annotations

import csv
import io
import logging
import mimetypes
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import BinaryIO

from sqlalchemy import delete, select, update

from config.errors import InputError, StateError
from release import audit, copy_timing, marking, sealing, timerules
from release import text as texts
from release.context import Services
from release.instants import embargo_of
from release.keys import load_public_key
from release.manifest import RecipientSpec, check_email, safe_filename
from release.records import AWAITING_APPROVAL, DRAFT, QUEUED, Document, Recipient, Release
from release.service import PDF, ReleaseService, new_id
from release.vault_keys import dek_key, document_key
from release.views import ReleaseDetail
from storage.db import affected, transaction

log = logging.getLogger(__name__)

EARLY_COPIES = timedelta(hours=24)


@dataclass(frozen=True, kw_only=True)
class Checks:
    errors: tuple[str, ...]
    warnings: tuple[str, ...]


def parse_officers(text: str) -> list[RecipientSpec]:
    """Officers from CSV text, one ``name,email,organisation`` a line (a
    header line of those words is skipped).

    :raises InputError: naming the line that is wrong
    """
    officers: list[RecipientSpec] = []
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        if number == 1 and [c.lower() for c in cells[:2]] == ["name", "email"]:
            continue
        if len(cells) != 3 or not cells[0] or not cells[2]:
            raise InputError(f"officers line {number}: expected name,email,organisation")
        where = f"officers line {number}"
        officers.append(RecipientSpec(
            name=texts.clean_text(cells[0], field=f"{where}: name", max_len=texts.NAME_MAX),
            email=check_email(cells[1], where),
            organisation=texts.clean_text(cells[2], field=f"{where}: organisation",
                                          max_len=texts.ORGANISATION_MAX)))
    return officers


def _resolve(service: ReleaseService, now: datetime, *, title: str, publish_on: str,
             at: str | None, zone: str | None,
             copies_at: str | None) -> tuple[str, timerules.Embargo, datetime | None]:
    """A draft's form, checked: its title, its embargo (one future instant)
    and its copies time, if one is given."""
    s = service.s
    title = texts.clean_text(title, field="title", max_len=texts.TITLE_MAX)
    embargo = service.resolve_embargo(publish_on, at or None, zone or None, now)
    copies_time = (copy_timing.resolve_copies_at(copies_at, embargo=embargo, now=now,
                                                 max_lead=s.copies_max_lead,
                                                 cutoff=s.copies_cutoff)
                   if copies_at else None)
    return title, embargo, copies_time


def create_draft(services: Services, *, actor: str, title: str, publish_on: str,
                 at: str | None, zone: str | None, owner: str | None,
                 copies_at: str | None, officers: list[RecipientSpec]) -> ReleaseDetail:
    """Record a draft with its embargo and officers and no documents yet.

    :raises InputError: no title, a date or time that names no single future
        instant (gap and fold refused with both candidates), bad copies time,
        an officer listed twice
    """
    service = ReleaseService(services, actor=actor)
    now = services.clock.now()
    title, embargo, copies_time = _resolve(service, now, title=title, publish_on=publish_on,
                                           at=at, zone=zone, copies_at=copies_at)
    _no_twice(officers, [])
    release_id = new_id("rel")
    slug = service._free_slug(embargo, title, set())
    with transaction(services.sessions) as session:
        release = Release(
            id=release_id, slug=slug, title=title,
            owner=owner, state=DRAFT, instant=embargo.instant, zone=embargo.zone,
            wall=embargo.wall, copies_at=copies_time, created_at=now, created_by=actor,
            revision=1, attempts=0, documents=[],
            recipients=[Recipient(id=new_id("rcp"), position=i, name=r.name, email=r.email,
                                  organisation=r.organisation) for i, r in enumerate(officers)])
        session.add(release)
        session.flush()
        audit.record(session, action="draft_created", actor=actor, at=now,
                     release_id=release_id, details={"title": title,
                                                     "embargo": embargo.describe()})
    return service.get(release_id)


def edit_draft(services: Services, release_id: str, *, actor: str, title: str,
               publish_on: str, at: str | None, zone: str | None,
               copies_at: str | None) -> ReleaseDetail:
    """Change a draft's title, embargo or copies time (its documents and
    officers stay).

    :raises InputError: as :func:`create_draft`
    :raises StateError: it is not a draft
    """
    release = _draft(services, release_id)
    service = ReleaseService(services, actor=actor)
    now = services.clock.now()
    title, embargo, copies_time = _resolve(service, now, title=title, publish_on=publish_on,
                                           at=at, zone=zone, copies_at=copies_at)
    slug = release.slug
    if (embargo.wall[:10], title) != (release.wall[:10], release.title):
        slug = service._free_slug(embargo, title, {release.slug})
    with transaction(services.sessions) as session:
        changed = affected(session.execute(
            update(Release).where(Release.id == release.id, Release.state == DRAFT)
            .values(title=title, slug=slug, instant=embargo.instant, zone=embargo.zone,
                    wall=embargo.wall, copies_at=copies_time,
                    revision=Release.revision + 1)))
        if not changed:
            raise StateError(f"release {release.id} is no longer a draft")
        audit.record(session, action="draft_changed", actor=actor, at=now,
                     release_id=release.id, details={"title": title,
                                                     "embargo": embargo.describe()})
    return service.get(release.id)


def _no_twice(new: list[RecipientSpec], existing: list[str]) -> None:
    seen = {e.lower() for e in existing}
    for officer in new:
        if officer.email.lower() in seen:
            raise InputError(f"{officer.email} is listed twice")
        seen.add(officer.email.lower())


def _draft(services: Services, release_id: str) -> ReleaseDetail:
    release = ReleaseService(services, actor="lookup").get(release_id)
    if release.state != DRAFT:
        raise StateError(f"release {release.id} is {release.state}; only a draft can be changed")
    return release


def add_officers(services: Services, release_id: str, officers: list[RecipientSpec], *,
                 actor: str) -> ReleaseDetail:
    release = _draft(services, release_id)
    _no_twice(officers, [r.email for r in release.recipients])
    now = services.clock.now()
    with transaction(services.sessions) as session:
        start = len(release.recipients)
        for i, r in enumerate(officers):
            session.add(Recipient(id=new_id("rcp"), release_id=release.id, position=start + i,
                                  name=r.name, email=r.email, organisation=r.organisation))
        audit.record(session, action="officers_added", actor=actor, at=now,
                     release_id=release.id, details={"officers": [r.email for r in officers]})
    return ReleaseService(services, actor=actor).get(release.id)


def remove_officer(services: Services, release_id: str, recipient_id: str, *,
                   actor: str) -> ReleaseDetail:
    release = _draft(services, release_id)
    now = services.clock.now()
    with transaction(services.sessions) as session:
        gone = session.get(Recipient, recipient_id)
        if gone is None or gone.release_id != release.id:
            from config.errors import NotFoundError

            raise NotFoundError(f"release {release.id} has no officer {recipient_id!r}")
        session.delete(gone)
        audit.record(session, action="officer_removed", actor=actor, at=now,
                     release_id=release.id, details={"officer": gone.email})
    return ReleaseService(services, actor=actor).get(release.id)


class DocumentSet:
    """One upload of a draft's documents: each is sealed as it streams in,
    under a fresh data key. ``commit`` replaces the draft's documents (and
    key) with these; ``abort``, or any failure, deletes what was sealed."""

    def __init__(self, services: Services, release_id: str, *, actor: str) -> None:
        self.s = services
        self.actor = actor
        self.release = _draft(services, release_id)
        self.public_key = load_public_key(services.keys_dir)
        self.dek = sealing.new_dek()
        self.documents: list[Document] = []
        self.written: list[str] = []

    def add(self, *, filename: str, kind: str, organisation: str | None,
            src: BinaryIO) -> Document:
        """Seal one document from ``src`` (read to its end).

        :raises InputError: a bad or duplicate file name, a letter without an organisation
        """
        name = safe_filename(filename)
        if any(texts.fold(d.filename) == texts.fold(name) for d in self.documents):
            raise InputError(f"two documents are named {name!r}")
        if kind == "letter" and not (organisation or "").strip():
            raise InputError(f"letter {name} needs an organisation")
        organisation = texts.optional_text(organisation, field=f"letter {name}: organisation",
                                           max_len=texts.ORGANISATION_MAX)
        document_id = new_id("doc")
        key = document_key(self.release.id, document_id)
        self.written.append(key)
        with self.s.vault.writer(key) as out:
            result = sealing.seal_stream(self.dek, document_id, src, out)
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if content_type == PDF:  # refused now, as `embargo queue` does, not at copy time
            self._trial_stamp(key, document_id, name)
        document = Document(id=document_id, position=len(self.documents), kind=kind,
                            organisation=(organisation or "").strip() or None, filename=name,
                            content_type=content_type, size=result.size, sha256=result.sha256)
        self.documents.append(document)
        return document

    def _trial_stamp(self, key: str, document_id: str, filename: str) -> None:
        """Stamp the PDF just sealed at ``key`` as a copy would be (read back
        from the vault: the upload streamed past and was not kept)."""
        data = io.BytesIO()
        with self.s.vault.reader(key) as sealed:
            sealing.open_stream(self.dek, document_id, sealed, data)
        marking.trial_stamp(data.getvalue(), filename=filename,
                            headline=embargo_of(self.release).headline(),
                            unstampable=self.s.copies_unstampable)

    def commit(self) -> ReleaseDetail:
        """Replace the draft's documents with this set."""
        try:
            self.written.append(dek_key(self.release.id))
            self.s.vault.put_bytes(dek_key(self.release.id),
                                   sealing.seal_dek(self.dek, self.public_key, self.release.id))
            self.dek = b""
            now = self.s.clock.now()
            with transaction(self.s.sessions) as session:
                changed = affected(session.execute(
                    update(Release).where(Release.id == self.release.id, Release.state == DRAFT)
                    .values(revision=Release.revision + 1)))
                if not changed:
                    raise StateError(f"release {self.release.id} is no longer a draft")
                old = list(session.scalars(select(Document.id).where(
                    Document.release_id == self.release.id)))
                session.execute(delete(Document).where(Document.release_id == self.release.id))
                for document in self.documents:
                    document.release_id = self.release.id
                    session.add(document)
                audit.record(session, action="documents_sealed", actor=self.actor, at=now,
                             release_id=self.release.id, details={
                                 "documents": [{"id": d.id, "name": d.filename,
                                                "sha256": d.sha256, "size": d.size}
                                               for d in self.documents]})
        except BaseException:
            self.abort()
            raise
        for document_id in old:
            self._delete(document_key(self.release.id, document_id))
        return ReleaseService(self.s, actor=self.actor).get(self.release.id)

    def abort(self) -> None:
        """Delete every object this set wrote (the draft keeps its old set:
        its key is only replaced by ``commit``)."""
        self.dek = b""
        for key in self.written:
            if key != dek_key(self.release.id):
                self._delete(key)
        self.written = []

    def _delete(self, key: str) -> None:
        try:
            self.s.vault.delete(key)
        except Exception:  # clean-up must not hide the first error
            log.exception("could not remove %s", key)


def check(release: ReleaseDetail, *, now: datetime, min_lead: timedelta) -> Checks:
    """What blocks submitting ``release`` (errors) and what is worth a look (warnings)."""
    errors: list[str] = []
    warnings: list[str] = []
    docs, officers = release.documents, release.recipients
    if not any(d.kind == "report" for d in docs):
        errors.append("no report: upload the national report")
    officer_orgs = {(r.organisation or "").strip().lower() for r in officers}
    letter_orgs = {(d.organisation or "").strip().lower() for d in docs if d.kind == "letter"}
    for d in docs:
        if d.kind == "letter" and (d.organisation or "").strip().lower() not in officer_orgs:
            errors.append(f"letter {d.filename} is for {d.organisation}, which has no officer")
    names = [d.filename.lower() for d in docs]
    for name in sorted({n for n in names if names.count(n) > 1}):
        errors.append(f"two documents are named {name!r}")
    if release.instant <= now:
        errors.append(f"the embargo, {embargo_of(release).describe()}, has passed")
    elif release.instant - now < min_lead:
        errors.append(f"the embargo, {embargo_of(release).describe()}, is less than "
                      f"{timerules.format_delta(min_lead)} away (web.min_lead)")
    for r in officers:
        if (r.organisation or "").strip().lower() not in letter_orgs:
            warnings.append(f"officer {r.name} ({r.organisation}) has no letter for their "
                            "organisation: they get the report alone")
    if release.copies_at is not None and release.instant - release.copies_at.utc > EARLY_COPIES:
        warnings.append(f"copies go {release.copies_at.shown}, more "
                        "than 24 hours before the embargo")
    return Checks(errors=tuple(errors), warnings=tuple(warnings))


def submit(services: Services, release_id: str, *, actor: str,
           min_lead: timedelta) -> ReleaseDetail:
    """Send a draft that passes its checks for approval (or queue it when
    approval is not required).

    :raises InputError: the checks found errors (all of them in the message)
    :raises StateError: it is not a draft
    """
    release = _draft(services, release_id)
    now = services.clock.now()
    found = check(release, now=now, min_lead=min_lead)
    if found.errors:
        raise InputError("cannot submit: " + "; ".join(found.errors))
    copies_at = release.copies_at.utc if release.copies_at else None
    if release.recipients and copies_at is None:
        copies_at = copy_timing.resolve_copies_at(None, embargo=embargo_of(release), now=now,
                                             max_lead=services.copies_max_lead,
                                             cutoff=services.copies_cutoff)
    state = AWAITING_APPROVAL if services.approval_required else QUEUED
    with transaction(services.sessions) as session:
        changed = affected(session.execute(
            update(Release).where(Release.id == release.id, Release.state == DRAFT)
            .values(state=state, submitted_by=actor, copies_at=copies_at,
                    revision=Release.revision + 1)))
        if not changed:
            raise StateError(f"release {release.id} is no longer a draft")
        audit.record(session, action="release_submitted" if state == AWAITING_APPROVAL
                     else "release_queued", actor=actor, at=now, release_id=release.id,
                     details={"title": release.title,
                              "embargo": embargo_of(release).describe(),
                              "instant": release.instant.isoformat(),
                              "awaiting_approval": state == AWAITING_APPROVAL,
                              "copies_at": copies_at.isoformat() if copies_at else None,
                              "documents": [{"id": d.id, "name": d.filename, "sha256": d.sha256}
                                            for d in release.documents],
                              "recipients": [r.email for r in release.recipients]})
    return ReleaseService(services, actor=actor).get(release.id)
