"""The vault's part of "nothing left lying around", on every backend: an
object's size without reading it, and partial writes of a killed writer
swept once they are old enough (a folder's ``.part-*`` files, S3's
unfinished multipart uploads)."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from config.errors import NotFoundError
from storage.base import Vault
from storage.local import LocalVault
from storage.s3 import S3Vault
from tests.s3server import Buckets


@pytest.fixture(params=["folder", "s3"])
def vault(request: pytest.FixtureRequest, tmp_path: Path) -> Vault:
    if request.param == "folder":
        return LocalVault(tmp_path / "vault")
    buckets: Buckets = request.getfixturevalue("s3_buckets")
    return S3Vault(request.getfixturevalue("s3_client"), bucket=buckets.vault, prefix="sealed")


def test_size_of_a_stored_object(vault: Vault) -> None:
    vault.put_bytes("releases/r/d.emb", b"x" * 12345)
    assert vault.size("releases/r/d.emb") == 12345
    with pytest.raises(NotFoundError):
        vault.size("releases/r/none.emb")


def _leave_partial(vault: Vault, size: int) -> datetime:
    """What a writer SIGKILLed mid-write leaves; returns when it started."""
    if isinstance(vault, LocalVault):
        staging = vault.root / ".staging"
        staging.mkdir(parents=True, exist_ok=True)
        part = staging / ".part-killed"
        part.write_bytes(b"\0" * size)
        started = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
        os.utime(part, (started.timestamp(), started.timestamp()))
        return started
    assert isinstance(vault, S3Vault)
    client, name = vault.client, vault.prefix + "releases/r/big.emb"
    upload = client.create_multipart_upload(Bucket=vault.bucket, Key=name)
    client.upload_part(Bucket=vault.bucket, Key=name, UploadId=upload["UploadId"],
                       PartNumber=1, Body=b"\0" * size)
    listed = client.list_multipart_uploads(Bucket=vault.bucket)["Uploads"]
    return min(u["Initiated"] for u in listed)


def test_partial_writes_are_swept_only_once_old_enough(vault: Vault) -> None:
    started = _leave_partial(vault, 5 << 20)
    assert vault.sweep_partials(started) == (0, 0)  # not older than the cut-off: kept
    assert vault.sweep_partials(started + timedelta(seconds=1)) == (1, 5 << 20)
    assert vault.sweep_partials(started + timedelta(hours=1)) == (0, 0)  # gone
    if isinstance(vault, S3Vault):
        assert not vault.client.list_multipart_uploads(Bucket=vault.bucket).get("Uploads")
    else:
        assert isinstance(vault, LocalVault)
        assert list((vault.root / ".staging").iterdir()) == []


def test_probes_write_and_leave_nothing_behind(vault: Vault, request: pytest.FixtureRequest,
                                               tmp_path: Path) -> None:
    from release import custody
    from storage.base import PublicTarget
    from storage.local import LocalPublicTarget
    from storage.s3 import S3PublicTarget

    public: PublicTarget
    if isinstance(vault, LocalVault):
        public = LocalPublicTarget(tmp_path / "public")
    else:
        buckets: Buckets = request.getfixturevalue("s3_buckets")
        public = S3PublicTarget(request.getfixturevalue("s3_client"), bucket=buckets.public,
                                prefix="site/", base_url=None, acl="public-read",
                                cache_control="public, max-age=300")
    custody.probe_vault(vault)
    custody.probe_public(public)
    assert list(vault.keys("")) == []
    if isinstance(public, LocalPublicTarget):
        assert [p for p in public.root.rglob("*") if p.is_file()] == []
    else:
        assert "Contents" not in public.client.list_objects_v2(Bucket=public.bucket)
