"""One contract suite for every storage backend: the vault and the public
target, on a local folder and on a real S3-protocol server (moto's server
mode in a child process, see tests/s3server.py). The promises tested are the
docstrings of storage/base.py."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from config.errors import NotFoundError, StorageError
from config.settings import load_settings
from storage.base import ObjectExistsError, PublicTarget, Vault
from storage.local import LocalPublicTarget, LocalVault
from storage.s3 import S3PublicTarget, S3Vault, make_client

if TYPE_CHECKING:
    from tests.s3server import Buckets


MiB = 1 << 20
SIZES = [0, 1, MiB]


class Boom(Exception):
    pass


@pytest.fixture(params=["folder", "s3"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def vault(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Vault:
    if backend == "folder":
        return LocalVault(tmp_path / "vault")
    buckets: Buckets = request.getfixturevalue("s3_buckets")
    return S3Vault(request.getfixturevalue("s3_client"), bucket=buckets.vault, prefix="sealed")


@pytest.fixture
def public_target(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> PublicTarget:
    if backend == "folder":
        return LocalPublicTarget(tmp_path / "public")
    buckets: Buckets = request.getfixturevalue("s3_buckets")
    return S3PublicTarget(request.getfixturevalue("s3_client"), bucket=buckets.public,
                          prefix="site/", base_url=None, acl="public-read",
                          cache_control="public, max-age=300")


@pytest.fixture
def missing_location(backend: str, tmp_path: Path,
                     request: pytest.FixtureRequest) -> tuple[Vault, PublicTarget, str]:
    """A vault and a public target that cannot work, and a word the error
    must name."""
    if backend == "folder":
        blocker = tmp_path / "a-file"
        blocker.write_bytes(b"not a folder")
        return (LocalVault(blocker / "vault"), LocalPublicTarget(blocker / "public"),
                str(blocker))
    client = request.getfixturevalue("s3_client")
    name = "no-such-bucket-embargo"
    return (S3Vault(client, bucket=name, prefix="v/"),
            S3PublicTarget(client, bucket=name, prefix="p/"), name)


def blob(size: int) -> bytes:
    return (hashlib.sha256(str(size).encode()).digest() * (size // 32 + 1))[:size]


# -- vault -------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES)
def test_vault_round_trip(vault: Vault, size: int) -> None:
    data = blob(size)
    with vault.writer("releases/r1/d1.emb") as out:
        out.write(data[: size // 2])
        out.write(data[size // 2:])
    assert vault.exists("releases/r1/d1.emb")
    with vault.reader("releases/r1/d1.emb") as src:
        assert src.read() == data
    assert vault.get_bytes("releases/r1/d1.emb") == data


def test_vault_writer_replaces_old_object(vault: Vault) -> None:
    vault.put_bytes("k/dek.hpke", b"old")
    vault.put_bytes("k/dek.hpke", b"new!")
    assert vault.get_bytes("k/dek.hpke") == b"new!"


def test_vault_writer_that_raises_leaves_nothing(vault: Vault) -> None:
    with pytest.raises(Boom), vault.writer("releases/r1/new.emb") as out:
        out.write(b"half a document")
        raise Boom
    assert not vault.exists("releases/r1/new.emb")
    assert list(vault.keys()) == []
    vault.put_bytes("releases/r1/old.emb", b"old")
    with pytest.raises(Boom), vault.writer("releases/r1/old.emb") as out:
        out.write(b"replacement")
        raise Boom
    assert vault.get_bytes("releases/r1/old.emb") == b"old"


def test_vault_reader_of_missing_key(vault: Vault) -> None:
    with pytest.raises(NotFoundError), vault.reader("releases/none/d.emb"):
        pass
    assert not vault.exists("releases/none/d.emb")


def test_vault_delete_is_idempotent(vault: Vault) -> None:
    vault.put_bytes("releases/r1/dek.hpke", b"sealed")
    vault.delete("releases/r1/dek.hpke")
    assert not vault.exists("releases/r1/dek.hpke")
    vault.delete("releases/r1/dek.hpke")
    vault.delete("never/was.here")


def test_vault_keys_by_prefix(vault: Vault) -> None:
    for key in ("releases/a/dek.hpke", "releases/a/d1.emb", "releases/ab/dek.hpke",
                "releases/b/dek.hpke", "other.bin"):
        vault.put_bytes(key, b"x")
    assert sorted(vault.keys("releases/a/")) == ["releases/a/d1.emb", "releases/a/dek.hpke"]
    assert sorted(vault.keys("releases/a")) == ["releases/a/d1.emb", "releases/a/dek.hpke",
                                                "releases/ab/dek.hpke"]
    assert sorted(vault.keys()) == ["other.bin", "releases/a/d1.emb", "releases/a/dek.hpke",
                                    "releases/ab/dek.hpke", "releases/b/dek.hpke"]
    assert list(vault.keys("nothing/")) == []


def test_vault_rejects_bad_keys(vault: Vault) -> None:
    for key in ("", "/abs", "a/../b", "a//b"):
        with pytest.raises(ValueError):
            vault.exists(key)


def test_vault_check(vault: Vault, missing_location: tuple[Vault, PublicTarget, str]) -> None:
    vault.check()
    assert list(vault.keys()) == []  # checking writes nothing
    bad, _, named = missing_location
    with pytest.raises(StorageError) as caught:
        bad.check()
    assert named in str(caught.value)
    assert "\n" not in str(caught.value)


# -- public target -----------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES)
def test_public_round_trip_and_stat(public_target: PublicTarget, size: int) -> None:
    data = blob(size)
    with public_target.writer("slug/report.pdf", content_type="application/pdf") as out:
        out.write(data)
    assert public_target.exists("slug/report.pdf")
    with public_target.reader("slug/report.pdf") as src:
        assert src.read() == data
    stored = public_target.stat("slug/report.pdf")
    assert stored.key == "slug/report.pdf"
    assert stored.size == size
    assert stored.sha256 == hashlib.sha256(data).hexdigest()


def test_public_writer_is_create_only(public_target: PublicTarget) -> None:
    with public_target.writer("slug/letter.txt", content_type="text/plain") as out:
        out.write(b"first")
    with pytest.raises(ObjectExistsError), \
            public_target.writer("slug/letter.txt", content_type="text/plain") as out:
        out.write(b"second, different")
    assert public_target.stat("slug/letter.txt").sha256 == hashlib.sha256(b"first").hexdigest()
    with public_target.reader("slug/letter.txt") as src:
        assert src.read() == b"first"


def test_public_writer_that_raises_publishes_nothing(public_target: PublicTarget) -> None:
    with pytest.raises(Boom), \
            public_target.writer("slug/half.txt", content_type="text/plain") as out:
        out.write(b"half")
        raise Boom
    assert not public_target.exists("slug/half.txt")
    with pytest.raises(NotFoundError), public_target.reader("slug/half.txt"):
        pass
    with public_target.writer("slug/half.txt", content_type="text/plain") as out:
        out.write(b"whole")  # the failed attempt did not take the key
    assert public_target.stat("slug/half.txt").size == 5


def test_public_delete_is_idempotent(public_target: PublicTarget) -> None:
    with public_target.writer("slug/x.txt", content_type="text/plain") as out:
        out.write(b"x")
    public_target.delete("slug/x.txt")
    public_target.delete("slug/x.txt")
    assert not public_target.exists("slug/x.txt")


def test_public_url_names_the_key_and_serves_it(public_target: PublicTarget) -> None:
    with public_target.writer("slug/national-report.txt", content_type="text/plain") as out:
        out.write(b"the report")
    url = public_target.url("slug/national-report.txt")
    assert url.endswith("slug/national-report.txt")
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.read() == b"the report"


def test_public_content_type_is_stored(public_target: PublicTarget, backend: str) -> None:
    with public_target.writer("slug/report.pdf", content_type="application/pdf") as out:
        out.write(b"%PDF-1.7")
    if backend == "folder":
        pytest.skip("a folder keeps no content type")
    assert isinstance(public_target, S3PublicTarget)
    head = public_target.client.head_object(Bucket=public_target.bucket,
                                            Key="site/slug/report.pdf")
    assert head["ContentType"] == "application/pdf"
    assert head["CacheControl"] == "public, max-age=300"
    assert head["Metadata"]["sha256"] == hashlib.sha256(b"%PDF-1.7").hexdigest()


def test_public_check(public_target: PublicTarget,
                      missing_location: tuple[Vault, PublicTarget, str]) -> None:
    public_target.check()
    assert not public_target.exists("slug/anything")
    _, bad, named = missing_location
    with pytest.raises(StorageError) as caught:
        bad.check()
    assert named in str(caught.value)
    assert "\n" not in str(caught.value)


# -- S3 only: what the folder backends have no counterpart for ----------------------
def test_s3_check_messages(s3_client: Any) -> None:
    with pytest.raises(StorageError, match=r"bucket no-such-bucket-embargo does not exist"):
        S3Vault(s3_client, bucket="no-such-bucket-embargo", prefix="").check()


def test_make_client_uses_the_settings_and_the_credential_chain(
        s3_server: str, s3_buckets: Buckets, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-the-environment")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    settings = load_settings(environ={}, overrides={
        "data_dir": str(tmp_path), "storage.vault": f"s3://{s3_buckets.vault}/sealed",
        "s3.region": "eu-west-2", "s3.endpoint_url": s3_server,
        "s3.addressing_style": "path"})
    client = make_client(settings)
    assert client.meta.region_name == "eu-west-2"
    assert client.meta.endpoint_url == s3_server
    assert client.meta.config.s3 == {"addressing_style": "path"}
    assert client.meta.config.retries["mode"] == "standard"
    location = settings.vault
    vault = S3Vault(client, bucket=location.bucket, prefix=location.prefix)
    vault.check()
    vault.put_bytes("a.emb", b"sealed")
    assert vault.get_bytes("a.emb") == b"sealed"
    assert s3_client_keys(client, s3_buckets.vault) == ["sealed/a.emb"]


def test_check_without_credentials_is_one_clear_error(
        s3_server: str, s3_buckets: Buckets, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    settings = load_settings(environ={}, overrides={
        "data_dir": str(tmp_path), "s3.endpoint_url": s3_server, "s3.region": "us-east-1"})
    vault = S3Vault(make_client(settings), bucket=s3_buckets.vault, prefix="")
    with pytest.raises(StorageError, match="no AWS credentials found"):
        vault.check()


def s3_client_keys(client: Any, bucket: str) -> list[str]:
    return [item["Key"] for item in client.list_objects_v2(Bucket=bucket).get("Contents", [])]


def test_s3_url_forms(s3_client: Any) -> None:
    cdn = S3PublicTarget(s3_client, bucket="pub-bucket", prefix="site",
                         base_url="https://cdn.example.org/", acl=None, cache_control=None)
    assert cdn.url("slug/a b.txt") == "https://cdn.example.org/site/slug/a%20b.txt"
    path_style = S3PublicTarget(s3_client, bucket="pub-bucket", prefix="")
    assert path_style.url("slug/r.pdf") == f"{s3_client.meta.endpoint_url}/pub-bucket/slug/r.pdf"
    aws = client_for_aws("eu-west-2")
    assert S3PublicTarget(aws, bucket="pub-bucket", prefix="site/").url("slug/r.pdf") == \
        "https://pub-bucket.s3.eu-west-2.amazonaws.com/site/slug/r.pdf"


def client_for_aws(region: str) -> Any:
    import boto3

    return boto3.session.Session().client("s3", region_name=region,
                                          aws_access_key_id="x", aws_secret_access_key="y")


def test_s3_public_acl_cache_control_and_checksum(s3_client: Any, s3_buckets: Buckets) -> None:
    target = S3PublicTarget(s3_client, bucket=s3_buckets.public, prefix="site/", base_url=None,
                            acl="public-read", cache_control="public, max-age=60")
    with target.writer("slug/a.txt", content_type="text/plain; charset=utf-8") as out:
        out.write(b"hello")
    head = s3_client.head_object(Bucket=s3_buckets.public, Key="site/slug/a.txt")
    assert head["CacheControl"] == "public, max-age=60"
    assert head["ContentType"] == "text/plain; charset=utf-8"
    grants = s3_client.get_object_acl(Bucket=s3_buckets.public, Key="site/slug/a.txt")["Grants"]
    assert any(g["Grantee"].get("URI", "").endswith("/global/AllUsers")
               and g["Permission"] == "READ" for g in grants)
    with urllib.request.urlopen(target.url("slug/a.txt"), timeout=5) as response:
        assert response.read() == b"hello"
    private = S3PublicTarget(s3_client, bucket=s3_buckets.public, prefix="site/")
    with private.writer("slug/b.txt", content_type="text/plain") as out:
        out.write(b"no acl: readable only if a bucket policy says so")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(private.url("slug/b.txt"), timeout=5)
    assert refused.value.code == 403


class NoPrecheck(S3PublicTarget):
    """Skips the existence pre-check so the condition on
    CompleteMultipartUpload itself is what refuses the second writer."""

    def exists(self, key: str) -> bool:
        return False


@pytest.mark.parametrize("precheck", [True, False], ids=["precheck", "complete-condition"])
def test_s3_multipart_create_only(s3_client: Any, s3_buckets: Buckets, precheck: bool) -> None:
    kind = S3PublicTarget if precheck else NoPrecheck
    target = kind(s3_client, bucket=s3_buckets.public, prefix="", multipart_threshold=5 * MiB,
                  part_size=5 * MiB, part_concurrency=2)
    first = blob(11 * MiB)
    with target.writer("slug/big.bin", content_type="application/octet-stream") as out:
        out.write(first)
    head = s3_client.head_object(Bucket=s3_buckets.public, Key="slug/big.bin")
    assert head["ETag"].endswith('-3"')  # three parts: it went up as a multipart upload
    assert head["Metadata"]["sha256"] == hashlib.sha256(first).hexdigest()
    assert head["ContentType"] == "application/octet-stream"
    with pytest.raises(ObjectExistsError), \
            target.writer("slug/big.bin", content_type="application/octet-stream") as out:
        out.write(blob(6 * MiB))
    stored = target.stat("slug/big.bin")
    assert (stored.size, stored.sha256) == (len(first), hashlib.sha256(first).hexdigest())
    uploads = s3_client.list_multipart_uploads(Bucket=s3_buckets.public).get("Uploads", [])
    assert uploads == []  # the refused upload was aborted


def test_s3_multipart_writer_that_raises_uploads_nothing(s3_client: Any,
                                                         s3_buckets: Buckets) -> None:
    target = S3PublicTarget(s3_client, bucket=s3_buckets.public, prefix="",
                            multipart_threshold=5 * MiB, part_size=5 * MiB)
    with pytest.raises(Boom), target.writer("slug/big.bin", content_type="x/y") as out:
        out.write(blob(6 * MiB))
        raise Boom
    assert not target.exists("slug/big.bin")
    assert s3_client.list_multipart_uploads(Bucket=s3_buckets.public).get("Uploads", []) == []


def test_s3_vault_multipart_round_trip(s3_client: Any, s3_buckets: Buckets) -> None:
    vault = S3Vault(s3_client, bucket=s3_buckets.vault, prefix="sealed/")
    data = blob(17 * MiB)
    with vault.writer("releases/r/big.emb") as out:
        for start in range(0, len(data), MiB):
            out.write(data[start:start + MiB])
    head = s3_client.head_object(Bucket=s3_buckets.vault, Key="sealed/releases/r/big.emb")
    assert head["ContentLength"] == len(data)
    assert "-" in head["ETag"]  # multipart
    digest = hashlib.sha256()
    with vault.reader("releases/r/big.emb") as src:
        while chunk := src.read(MiB):
            digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
