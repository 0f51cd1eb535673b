"""Local-folder backends: the embedded default."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote

from config.errors import NotFoundError, StorageError
from storage.base import (
    ObjectExistsError,
    PublicBatch,
    PublicTarget,
    StagingArea,
    StoredObject,
    Vault,
    VaultBatch,
    check_key,
)


def _safe_path(root: Path, key: str) -> Path:
    return root.joinpath(*check_key(key).split("/"))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return the folders whose
    entries a new object in ``folder`` changes: ``folder`` itself, and the
    parent of each folder made here (a new folder is durable only once the
    folder holding it is fsynced)."""
    changed = [folder]
    walked = folder
    while not walked.is_dir() and walked.parent != walked:
        changed.append(walked.parent)
        walked = walked.parent
    folder.mkdir(parents=True, exist_ok=True)
    return changed


@contextmanager
def _staged(root: Path, target: Path, *, durable: bool = True,
            unsynced: set[Path] | None = None) -> Iterator[BinaryIO]:
    """Write into a temporary file beside the root, then move it to
    ``target`` atomically (replacing any old one). ``durable``: the file is
    fsynced before the move and the folders whose entries changed after it;
    with ``unsynced`` those folders are added to it instead, for the caller
    to fsync once (see ``_LocalVaultBatch.sync``)."""
    changed = _make_folder(target.parent)
    staging = root / ".staging"
    staging.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=staging, prefix=".part-")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
        if durable and unsynced is not None:
            unsynced.update(changed)
        elif durable:
            for folder in changed:
                _fsync_dir(folder)
    finally:
        tmp.unlink(missing_ok=True)


def _prune(folder: Path, root: Path) -> None:
    """Remove ``folder`` and its parents up to ``root`` while they are empty."""
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()
        except OSError:  # not empty (or already gone): stop
            return
        folder = folder.parent


@contextmanager
def _open(path: Path, key: str) -> Iterator[BinaryIO]:
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise NotFoundError(f"no stored object {key}") from None
    with handle:
        yield handle


def _check_folder(root: Path, what: str) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"{what} folder {root} cannot be created: {exc.strerror}") from None
    if not os.access(root, os.R_OK | os.W_OK | os.X_OK):
        raise StorageError(f"{what} folder {root} is not readable and writable")


class LocalVault(Vault):
    def __init__(self, root: Path) -> None:
        self.root = root

    def writer(self, key: str) -> AbstractContextManager[BinaryIO]:
        return _staged(self.root, _safe_path(self.root, key))

    def batch(self) -> VaultBatch:
        return _LocalVaultBatch(self)

    def reader(self, key: str) -> AbstractContextManager[BinaryIO]:
        return _open(_safe_path(self.root, key), key)

    def delete(self, key: str) -> None:
        path = _safe_path(self.root, key)
        path.unlink(missing_ok=True)
        # Empty folders go, but not the top ones (``releases/``, ``pending/``):
        # each queue would make ``pending/`` again and remove it again.
        _prune(path.parent, self.root / path.relative_to(self.root).parts[0])

    def exists(self, key: str) -> bool:
        return _safe_path(self.root, key).is_file()

    def keys(self, prefix: str = "") -> Iterator[str]:
        if not self.root.is_dir():
            return
        for path in sorted(self.root.rglob("*")):
            rel = path.relative_to(self.root).as_posix()
            if path.is_file() and not rel.startswith(".staging") and rel.startswith(prefix):
                yield rel

    def check(self) -> None:
        _check_folder(self.root, "vault")

    def size(self, key: str) -> int:
        try:
            return _safe_path(self.root, key).stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"no stored object {key}") from None

    def sweep_partials(self, older_than: datetime) -> tuple[int, int]:
        count = size = 0
        staging = self.root / ".staging"
        if not staging.is_dir():
            return 0, 0
        for path in staging.glob(".part-*"):
            try:
                info = path.stat()
                if info.st_mtime >= older_than.timestamp():
                    continue
                path.unlink()
            except FileNotFoundError:
                continue
            count, size = count + 1, size + info.st_size
        return count, size


