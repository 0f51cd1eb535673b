"""Local-folder backends: the embedded default."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from config.errors import NotFoundError, StorageError
from storage.base import (
    ObjectExistsError,
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
    def __init__(self, root: Path, *, base_url: str | None = None,
                 staging: Path | None = None) -> None:
        self.root = root
        self.base_url = base_url
        # Beside the public folder, not in it: same filesystem, so a rename publishes.
        self.staging = StagingArea(staging or root.with_name(root.name + ".staging"))
        self._unsynced: set[Path] = set()
        self._lock = threading.Lock()

    @contextmanager
    def _folder(self, parts: list[str], *, create: bool) -> Iterator[int]:
        """An open descriptor of the folder ``parts`` below the root, walked
        one step at a time without following a symbolic link."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            walked = self.root
            for part in parts:
                walked = walked / part
                if create:
                    try:
                        os.mkdir(part, 0o755, dir_fd=fd)
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
            yield fd
        finally:
            os.close(fd)

    def _place(self, key: str, source: Path) -> None:
        """Link ``source`` in at ``key`` if nothing is there (create-only)."""
        parts = check_key(key).split("/")
        with self._folder(parts[:-1], create=True) as fd:
            try:
                os.link(source, parts[-1], dst_dir_fd=fd)
            except FileExistsError:
                raise ObjectExistsError(key) from None
            except OSError as exc:
                if exc.errno == errno.EXDEV:
                    raise StorageError(f"staging folder {self.staging.root} is not on the "
                                       f"filesystem of the public folder {self.root}: set "
                                       "storage.staging to a folder beside it") from None
                raise StorageError(f"cannot publish {key} in {self.root}: "
                                   f"{exc.strerror}") from None
        with self._lock:
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
        return _safe_path(self.root, key).resolve().as_uri()

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
