"""Wiring: build the engine, storage and clock once from the settings."""

from __future__ import annotations

import os
import socket
from typing import Any

from config.settings import Settings
from release.clock import Clock
from release.context import Services
from storage.db import make_engine
from storage.factory import make_public, make_s3_client, make_vault, needs_s3


def build_services(settings: Settings, *, clock: Clock | None = None,
                   s3_client: Any = None, create_schema: bool = True) -> Services:
    if s3_client is None and needs_s3(settings):
        s3_client = make_s3_client(settings)
    services = Services(
        engine=make_engine(settings.database_url),
        vault=make_vault(settings.vault, s3_client=s3_client),
        public=make_public(settings.public, settings, s3_client=s3_client),
        keys_dir=settings.keys_dir,
        clock=clock or Clock(),
        zone=settings["zone"],
        default_at=settings["default_at"],
        copies_max_lead=settings["copies.max_lead"],
    )
    if create_schema:
        services.create_schema()
    return services


def node_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
