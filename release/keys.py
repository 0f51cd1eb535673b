"""The publisher's X25519 key pair. Queueing needs only the public key; only
the publishing side holds the private key (PEM, file mode 0600)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from config.errors import ConfigError, InputError, NotFoundError

PRIVATE_NAME = "publisher.key"
PUBLIC_NAME = "publisher.pub"


RESTORE = ("restore it from its backup: queued releases were sealed to its public key, "
           "and a new key cannot open them (do not run `embargo keys init`)")


def init_keys(keys_dir: Path, *, force: bool = False, dependents: int = 0) -> tuple[Path, Path]:
    """Create the key pair in ``keys_dir``.

    Refuses (InputError) when either key file exists: a private key is never
    overwritten, and a public key alone means the private key is missing, not
    that a new pair is wanted. With ``force``, a public key whose private key
    is gone is replaced, but only when no release depends on it
    (``dependents``, the caller's count of releases sealed to it, is 0)."""
    private_path, public_path = keys_dir / PRIVATE_NAME, keys_dir / PUBLIC_NAME
    if private_path.exists():
        raise InputError(f"a publisher key already exists at {private_path}; "
                         "refusing to overwrite it (queued releases need it)")
    if public_path.exists():
        if dependents:
            raise InputError(f"{public_path} exists without its private key, and "
                             f"{dependents} release{'s were' if dependents > 1 else ' was'} "
                             f"sealed to it: {PRIVATE_NAME} is missing; {RESTORE}")
        if not force:
            raise InputError(f"{public_path} exists without its private key: {PRIVATE_NAME} "
                             "is missing; restore it from its backup, or, if no release "
                             "was ever sealed to it, run `embargo keys init --force`")
    keys_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(keys_dir, 0o700)
    key = X25519PrivateKey.generate()
    write_private(private_path, key)
    write_public(public_path, key.public_key(), replace=force)
    return private_path, public_path


def write_private(path: Path, key: X25519PrivateKey) -> None:
    """Write ``key`` as PEM to a new file of mode 0600 (never over one)."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())


def write_public(path: Path, key: X25519PublicKey, *, replace: bool = False) -> None:
    """Write ``key`` as PEM; over an existing file only with ``replace``."""
    data = public_pem(key)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if replace else os.O_EXCL)
    fd = os.open(path, flags, 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def public_pem(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def fingerprint(key: X25519PublicKey) -> str:
    """A short name for a public key: the first 16 hex digits of the SHA-256
    of its raw bytes."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def check_pair(keys_dir: Path) -> tuple[X25519PrivateKey, X25519PublicKey]:
    """Load both keys and prove they belong together. Raises NotFoundError
    or ConfigError saying which file is missing or wrong."""
    private = load_private_key(keys_dir)
    public = load_public_key(keys_dir)
    if public_pem(private.public_key()) != public_pem(public):
        raise ConfigError(f"{keys_dir / PUBLIC_NAME} is not the public key of "
                          f"{keys_dir / PRIVATE_NAME} (fingerprints "
                          f"{fingerprint(public)} and {fingerprint(private.public_key())})")
    return private, public


def _read(path: Path, missing: str = "run `embargo keys init` first") -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"no publisher key at {path}: {missing}") from None
    except OSError as exc:
        raise ConfigError(f"publisher key {path} cannot be read: {exc.strerror}") from None


def load_public_key(keys_dir: Path) -> X25519PublicKey:
    path = keys_dir / PUBLIC_NAME
    try:
        key = serialization.load_pem_public_key(_read(path))
    except ValueError:
        raise ConfigError(f"{path} is not a PEM public key") from None
    if not isinstance(key, X25519PublicKey):
        raise ConfigError(f"{path} is not an X25519 public key")
    return key


def load_private_key(keys_dir: Path, name: str = PRIVATE_NAME) -> X25519PrivateKey:
    """The private key. A missing one is never to be replaced by a new one
    (NotFoundError says to restore it from its backup)."""
    path = keys_dir / name
    data = _read(path, RESTORE)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(f"publisher key {path} is readable by others (mode {mode:o}); "
                          f"run: chmod 600 {path}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, X25519PrivateKey):
        raise ConfigError(f"{path} is not an X25519 private key")
    return key
