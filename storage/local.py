"""Local-folder backends: the embedded default."""

from __future__ import annotations

import errno
import functools
import os
import secrets
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime, timedelta
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
    VaultEntry,
    check_key,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


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
    if len(changed) > 1:  # (an existing folder: no mkdir that fails, and a second stat)
        folder.mkdir(parents=True, exist_ok=True)
    return changed


@functools.cache
def _anonymous_files() -> bool:
    """Whether this system makes unnamed files (O_TMPFILE) that can be
    linked in by name (through /proc/self/fd)."""
    return hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")


def _open_anonymous(folder: int) -> int | None:
    """An unnamed file in ``folder`` (O_TMPFILE), or None where the
    filesystem makes none."""
    if not _anonymous_files():
        return None
    try:
        return os.open(".", os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600, dir_fd=folder)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return None
        raise


@contextmanager
def _staged(root: Path, target: Path, *, unsynced: set[Path] | None = None) -> Iterator[BinaryIO]:
    """Write a file that appears at ``target`` whole, when the block exits
    (replacing any old one), fsynced before it appears; then the folders
    whose entries changed are fsynced, or with ``unsynced`` added to it
    for the caller to fsync once (see ``_LocalVaultBatch.sync``).

    The file is written unnamed in the target's folder (O_TMPFILE) and
    linked in at the end: a writer that dies leaves nothing, and it costs
    one new inode, not a name made in ``.staging`` and moved (measured:
    that name is most of a small object's cost on ext4). Where unnamed
    files are not made, or an object is already there, through
    ``.staging``: a temporary file moved into place."""
    changed = _make_folder(target.parent)
    folder = os.open(target.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = _open_anonymous(folder)
        if fd is None:
            with _through_staging(root, target) as handle:
                yield handle
        else:
            with os.fdopen(fd, "wb") as handle:
                yield handle
                handle.flush()
                os.fchmod(fd, 0o644)
                os.fsync(fd)
                try:
                    _link_fd(fd, folder, target.name)
                except FileExistsError:
                    _replace_with(root, fd, target)
    finally:
        os.close(folder)
    if unsynced is not None:
        unsynced.update(changed)
    else:
        for path in changed:
            _fsync_dir(path)


def _staging(root: Path) -> Path:
    staging = root / ".staging"
    staging.mkdir(mode=0o700, parents=True, exist_ok=True)
    return staging


def _link_fd(fd: int, folder: int, name: str) -> None:
    """Give the unnamed file ``fd`` the name ``name`` in ``folder`` (linkat
    of /proc/self/fd/N with AT_SYMLINK_FOLLOW: needs no privilege)."""
    os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=folder, follow_symlinks=True)


def _replace_with(root: Path, fd: int, target: Path) -> None:
    """Put the unnamed file ``fd`` in place of the object at ``target``: a
    name in ``.staging`` first, then moved over it (a link cannot replace)."""
    staging = _staging(root)
    name = f".part-{secrets.token_hex(8)}"
    folder = os.open(staging, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _link_fd(fd, folder, name)
    finally:
        os.close(folder)
    try:
        os.replace(staging / name, target)
    finally:
        (staging / name).unlink(missing_ok=True)


@contextmanager
def _written_then(folder: Path, prefix: str, place: Callable[[Path], None]
                  ) -> Iterator[BinaryIO]:
    """A new file in ``folder`` for the caller to write; then fsynced, given
    mode 0644 and handed to ``place`` (which moves or links it where it
    belongs). Removed at exit whatever happened."""
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=prefix)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        place(tmp)
    finally:
        tmp.unlink(missing_ok=True)


def _through_staging(root: Path, target: Path) -> AbstractContextManager[BinaryIO]:
    return _written_then(_staging(root), ".part-", lambda tmp: os.replace(tmp, target))


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
        # Empty folders go, but not the top ones (``releases/``, ``pending/``).
        _prune(path.parent, self.root / path.relative_to(self.root).parts[0])

    def exists(self, key: str) -> bool:
        return _safe_path(self.root, key).is_file()

    def keys(self, prefix: str = "") -> Iterator[str]:
        for key, _info in self._walk(prefix):
            yield key

    def entries(self, prefix: str = "") -> Iterator[VaultEntry]:
        for key, info in self._walk(prefix):
            yield VaultEntry(key=key, size=info.st_size, modified=_EPOCH + timedelta(
                microseconds=info.st_mtime_ns // 1000))

    def _walk(self, prefix: str) -> Iterator[tuple[str, os.stat_result]]:
        """(key, stat) of every file under the root but ``.staging``, in key order."""
        found: list[tuple[str, os.stat_result]] = []
        pending = [(self.root, "")]
        while pending:
            folder, rel = pending.pop()
            try:
                listing = list(os.scandir(folder))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in listing:
                key = rel + entry.name
                if not rel and entry.name == ".staging":
                    continue
                if not (key.startswith(prefix) or prefix.startswith(key + "/")):
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append((Path(entry.path), key + "/"))
                    elif entry.is_file() and key.startswith(prefix):
                        found.append((key, entry.stat()))
                except FileNotFoundError:  # removed while listed
                    continue
        found.sort(key=lambda item: item[0])
        yield from found

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
        return _staged(self.root, _safe_path(self.root, key), unsynced=self._unsynced)

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

    def writer(self, key: str, *, content_type: str) -> AbstractContextManager[BinaryIO]:
        self.staging._make_root()
        return _written_then(self.staging.root, "manifest.", lambda tmp: self._place(key, tmp))

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
