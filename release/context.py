"""What the domain needs at run time, built once at start and passed in,
and the names of things in the vault."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property
from pathlib import Path
from zoneinfo import ZoneInfo

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from release import timerules
from release.clock import Clock
from release.records import Release
from storage.base import PublicTarget, Vault
from storage.db import session_factory


def dek_key(release_id: str) -> str:
    return f"releases/{release_id}/dek.hpke"


def document_key(release_id: str, document_id: str) -> str:
    return f"releases/{release_id}/{document_id}.emb"


def embargo_of(release: Release) -> timerules.Embargo:
    return timerules.Embargo(instant=release.instant, zone=release.zone, wall=release.wall)


def describe_instant(instant: datetime, zone: str) -> str:
    """Any instant shown both ways, like an embargo."""
    whole = instant.replace(microsecond=0)
    return timerules.Embargo(instant=whole, zone=zone,
                             wall=timerules.wall_of(whole.astimezone(ZoneInfo(zone)))).describe()


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
