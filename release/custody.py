"""Custody of what is sealed: proving the publisher's key opens every
release still to publish, that every sealed object is there and whole,
that the vault and the public location take a write, re-sealing every data
key to a new key pair (rotation), and sweeping what a killed queue left.

Every function takes the services (and keys) it needs; none reads settings.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from config.errors import EmbargoError, InputError, NotFoundError, SealError, StateError
from release import audit, keys, sealing
from release.context import Services
from release.records import AWAITING_APPROVAL, DRAFT, FAILED, PUBLISHING, QUEUED, Release
from release.vault_keys import dek_key, document_key
from release.views import Finding
from storage.base import PublicTarget, Vault, VaultEntry
from storage.db import read_transaction, transaction

log = logging.getLogger(__name__)

# States whose data key is still in the vault and still needed (a draft's
# once its documents are uploaded).
ACTIVE = (QUEUED, PUBLISHING, FAILED, AWAITING_APPROVAL, DRAFT)
# Short-lived objects: the probe write (removed at once; a leftover is swept
# after ORPHAN_AGE, as are the queue markers earlier versions wrote here).
PENDING_PREFIX = "pending/"
ORPHAN_AGE = timedelta(hours=1)
_TAG = 16


class _Sink:
    """Where a check decrypts to: nothing is kept."""

    def write(self, data: Any) -> int:
        return len(data)


def sealed_size(size: int, segment_size: int) -> int:
    """Bytes of the EMB1 object holding ``size`` bytes of plaintext."""
    segments = max(1, -(-size // segment_size))
    return sealing.HEADER_SIZE + size + segments * _TAG


def active_releases(services: Services) -> list[Release]:
    from sqlalchemy import select
    from sqlalchemy.orm import selectinload

    with transaction(services.sessions) as session:
        return [r for r in session.scalars(select(Release).where(Release.state.in_(ACTIVE))
                                           .options(selectinload(Release.documents))
                                           .order_by(Release.instant))
                if r.state != DRAFT or r.documents]


def check_release(services: Services, release: Release,
                  private_key: X25519PrivateKey | None) -> list[Finding]:
    """Every sealed object of ``release`` present with the recorded size;
    with ``private_key``, its data key opens and every document decrypts to
    the recorded SHA-256 (a flipped byte is found here)."""
    vault = services.vault
    label = f"release {release.id}"
    findings: list[Finding] = []
    dek: bytes | None = None
    try:
        sealed = vault.get_bytes(dek_key(release.id))
    except NotFoundError:
        return [Finding(what="release", ok=False,
                        detail=f"{label}: its data key is missing from the vault")]
    if private_key is not None:
        try:
            dek = sealing.open_dek(sealed, private_key, release.id)
        except SealError:
            return [Finding(what="release", ok=False,
                            detail=f"{label}: the private key does not open its data key")]
    for document in release.documents:
        key = document_key(release.id, document.id)
        where = f"{label}: document {document.filename}"
        try:
            with vault.reader(key) as src:
                header = src.read(sealing.HEADER_SIZE)
                segment = int.from_bytes(header[4:8], "big") if len(header) >= 8 else 0
                expected = (sealed_size(document.size, segment)
                            if sealing.MIN_SEGMENT_SIZE <= segment <= sealing.MAX_SEGMENT_SIZE
                            else -1)
            stored = vault.size(key)
            if stored != expected:
                findings.append(Finding(what="release", ok=False, detail=(
                    f"{where}: sealed object is {stored} bytes, expected {expected} "
                    f"for {document.size} bytes of plaintext")))
                continue
            if dek is not None:
                with vault.reader(key) as src:
                    result = sealing.open_stream(dek, document.id, src, _Sink())  # type: ignore[arg-type]
                if result.sha256 != document.sha256 or result.size != document.size:
                    findings.append(Finding(what="release", ok=False,
                                            detail=f"{where}: does not match its SHA-256"))
                    continue
        except NotFoundError:
            findings.append(Finding(what="release", ok=False,
                                    detail=f"{where}: sealed object is missing"))
            continue
        except SealError:
            findings.append(Finding(what="release", ok=False,
                                    detail=f"{where}: sealed object is damaged or tampered "
                                           "with (it does not decrypt)"))
            continue
    if not findings:
        how = "opens and decrypts" if dek is not None else "objects present, sizes match"
        findings.append(Finding(what="release", ok=True,
                                detail=f"{label}: {len(release.documents)} documents, {how}"))
    return findings


def check_keys(services: Services, keys_dir: Path) -> tuple[list[Finding],
                                                             X25519PrivateKey | None]:
    """The key pair loads and matches; returns the findings and the private
    key (None when it cannot be used)."""
    try:
        private, public = keys.check_pair(keys_dir)
    except EmbargoError as exc:
        return [Finding(what="keys", ok=False, detail=str(exc))], None
    return [Finding(what="keys", ok=True,
                    detail=f"{keys_dir}: private and public key match "
                           f"(fingerprint {keys.fingerprint(public)})")], private


def probe_vault(vault: Vault) -> None:
    """Write a small object to the vault, read it back and remove it.
    Raises StorageError (or OSError) when the vault does not take a write."""
    key = f"{PENDING_PREFIX}probe-{secrets.token_hex(8)}"
    data = secrets.token_bytes(4096)
    try:
        vault.put_bytes(key, data)
        if vault.get_bytes(key) != data:
            raise InputError(f"the vault gave back other bytes than written at {key}")
    finally:
        vault.delete(key)


def probe_public(public: PublicTarget) -> None:
    """The probe write the rehearsal makes too (``PublicTarget.probe``): a
    small hidden object created with the publisher's conditional create, read
    back and removed. Raises StorageError naming the step that failed."""
    public.probe()


def probe(what: str, run: Any, where: object) -> Finding:
    try:
        run()
    except (EmbargoError, OSError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return Finding(what=what, ok=False, detail=f"{where}: a probe write failed: {detail}")
    return Finding(what=what, ok=True, detail=f"{where}: takes a write")


# -- rotation ------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Rotation:
    old: str  # fingerprints
    new: str
    resealed: tuple[str, ...]


def rotate(services: Services, keys_dir: Path, *, actor: str) -> Rotation:
    """Make a new key pair and re-seal every active release's data key to it.

    The old private key is needed once, here. The new pair is written beside
    the old one (``publisher.key.next``) first; the old pair is kept (as
    ``.old`` once the new one is installed) until every data key opens with
    the new key, so a rotation stopped half-way is finished by running it
    again. Each re-sealed key is audited. Raises StateError when a data key
    opens with neither key."""
    key_path, pub_path = keys_dir / keys.PRIVATE_NAME, keys_dir / keys.PUBLIC_NAME
    next_key, next_pub = key_path.with_name(key_path.name + ".next"), \
        pub_path.with_name(pub_path.name + ".next")
    old_key, old_pub = key_path.with_name(key_path.name + ".old"), \
        pub_path.with_name(pub_path.name + ".old")
    if old_key.exists():  # stopped after installing: the current pair is the new one
        old = keys.load_private_key(keys_dir, old_key.name)
        new = keys.check_pair(keys_dir)[0]
    else:
        old = keys.check_pair(keys_dir)[0]
        if next_key.exists():
            new = keys.load_private_key(keys_dir, next_key.name)
        else:
            new = X25519PrivateKey.generate()
            keys.write_private(next_key, new)
        keys.write_public(next_pub, new.public_key(), replace=True)
    resealed = _reseal_all(services, old, new, actor=actor)
    if not old_key.exists():
        os.link(key_path, old_key)
        os.link(pub_path, old_pub)
        os.replace(next_key, key_path)
        os.replace(next_pub, pub_path)
        _fsync_dir(keys_dir)
    # A release queued while this ran may still be sealed to the old key.
    resealed += _reseal_all(services, old, new, actor=actor)
    now = services.clock.now()
    rotation = Rotation(old=keys.fingerprint(old.public_key()),
                        new=keys.fingerprint(new.public_key()), resealed=tuple(resealed))
    with transaction(services.sessions) as session:
        audit.record(session, action="keys_rotated", actor=actor, at=now,
                     details={"old": rotation.old, "new": rotation.new,
                              "resealed": len(rotation.resealed)})
    old_key.unlink()
    old_pub.unlink(missing_ok=True)
    _fsync_dir(keys_dir)
    return rotation


def _reseal_all(services: Services, old: X25519PrivateKey, new: X25519PrivateKey,
                *, actor: str) -> list[str]:
    done = []
    for release in active_releases(services):
        key = dek_key(release.id)
        try:
            sealed = services.vault.get_bytes(key)
        except NotFoundError:
            raise StateError(f"release {release.id} has no data key in the vault; "
                             "nothing was changed for it") from None
        try:
            sealing.open_dek(sealed, new, release.id)
            continue  # already re-sealed (a rotation run again)
        except SealError:
            pass
        try:
            dek = sealing.open_dek(sealed, old, release.id)
        except SealError:
            raise StateError(f"the data key of release {release.id} opens with neither the "
                             "old nor the new key; rotation stopped, both pairs are kept"
                             ) from None
        resealed = sealing.seal_dek(dek, new.public_key(), release.id)
        services.vault.put_bytes(key, resealed)
        if sealing.open_dek(services.vault.get_bytes(key), new, release.id) != dek:
            raise StateError(f"release {release.id}: the re-sealed data key did not read "
                             "back; rotation stopped, both pairs are kept")
        del dek
        with transaction(services.sessions) as session:
            audit.record(session, action="data_key_resealed", actor=actor,
                         at=services.clock.now(), release_id=release.id,
                         details={"to": keys.fingerprint(new.public_key())})
        done.append(release.id)
    return done


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- what a killed queue leaves --------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Sweep:
    releases: tuple[str, ...] = ()
    objects: int = 0
    bytes: int = 0
    partials: int = 0
    partial_bytes: int = 0
    kept: tuple[str, ...] = field(default=())  # young: a queue may still be running


def sweep_orphans(services: Services, *, now: datetime, actor: str,
                  older_than: timedelta = ORPHAN_AGE) -> Sweep:
    """Remove the sealed objects of a release folder that no release row
    names once its newest object was written ``older_than`` or more before
    ``now``, the vault's partial writes older than that, and anything under
    ``pending/`` older than that (a probe's leftover; earlier versions'
    queue markers). Audited (``orphans_removed``) with the count and bytes.

    A queue writes its objects one after the other and then commits the
    row that names them, so while it runs the folder's newest object is at
    most as old as the time since it finished its last one: a folder with
    an object younger than ``older_than`` may be a running queue's, and is
    kept. That is no marker to write and remove per queue, and it keeps a
    long queue's objects for as long as it keeps writing them (a marker
    told only when the queue started).

    Ages are the vault's clock (a folder's modification times; an S3
    store's LastModified) read against ``now``, this node's clock. On a
    local folder both are this machine's clock. An S3 store refuses a
    request signed more than 15 minutes away from its own clock
    (RequestTimeTooSkewed), so the queue's node, the store and this node
    agree to within 15 minutes each, and a margin of an hour keeps every
    object written in the last 45 minutes whichever clock is off (an
    object dated in the future is young). Nothing is removed that a row
    names: the rows are read again, after the ages, before anything goes."""
    from sqlalchemy import select

    vault = services.vault
    folders: dict[str, list[VaultEntry]] = {}
    for entry in vault.entries("releases/"):
        folders.setdefault(entry.key.split("/")[1], []).append(entry)

    def known(ids: set[str]) -> set[str]:
        with read_transaction(services.sessions) as session:
            return set(session.scalars(select(Release.id).where(Release.id.in_(ids))))

    rows = known(set(folders)) if folders else set()
    old: list[str] = []
    kept: list[str] = []
    for release_id in sorted(set(folders) - rows):
        newest = max(entry.modified for entry in folders[release_id])
        (old if now - newest >= older_than else kept).append(release_id)
    # A queue that ran longer than the margin may have committed meanwhile.
    committed = known(set(old)) if old else set()
    removed = [release_id for release_id in old if release_id not in committed]
    objects = size = 0
    for release_id in removed:
        for entry in folders[release_id]:
            vault.delete(entry.key)
            objects, size = objects + 1, size + entry.size
    for entry in vault.entries(PENDING_PREFIX):
        if now - entry.modified >= older_than:
            vault.delete(entry.key)
    partials, partial_bytes = vault.sweep_partials(now - older_than)
    result = Sweep(releases=tuple(removed), objects=objects, bytes=size, partials=partials,
                   partial_bytes=partial_bytes, kept=tuple(kept))
    if removed or partials:
        with transaction(services.sessions) as session:
            audit.record(session, action="orphans_removed", actor=actor, at=now,
                         details={"releases": list(removed), "objects": objects,
                                  "bytes": size, "partial_files": partials,
                                  "partial_bytes": partial_bytes})
        log.warning("removed %d orphaned sealed objects (%d bytes) of %d unfinished queues "
                    "and %d partial files (%d bytes)", objects, size, len(removed),
                    partials, partial_bytes)
    return result
