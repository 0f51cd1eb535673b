"""The vault's part of "nothing left lying around", on every backend: an
object's size without reading it, and partial writes of a killed writer
swept once they are old enough (a folder's ``.part-*`` files, S3's
unfinished multipart uploads)."""

from __future__ import annotations

import os
import stat
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


def test_entries_list_size_and_when_written(vault: Vault) -> None:
    """One listing gives each object's size and its time of writing by the
    store's clock (moto's LastModified: whole seconds)."""
    before = datetime.now(UTC) - timedelta(seconds=2)
    vault.put_bytes("releases/r/d.emb", b"x" * 300)
    vault.put_bytes("releases/r/dek.hpke", b"key")
    vault.put_bytes("pending/probe-1", b"p")
    after = datetime.now(UTC) + timedelta(seconds=2)
    entries = list(vault.entries("releases/"))
    assert [(e.key, e.size) for e in entries] == [("releases/r/d.emb", 300),
                                                  ("releases/r/dek.hpke", 3)]
    assert all(before <= e.modified <= after and e.modified.tzinfo for e in entries)
    assert [e.key for e in vault.entries("")] == sorted(vault.keys(""))


def test_a_batch_writes_as_the_vault_does(vault: Vault) -> None:
    """Objects written through a batch are there at once, for every reader,
    before sync(); a writer that raises leaves nothing; sync() keeps them."""
    batch = vault.batch()
    with batch.writer("releases/r/d.emb") as out:
        out.write(b"sealed")
    batch.put_bytes("releases/r/dek.hpke", b"key")
    with pytest.raises(RuntimeError), batch.writer("releases/r/half.emb") as out:
        out.write(b"half")
        raise RuntimeError("killed")
    assert vault.get_bytes("releases/r/d.emb") == b"sealed"
    batch.sync()
    assert sorted(vault.keys()) == ["releases/r/d.emb", "releases/r/dek.hpke"]
    assert vault.get_bytes("releases/r/dek.hpke") == b"key"
    if isinstance(vault, LocalVault):  # nothing partial left anywhere either
        assert sorted(p.relative_to(vault.root).as_posix() for p in vault.root.rglob("*")
                      if p.is_file()) == ["releases/r/d.emb", "releases/r/dek.hpke"]


def test_a_folder_vault_replaces_an_object_whole(tmp_path: Path) -> None:
    vault = LocalVault(tmp_path / "vault")
    vault.put_bytes("releases/r/dek.hpke", b"old key")
    vault.put_bytes("releases/r/dek.hpke", b"new key")
    assert vault.get_bytes("releases/r/dek.hpke") == b"new key"
    assert (vault.root / "releases/r/dek.hpke").stat().st_mode & 0o777 == 0o644
    assert [p for p in vault.root.rglob("*") if p.is_file()] == [
        vault.root / "releases/r/dek.hpke"]


def _fsynced(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    """(folders, files) fsynced from now on, in order."""
    folders: list[str] = []
    files: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        real(fd)
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        (folders if is_dir else files).append(os.readlink(f"/proc/self/fd/{fd}"))

    monkeypatch.setattr(os, "fsync", fsync)
    return folders, files


def test_a_new_folder_is_durable_with_its_first_object(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder made for an object is an entry in its parent folder: that
    parent is fsynced too, or a crash can lose the folder and the object."""
    vault = LocalVault(tmp_path / "vault")
    vault.put_bytes("releases/old/d.emb", b"x")
    folders, files = _fsynced(monkeypatch)
    vault.put_bytes("releases/new/d.emb", b"x")
    assert len(files) == 1
    assert folders == [str(tmp_path / "vault" / "releases" / "new"),
                       str(tmp_path / "vault" / "releases")]
    folders.clear()
    vault.put_bytes("releases/new/e.emb", b"x")  # the folder exists: only itself
    assert folders == [str(tmp_path / "vault" / "releases" / "new")]


def test_a_batch_fsyncs_each_folder_once(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    vault = LocalVault(tmp_path / "vault")
    vault.put_bytes("releases/old/d.emb", b"x")
    folders, files = _fsynced(monkeypatch)
    batch = vault.batch()
    for name in ("a.emb", "b.emb", "dek.hpke"):
        batch.put_bytes(f"releases/new/{name}", b"x")
    assert len(files) == 3 and folders == []  # the files alone
    batch.sync()
    assert folders == [str(tmp_path / "vault" / "releases" / "new"),
                       str(tmp_path / "vault" / "releases")]
