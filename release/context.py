"""What the domain needs at run time, built once at start and passed in.
The vault's names are :mod:`release.vault_keys`; instants shown both ways,
:mod:`release.instants`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from release.clock import Clock
from storage.base import PublicTarget, Vault
from storage.db import session_factory


@dataclass(frozen=True, kw_only=True)
class Services:
    """What the domain needs, built once at start and passed in."""

    engine: Engine
    vault: Vault
    public: PublicTarget
    keys_dir: Path
    clock: Clock
    zone: str = "Europe/London"
    default_at: str = "00:01"
    copies_max_lead: timedelta | None = None
    copies_cutoff: timedelta = timedelta(seconds=60)
    copies_unstampable: str = "refuse"  # or "send-unmarked"
    alerts_to: tuple[str, ...] = ()
    alerts_repeat: timedelta = timedelta(minutes=15)

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        """One session factory per Services (not one per use)."""
        return session_factory(self.engine)
