"""Settings: defaults, a TOML file and ``EMBARGO_*`` environment overrides,
validated once and passed in. Nothing here is read at import time."""

from __future__ import annotations

from config.errors import (
    ConfigError,
    DeliveryError,
    EmbargoError,
    InputError,
    NotFoundError,
    SealError,
    StateError,
    StorageError,
)

__all__ = [
    "ConfigError",
    "DeliveryError",
    "EmbargoError",
    "InputError",
    "NotFoundError",
    "SealError",
    "StateError",
    "StorageError",
]