class _LocalVaultBatch(VaultBatch):
    """Each object's file is fsynced as it is written; the folders whose
    entries changed, once each, in ``sync``."""

    def __init__(self, vault: LocalVault) -> None:
        super().__init__(vault)
        self.root = vault.root
        self._unsynced: set[Path] = set()

    def writer(self, key: str) -> AbstractContextManager[BinaryIO]:
        return self._writer(key, durable=True)

    def _writer(self, key: str, *, durable: bool) -> AbstractContextManager[BinaryIO]:
        return _staged(self.root, _safe_path(self.root, key), durable=durable,
                       unsynced=self._unsynced)

    def sync(self) -> None:
        folders, self._unsynced = self._unsynced, set()
        for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
            _fsync_dir(folder)


class LocalPublicTarget(PublicTarget):
    parallel_writes = False  # a link each: threads would only add their overhead

    def __init__(self, root: Path, *, base_url: str | None = None,
                 staging: Path | None = None) -> None:
        self.root = root
        self.base_url = base_url
        self._root_uri: str | None = None
        # Beside the public folder, not in it: same filesystem, so a rename publishes.
        self.staging = StagingArea(staging or root.with_name(root.name + ".staging"))
        self._unsynced: set[Path] = set()
        self._lock = threading.Lock()

    def _open_folder(self, parts: list[str], *, create: bool,
                     created: set[tuple[str, ...]] | None = None) -> int:
        """An open descriptor (the caller closes it) of the folder ``parts``
        below the root, walked one step at a time without following a
        symbolic link. The parents of folders it had to create go in
        ``created`` (their entries changed: fsync them too)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            walked = self.root
            for depth, part in enumerate(parts):
                walked = walked / part
                if create:
                    try:
                        os.mkdir(part, 0o755, dir_fd=fd)
                        if created is not None:
                            created.add(tuple(parts[:depth]))
                    except FileExistsError:
                        pass
                try:
                    inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                                    dir_fd=fd)
                except OSError:
                    if os.path.islink(walked):
                        raise StorageError(f"{walked} is a symbolic link: refusing to publish "
                                           "through it (remove it)") from None
                    raise
                os.close(fd)
                fd = inner
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextmanager
    def _folder(self, parts: list[str], *, create: bool) -> Iterator[int]:
        fd = self._open_folder(parts, create=create)
        try:
            yield fd
        finally:
            os.close(fd)

    @contextmanager
    def _folder_created(self, parts: list[str], created: set[tuple[str, ...]]
                        ) -> Iterator[int]:
        fd = self._open_folder(parts, create=True, created=created)
        try:
            yield fd
        finally:
            os.close(fd)

    def _link(self, key: str, source: Path, name: str, fd: int) -> None:
        try:
            os.link(source, name, dst_dir_fd=fd)
        except FileExistsError:
            raise ObjectExistsError(key) from None
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                raise StorageError(f"staging folder {self.staging.root} is not on the "
                                   f"filesystem of the public folder {self.root}: set "
                                   "storage.staging to a folder beside it") from None
            raise StorageError(f"cannot publish {key} in {self.root}: "
                               f"{exc.strerror}") from None

    def _place(self, key: str, source: Path) -> None:
        """Link ``source`` in at ``key`` if nothing is there (create-only)."""
        parts = check_key(key).split("/")
        created: set[tuple[str, ...]] = set()
        with self._folder_created(parts[:-1], created) as fd:
            self._link(key, source, parts[-1], fd)
        with self._lock:
            self._unsynced.update(self.root.joinpath(*p) for p in created)
            self._unsynced.add(self.root.joinpath(*parts[:-1]))

    @contextmanager
    def _create(self, key: str) -> Iterator[BinaryIO]:
        self.staging._make_root()
        fd, name = tempfile.mkstemp(dir=self.staging.root, prefix="manifest.")
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o644)
            self._place(key, tmp)
        finally:
            tmp.unlink(missing_ok=True)

    def writer(self, key: str, *, content_type: str) -> AbstractContextManager[BinaryIO]:
        return self._create(key)

    def prepare_file(self, key: str, source: Path, *, content_type: str, size: int,
                     sha256: str) -> None:
        os.chmod(source, 0o644)  # still private: its folder is 0700

    def batch(self) -> AbstractContextManager[PublicBatch]:
        return _LocalBatch(self)

    def publish_file(self, key: str, source: Path, *, content_type: str, size: int,
                     sha256: str) -> StoredObject:
        os.chmod(source, 0o644)  # still private: its folder is 0700
        found = os.stat(source).st_size
        self._place(key, source)
        source.unlink()
        # The inode linked in is the file staged and verified: its bytes hashed to sha256.
        return StoredObject(key=key, size=found, sha256=sha256)

    def flush(self) -> None:
        with self._lock:
            folders, self._unsynced = self._unsynced, set()
        for folder in folders:
            if folder.is_dir():
                _fsync_dir(folder)

    def sweep_staging(self) -> int:
        legacy = self.root / ".staging"  # where earlier versions staged, inside the served tree
        removed = 0
        if legacy.is_dir() and not legacy.is_symlink():
            shutil.rmtree(legacy, ignore_errors=True)
            removed += 1
        return removed + super().sweep_staging()

    def reader(self, key: str) -> AbstractContextManager[BinaryIO]:
        return _open(_safe_path(self.root, key), key)

    def exists(self, key: str) -> bool:
        return _safe_path(self.root, key).is_file()

    def delete(self, key: str) -> None:
        parts = check_key(key).split("/")
        try:
            with self._folder(parts[:-1], create=False) as fd:
                os.unlink(parts[-1], dir_fd=fd)
        except FileNotFoundError:
            pass

    def url(self, key: str) -> str:
        if self.base_url:
            return f"{self.base_url}/{key}"
        if self._root_uri is None:  # resolved once: nothing below the root is a link
            self._root_uri = self.root.resolve().as_uri()
        return f"{self._root_uri}/{quote(check_key(key))}"

    def check(self) -> None:
        _check_folder(self.root, "public")

    def probe(self) -> str:
        staging = self.root / ".staging"
        fresh = not staging.exists()
        try:
            return super().probe()
        finally:
            if fresh:  # leave the public folder as it was found
                _prune(staging, self.root)


class _LocalBatch(PublicBatch):
    """A folder's batch: each public folder is walked and opened once, every
    document is one link into it, and ``flush`` fsyncs each folder once."""

    target: LocalPublicTarget

    def __init__(self, target: LocalPublicTarget) -> None:
        super().__init__(target)
        self._folders: dict[tuple[str, ...], int] = {}
        self._created: set[tuple[str, ...]] = set()
        self._lock = threading.Lock()

    def __enter__(self) -> _LocalBatch:
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            fds, self._folders = list(self._folders.values()), {}
        for fd in fds:
            os.close(fd)

    def _fd(self, parts: list[str]) -> int:
        with self._lock:
            fd = self._folders.get(tuple(parts))
            if fd is None:
                fd = self.target._open_folder(parts, create=True, created=self._created)
                self._folders[tuple(parts)] = fd
            return fd

    def publish_file(self, key: str, source: Path, *, content_type: str, size: int,
                     sha256: str) -> StoredObject:
        info = os.stat(source)
        if stat.S_IMODE(info.st_mode) != 0o644:  # not prepared before the instant
            os.chmod(source, 0o644)
        parts = check_key(key).split("/")
        self.target._link(key, source, parts[-1], self._fd(parts[:-1]))
        # At once, not with the staging folder later: the unlink sets the public file's
        # st_ctime, which then says when it became public (a witness of never early).
        source.unlink()
        # The inode linked in is the file staged and verified: its bytes hashed to sha256.
        return StoredObject(key=key, size=info.st_size, sha256=sha256)

    def flush(self) -> None:
        with self._lock:
            fds = list(self._folders.values())
            created, self._created = self._created, set()
        for fd in fds:
            os.fsync(fd)
        for parts in created - set(self._folders):  # a parent whose new folder is an entry
            with self.target._folder(list(parts), create=False) as fd:
                os.fsync(fd)
