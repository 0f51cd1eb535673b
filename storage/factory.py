"""Build the configured storage backends once, at start."""

from __future__ import annotations

from typing import Any

from config.errors import ConfigError
from config.settings import Location, Settings
from storage.base import PublicTarget, Vault
from storage.local import LocalPublicTarget, LocalVault


def needs_s3(settings: Settings) -> bool:
    return "s3" in (settings.vault.kind, settings.public.kind)


def make_s3_client(settings: Settings) -> Any:
    from storage.s3 import make_client

    return make_client(settings)


def make_vault(location: Location, *, s3_client: Any = None) -> Vault:
    if location.kind == "s3":
        from storage.s3 import S3Vault

        if s3_client is None:
            raise ConfigError("an S3 vault needs an S3 client")
        vault: Vault = S3Vault(s3_client, bucket=location.bucket, prefix=location.prefix)
        return vault
    assert location.path is not None
    return LocalVault(location.path)


def make_public(location: Location, settings: Settings, *, s3_client: Any = None) -> PublicTarget:
    base_url = settings.storage.public_base_url
    if location.kind == "s3":
        from storage.s3 import S3PublicTarget, Verify

        if s3_client is None:
            raise ConfigError("an S3 public target needs an S3 client")
        target: PublicTarget = S3PublicTarget(
            s3_client, bucket=location.bucket, prefix=location.prefix, base_url=base_url,
            acl=settings.s3.acl, cache_control=settings.s3.cache_control,
            staging=settings.staging_dir, verify=Verify(settings.s3.verify))
        return target
    assert location.path is not None
    return LocalPublicTarget(location.path, base_url=base_url, staging=settings.staging_dir)
