"""Settings: defaults, a TOML file and ``EMBARGO_*`` environment overrides,
validated once and passed in. Nothing here is read at import time."""

from __future__ import annotations

from config.errors import (
    AmbiguousIdError,
    ConfigError,
    DeliveryError,
    EmbargoError,
    InputError,
    NotFoundError,
    ReleaseNotFoundError,
    SchemaError,
    SealError,
    StateError,
    StorageError,
)

__all__ = [
    "AmbiguousIdError",
    "ConfigError",
    "DeliveryError",
    "EmbargoError",
    "InputError",
    "NotFoundError",
    "ReleaseNotFoundError",
    "SchemaError",
    "SealError",
    "StateError",
    "StorageError",
]
