"""The storage contracts. Backends (``storage/local.py``, ``storage/s3.py``)
implement these and stay terse; the promises are written here, once."""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from config.errors import EmbargoError, StorageError

CHUNK = 1 << 20
PROBE_PREFIX = ".embargo-probe-"


class ObjectExistsError(Exception):
    """A create-only write found an object already at that key. Not an
    EmbargoError: the caller decides (same bytes: fine; other bytes: fail)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"an object already exists at {key}")
        self.key = key


@dataclass(frozen=True, kw_only=True)
class StoredObject:
    key: str
    size: int
    sha256: str


@dataclass(frozen=True, kw_only=True)
class VaultEntry:
    """One object in a vault listing: ``modified`` is when it was last
    written, by the store's clock (aware UTC)."""

    key: str
    size: int
    modified: datetime


def check_key(key: str) -> str:
    """A storage key is ``/``-separated, relative, with no empty, ``.`` or
    ``..`` part; every backend refuses anything else (ValueError)."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"bad storage key {key!r}")
    return key


def hash_stream(src: BinaryIO) -> StoredObject:
    digest = hashlib.sha256()
    size = 0
    while chunk := src.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return StoredObject(key="", size=size, sha256=digest.hexdigest())


class Vault(ABC):
    """Private store of sealed objects (``EMB1`` documents and sealed data
    keys). Never given plaintext."""

    @abstractmethod
    def writer(self, key: str) -> AbstractContextManager[BinaryIO]:
        """A binary stream to write the object at ``key``. The object appears
        only when the block exits normally and then replaces any old one; if
        the block raises, nothing is left behind."""

    @abstractmethod
    def reader(self, key: str) -> AbstractContextManager[BinaryIO]:
        """A binary stream reading the object at ``key``.
        Raises NotFoundError when there is none."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object at ``key``; no error if it is already gone."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored at ``key``."""

    @abstractmethod
    def keys(self, prefix: str = "") -> Iterator[str]:
        """Every stored key that starts with ``prefix``."""

    @abstractmethod
    def entries(self, prefix: str = "") -> Iterator[VaultEntry]:
        """Every stored object whose key starts with ``prefix``, with its
        size and when it was last written (as one listing gives them: a
        folder's stat, an S3 listing's LastModified; the store's clock, not
        the caller's)."""

    @abstractmethod
    def check(self) -> None:
        """Verify that the location exists and is readable and writable,
        without writing a real object. Raises StorageError saying what is
        wrong."""

    def size(self, key: str) -> int:
        """Bytes stored at ``key``. Raises NotFoundError when there is none."""
        total = 0
        with self.reader(key) as src:
            while chunk := src.read(CHUNK):
                total += len(chunk)
        return total

    def sweep_partials(self, older_than: datetime) -> tuple[int, int]:
        """Remove partial writes (left by a killed writer) last touched before
        ``older_than``; return how many and their bytes. Stores whose writes
        leave nothing behind need not override it."""
        return 0, 0

    def put_bytes(self, key: str, data: bytes) -> None:
        with self.writer(key) as out:
            out.write(data)

    def get_bytes(self, key: str) -> bytes:
        with self.reader(key) as src:
            return src.read()

    def batch(self) -> VaultBatch:
        """Writes whose durability is settled once for all of them, by the
        batch's ``sync()``, instead of once per object: what a queue writes
        before it commits the release that names the objects.

        Each object written through the batch appears as :meth:`writer`
        says (whole, when its block exits), at once, for every reader; it is
        durable (survives a crash of the machine) once ``sync()`` returns.
        Stores whose writes are durable when they return keep this default,
        which writes through :meth:`writer`."""
        return VaultBatch(self)


class VaultBatch:
    """A batch of writes to one vault (see :meth:`Vault.batch`)."""

    def __init__(self, vault: Vault) -> None:
        self.vault = vault

    def writer(self, key: str) -> AbstractContextManager[BinaryIO]:
        return self.vault.writer(key)

    def put_bytes(self, key: str, data: bytes) -> None:
        with self.writer(key) as out:
            out.write(data)

    def sync(self) -> None:
        """Make every object written through the batch durable."""
        return None


class PublicTarget(ABC):
    """Where published documents go: readable by anyone once written. The
    publisher writes here only after the embargo instant.

    ``staging`` is the publishing node's private folder for decrypted
    documents before the instant (outside the public tree; for a folder
    target on the same filesystem, so that publishing is a rename)."""

    staging: StagingArea
    # Whether publishing several documents at once from threads is faster than
    # one after another (a store on the network: yes; a folder, whose
    # publication is one link each: no, threads only add their overhead).
    parallel_writes: bool = True

    @abstractmethod
    def writer(self, key: str, *, content_type: str) -> AbstractContextManager[BinaryIO]:
        """A binary stream that creates the object at ``key``. The object
        becomes visible whole, only when the block exits normally, and only if
        no object is there yet: otherwise ObjectExistsError is raised at exit
        and the existing object is left untouched. If the block raises,
        nothing becomes visible."""

    @abstractmethod
    def reader(self, key: str) -> AbstractContextManager[BinaryIO]:
        """A binary stream reading the published object.
        Raises NotFoundError when there is none."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is published at ``key``."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove a published object; no error if it is already gone."""

    @abstractmethod
    def url(self, key: str) -> str:
        """The address at which the public reads ``key``."""

    @abstractmethod
    def check(self) -> None:
        """Verify access to the location without publishing anything.
        Raises StorageError saying what is wrong."""

    def publish_file(self, key: str, source: Path, *, content_type: str, size: int,
                     sha256: str) -> StoredObject:
        """Make the verified file ``source`` (in this target's ``staging``;
        ``size`` bytes whose SHA-256 is ``sha256``) public at ``key``,
        create-only as :meth:`writer`: ObjectExistsError if an object is
        there already, which is left untouched.

        Returns the store's own account of the object it created, which the
        publisher compares with the document: a folder moves the file into
        place (a link of the verified inode: the bytes verified are the bytes
        published) and vouches for it; a store that checks a checksum sent
        with the body returns the checksum it confirmed; this default copies
        the file and reads the object back."""
        with source.open("rb") as src, self.writer(key, content_type=content_type) as out:
            while chunk := src.read(CHUNK):
                out.write(chunk)
        return self.stat(key)

    def prepare_file(self, key: str, source: Path, *, content_type: str, size: int,
                     sha256: str) -> None:
        """Before the instant: do for the staged ``source`` whatever
        :meth:`publish_file` would otherwise do first, short of making
        anything public (a folder gives the file its public mode, still
        private inside the 0700 staging folder). This default does nothing."""
        return None

    def batch(self) -> AbstractContextManager[PublicBatch]:
        """Documents published together (at one instant): a batch's
        :meth:`PublicBatch.publish_file` may keep what it opened (a folder's
        open directories) for the next document, and its ``flush`` makes
        all of them durable at once. Use one batch from one publication; it
        is closed when the block exits. This default delegates to the
        target itself."""
        return nullcontext(PublicBatch(self))

    def sweep_staging(self) -> int:
        """Remove what killed publishers left in ``staging`` (at node start);
        returns how many leftovers were removed."""
        return self.staging.sweep()

    def flush(self) -> None:
        """Make every object written so far durable (a folder fsyncs its
        directories once, not once per object). Stores whose writes are
        durable when they return need not override it."""
        return None

    def probe(self) -> str:
        """Prove that the location takes a write the way the publisher makes
        one, without publishing anything: a small probe object (key
        ``.embargo-probe-<random>``) is created with the same conditional
        create as a document (``writer``), read back and compared, then
        deleted. Returns the probe's key. Raises StorageError naming the step
        that failed (create, read back, compare, delete); the probe object is
        deleted whatever failed after it was created."""
        key = PROBE_PREFIX + secrets.token_hex(8)
        data = f"embargo probe {key}\n".encode()
        try:
            with self.writer(key, content_type="text/plain") as out:
                out.write(data)
        except StorageError as exc:
            raise StorageError(f"the probe write was refused: {exc}") from exc
        except (ObjectExistsError, OSError) as exc:
            words = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise StorageError(f"the probe write was refused: {words}") from exc
        try:
            try:
                with self.reader(key) as src:
                    back = src.read()
            except (EmbargoError, OSError) as exc:
                raise StorageError(f"the probe object could not be read back: {exc}") from exc
            if back != data:
                raise StorageError(f"the probe object read back differs ({len(back)} bytes, "
                                   f"{len(data)} written)")
        finally:
            try:
                self.delete(key)
            except (StorageError, OSError) as exc:
                raise StorageError(f"the probe object {key} could not be deleted: {exc}") from exc
        return key

    def stat(self, key: str) -> StoredObject:
        """Size and SHA-256 of the stored object, read back from the store."""
        with self.reader(key) as src:
            found = hash_stream(src)
        return StoredObject(key=key, size=found.size, sha256=found.sha256)


class PublicBatch:
    """One publication's writes to a public target (see :meth:`PublicTarget.batch`).
    Safe to use from several threads of that publication."""

    def __init__(self, target: PublicTarget) -> None:
        self.target = target

    def publish_file(self, key: str, source: Path, *, content_type: str, size: int,
                     sha256: str) -> StoredObject:
        """As :meth:`PublicTarget.publish_file`."""
        return self.target.publish_file(key, source, content_type=content_type, size=size,
                                        sha256=sha256)

    def flush(self) -> None:
        """Make every object of this batch durable (as :meth:`PublicTarget.flush`)."""
        self.target.flush()


class StagingArea:
    """The publishing node's private folder (mode 0700) for documents
    decrypted before the instant, outside the public tree. Each publication
    stages into a folder of its own, locked while in use, and removed when
    the publication ends however it ends; :meth:`sweep` removes what a
    killed publisher left (folders nobody holds the lock of)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @contextmanager
    def folder(self, name: str) -> Iterator[Path]:
        """A fresh private folder for one publication, removed at exit."""
        self._make_root()
        path = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=self.root))
        lock = os.open(path / ".lock", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
            os.close(lock)

    def sweep(self) -> int:
        """Remove every staged folder that no running publication holds;
        returns how many were removed."""
        if not self.root.is_dir():
            return 0
        removed = 0
        for entry in self.root.iterdir():
            if entry.is_symlink() or not entry.is_dir():
                entry.unlink(missing_ok=True)
                removed += 1
                continue
            try:
                lock = os.open(entry / ".lock", os.O_RDONLY)
            except FileNotFoundError:
                lock = None
            try:
                if lock is not None:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # in use by a live publication
            finally:
                if lock is not None:
                    os.close(lock)
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
        return removed

    def _make_root(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.root.is_symlink():
            raise StorageError(f"staging folder {self.root} is a symbolic link; refusing it")
        os.chmod(self.root, 0o700)


def write_private(path: Path) -> BinaryIO:
    """A new file of mode 0600 (never an existing one, never through a link)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    return os.fdopen(fd, "wb")
