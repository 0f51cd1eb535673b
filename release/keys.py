"""The publisher's X25519 key pair. Queueing needs only the public key; only
the publishing side holds the private key (PEM, file mode 0600)."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from config.errors import ConfigError, InputError, NotFoundError

PRIVATE_NAME = "publisher.key"
PUBLIC_NAME = "publisher.pub"


def init_keys(keys_dir: Path) -> tuple[Path, Path]:
    """Create the key pair in ``keys_dir``. Refuses to overwrite an existing
    private key (InputError): losing it makes every queued release unreadable."""
    private_path, public_path = keys_dir / PRIVATE_NAME, keys_dir / PUBLIC_NAME
    if private_path.exists():
        raise InputError(f"a publisher key already exists at {private_path}; "
                         "refusing to overwrite it (queued releases need it)")
    keys_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(keys_dir, 0o700)
    key = X25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())
    public_path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"no publisher key at {path}: run `embargo keys init` first") from None
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


def load_private_key(keys_dir: Path) -> X25519PrivateKey:
    path = keys_dir / PRIVATE_NAME
    data = _read(path)
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
