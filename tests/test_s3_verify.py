"""How the S3 public target verifies what it published, against the real moto
server: by a HEAD that returns the SHA-256 the object was put with, without
reading the body back; by reading it back and hashing it when the store has
no SHA-256 of the whole object (a multipart upload, an object put without
one); and never by taking a missing checksum for a match.

The S3 operations a client makes are counted with botocore's
``before-parameter-build`` event, registered on a client of this module's
own (the session's shared client is left alone)."""

from __future__ import annotations

import array
import base64
import hashlib
import io
import os
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from config.errors import NotFoundError, StorageError
from config.settings import Settings, load_settings
from jobs.app import build_services
from release.manifest import load_manifest
from release.records import PUBLISHED
from release.service import ReleaseService, Services
from storage.base import ObjectExistsError
from storage.s3 import PART_SIZE, S3PublicTarget, Verify, _whole_object_sha256, make_client
from tests.conftest import FakeClock, release_row, write_bundle
from tests.test_s3_faults import all_keys, publish_at_seed, s3_settings, stored

if TYPE_CHECKING:
    from tests.s3server import Buckets

MiB = 1 << 20


class Calls:
    """The S3 operations made through one client: (operation, bucket, key,
    checksum mode), recorded before each call is built."""

    def __init__(self, client: Any) -> None:
        self.seen: list[tuple[str, str, str, str]] = []
        self.params: dict[str, dict[str, Any]] = {}  # key -> its last PutObject's, no Body
        client.meta.events.register("before-parameter-build.s3", self._record)

    def _record(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        self.seen.append((model.name, str(params.get("Bucket", "")),
                          str(params.get("Key", "")), str(params.get("ChecksumMode", ""))))
        if model.name == "PutObject":
            self.params[str(params.get("Key", ""))] = {
                name: value for name, value in params.items() if name != "Body"}

    def count(self, operation: str, bucket: str, key: str | None = None) -> int:
        return sum(1 for op, b, k, _ in self.seen
                   if op == operation and b == bucket and (key is None or k == key))

    def by_operation(self, bucket: str) -> Counter[str]:
        return Counter(op for op, b, _, _ in self.seen if b == bucket)


@pytest.fixture(scope="module")
def _counted(s3_server: str) -> tuple[Any, Calls]:
    from tests.s3server import client_for

    client = client_for(s3_server)
    return client, Calls(client)


@pytest.fixture
def counted(_counted: tuple[Any, Calls]) -> Iterator[tuple[Any, Calls]]:
    """A client to the moto server whose calls are counted, from zero."""
    _counted[1].seen.clear()
    _counted[1].params.clear()
    yield _counted


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put_out_of_band(client: Any, bucket: str, key: str, data: bytes) -> None:
    """Another writer's object, put with a true SHA-256 of its own bytes."""
    client.put_object(Bucket=bucket, Key=key, Body=data, ChecksumAlgorithm="SHA256",
                      ChecksumSHA256=base64.b64encode(hashlib.sha256(data).digest()).decode())


# -- which checksum counts ---------------------------------------------------------------
GOOD = base64.b64encode(hashlib.sha256(b"x").digest()).decode()


@pytest.mark.parametrize(("head", "expected"), [
    ({"ChecksumSHA256": GOOD, "ETag": '"9dd4e461268c8034f5c8564e155c67a6"'},
     hashlib.sha256(b"x").digest()),
    ({"ChecksumSHA256": GOOD, "ChecksumType": "FULL_OBJECT", "ETag": '"e"'},
     hashlib.sha256(b"x").digest()),
    ({"ETag": '"e"'}, None),  # no checksum: the store keeps none, or not this algorithm
    ({"ChecksumCRC32": "DUoRhQ==", "ETag": '"e"'}, None),
    ({"ChecksumSHA256": f"{GOOD}-3", "ChecksumType": "COMPOSITE", "ETag": '"e-3"'}, None),
    ({"ChecksumSHA256": f"{GOOD}-3", "ETag": '"e"'}, None),  # suffix alone
    ({"ChecksumSHA256": GOOD, "ChecksumType": "COMPOSITE", "ETag": '"e"'}, None),  # type alone
    ({"ChecksumSHA256": GOOD, "ETag": '"e-2"'}, None),  # moto's multipart: only the ETag says
    ({"ChecksumSHA256": "not base64!", "ETag": '"e"'}, None),
    ({"ChecksumSHA256": base64.b64encode(b"short").decode(), "ETag": '"e"'}, None),
], ids=["full", "full-typed", "none", "other-algorithm", "composite", "composite-suffix",
        "composite-type", "multipart-etag", "malformed", "wrong-length"])
def test_only_a_whole_object_sha256_is_taken_from_a_head(head: dict[str, Any],
                                                         expected: bytes | None) -> None:
    assert _whole_object_sha256(head) == expected


# -- a single-part object: a HEAD, no GET -------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, MiB, PART_SIZE], ids=["empty", "1B", "1MiB", "threshold"])
def test_a_single_part_object_is_verified_by_head_without_reading_it_back(
        counted: tuple[Any, Calls], s3_buckets: Buckets, size: int) -> None:
    client, calls = counted
    data = (hashlib.sha256(b"%d" % size).digest() * (size // 32 + 1))[:size]
    target = S3PublicTarget(client, bucket=s3_buckets.public, prefix="site/")
    with target.writer("slug/doc.bin", content_type="application/octet-stream") as out:
        out.write(data)
    found = target.stat("slug/doc.bin")
    assert (found.key, found.size, found.sha256) == ("slug/doc.bin", size, sha(data))
    assert calls.by_operation(s3_buckets.public) == {"PutObject": 1, "HeadObject": 1}
    assert ("HeadObject", s3_buckets.public, "site/slug/doc.bin", "ENABLED") in calls.seen
    assert stored(client, s3_buckets.public, "site/slug/doc.bin") == data


def test_the_writer_hashes_any_buffer_it_is_given(counted: tuple[Any, Calls],
                                                  s3_buckets: Buckets) -> None:
    client, calls = counted
    words = array.array("I", range(1000))
    target = S3PublicTarget(client, bucket=s3_buckets.public, prefix="")
    with target.writer("slug/mixed.bin", content_type="application/octet-stream") as out:
        out.write(b"bytes ")
        out.write(bytearray(b"bytearray "))
        out.write(memoryview(words))  # itemsize 4: its bytes count, not its items
        with pytest.raises(io.UnsupportedOperation):
            out.seek(0)  # what was hashed is what is stored: no going back
    expected = b"bytes bytearray " + words.tobytes()
    assert stored(client, s3_buckets.public, "slug/mixed.bin") == expected
    head = client.head_object(Bucket=s3_buckets.public, Key="slug/mixed.bin")
    assert head["Metadata"]["sha256"] == sha(expected)
    assert head["ContentLength"] == len(expected)
    calls.seen.clear()
    assert target.stat("slug/mixed.bin").sha256 == sha(expected)
    assert calls.count("GetObject", s3_buckets.public) == 0


def test_stat_of_a_missing_object(counted: tuple[Any, Calls], s3_buckets: Buckets) -> None:
    target = S3PublicTarget(counted[0], bucket=s3_buckets.public, prefix="site/")
    with pytest.raises(NotFoundError, match=r"no stored object slug/none\.txt"):
        target.stat("slug/none.txt")


# -- mismatches fail loudly ---------------------------------------------------------------
def test_an_object_replaced_out_of_band_reports_its_own_checksum_and_size(
        counted: tuple[Any, Calls], s3_buckets: Buckets) -> None:
    client, calls = counted
    target = S3PublicTarget(client, bucket=s3_buckets.public, prefix="site/")
    with target.writer("slug/a.txt", content_type="text/plain") as out:
        out.write(b"ours")
    put_out_of_band(client, s3_buckets.public, "site/slug/a.txt", b"replaced, longer")
    calls.seen.clear()
    found = target.stat("slug/a.txt")
    assert found.sha256 == sha(b"replaced, longer") != sha(b"ours")
    assert found.size == len(b"replaced, longer")
    assert calls.by_operation(s3_buckets.public) == {"HeadObject": 1}  # the HEAD decided


def test_an_object_without_a_sha256_is_read_back_not_taken_as_a_match(
        counted: tuple[Any, Calls], s3_buckets: Buckets) -> None:
    """Put by another writer with no SHA-256 (boto3 sends a CRC32 by
    default): the missing SHA-256 is no match; the bytes are read back."""
    client, calls = counted
    client.put_object(Bucket=s3_buckets.public, Key="site/slug/b.txt", Body=b"theirs")
    assert "ChecksumSHA256" not in client.head_object(
        Bucket=s3_buckets.public, Key="site/slug/b.txt", ChecksumMode="ENABLED")
    target = S3PublicTarget(client, bucket=s3_buckets.public, prefix="site/")
    with pytest.raises(ObjectExistsError), \
            target.writer("slug/b.txt", content_type="text/plain") as out:
        out.write(b"ours")
    calls.seen.clear()
    found = target.stat("slug/b.txt")
    assert (found.size, found.sha256) == (6, sha(b"theirs"))
    assert calls.by_operation(s3_buckets.public) == {"HeadObject": 1, "GetObject": 1}


# -- publish_file: the PUT's own account -------------------------------------------------
def staged_file(tmp_path: Path, data: bytes) -> tuple[Path, str]:
    path = tmp_path / "staged.bin"
    path.write_bytes(data)
    return path, sha(data)


@pytest.mark.parametrize("size", [0, 1, 100 * 1024, PART_SIZE],
                         ids=["empty", "1B", "100KiB", "threshold"])
def test_publish_file_is_one_put_trusting_the_checksum_it_returns(
        tmp_path: Path, counted: tuple[Any, Calls], s3_buckets: Buckets, size: int) -> None:
    client, calls = counted
    data = (hashlib.sha256(b"%d" % size).digest() * (size // 32 + 1))[:size]
    source, digest = staged_file(tmp_path, data)
    target = S3PublicTarget(client, bucket=s3_buckets.public, prefix="site/",
                            cache_control="public, max-age=300")
    found = target.publish_file("slug/doc.bin", source, content_type="application/pdf",
                                size=size, sha256=digest)
    assert (found.key, found.size, found.sha256) == ("slug/doc.bin", size, digest)
    assert calls.by_operation(s3_buckets.public) == {"PutObject": 1}
    put = calls.params["site/slug/doc.bin"]
    assert (put["IfNoneMatch"], put["ChecksumAlgorithm"]) == ("*", "SHA256")
    assert put["ChecksumSHA256"] == base64.b64encode(bytes.fromhex(digest)).decode()
    assert stored(client, s3_buckets.public, "site/slug/doc.bin") == data
    head = client.head_object(Bucket=s3_buckets.public, Key="site/slug/doc.bin")
    assert (head["ContentType"], head["CacheControl"]) == ("application/pdf",
                                                           "public, max-age=300")
    assert head["Metadata"]["sha256"] == digest


def test_publish_file_with_verify_head_asks_the_store_again(
        tmp_path: Path, counted: tuple[Any, Calls], s3_buckets: Buckets) -> None:
    client, calls = counted
    source, digest = staged_file(tmp_path, b"checked twice")
    target = S3PublicTarget(client, bucket=s3_buckets.public, prefix="site/",
                            verify=Verify.HEAD)
    found = target.publish_file("slug/a.txt", source, content_type="text/plain",
                                size=len(b"checked twice"), sha256=digest)
    assert (found.size, found.sha256) == (len(b"checked twice"), digest)
    assert calls.by_operation(s3_buckets.public) == {"PutObject": 1, "HeadObject": 1}
    assert ("HeadObject", s3_buckets.public, "site/slug/a.txt", "ENABLED") in calls.seen


def test_publish_file_is_create_only(tmp_path: Path, counted: tuple[Any, Calls],
                                     s3_buckets: Buckets) -> None:
    """A 412 is ObjectExistsError and nothing more: the publisher then asks
    with stat(); the object there is left alone."""
    client, calls = counted
    put_out_of_band(client, s3_buckets.public, "site/slug/a.txt", b"already public")
    source, digest = staged_file(tmp_path, b"ours")
    target = S3PublicTarget(client, bucket=s3_buckets.public, prefix="site/")
    calls.seen.clear()
    with pytest.raises(ObjectExistsError):
        target.publish_file("slug/a.txt", source, content_type="text/plain", size=4,
                            sha256=digest)
    assert calls.by_operation(s3_buckets.public) == {"PutObject": 1}
    assert stored(client, s3_buckets.public, "site/slug/a.txt") == b"already public"


def test_a_staged_file_that_is_not_the_verified_size_is_not_published(
        tmp_path: Path, counted: tuple[Any, Calls], s3_buckets: Buckets) -> None:
    """Staging changed after it was verified (truncated here): refused before
    any request, so a store that does not check the checksum cannot make
    the wrong bytes public."""
    client, calls = counted
    source, digest = staged_file(tmp_path, b"the verified bytes")
    source.write_bytes(b"the verif")
    target = S3PublicTarget(client, bucket=s3_buckets.public, prefix="site/")
    with pytest.raises(StorageError, match=r"staged staged\.bin is 9 bytes, not the 18"):
        target.publish_file("slug/a.txt", source, content_type="text/plain", size=18,
                            sha256=digest)
    assert calls.by_operation(s3_buckets.public) == {}
    assert all_keys(client, s3_buckets.public) == []


@pytest.mark.parametrize("verify", [Verify.CHECKSUM, Verify.HEAD])
def test_publish_file_of_a_big_file_goes_up_in_parts_confirmed_by_their_checksum(
        tmp_path: Path, counted: tuple[Any, Calls], s3_buckets: Buckets,
        verify: Verify) -> None:
    """Above the threshold, a multipart upload from the staged file itself,
    whose SHA-256 is checked while the parts go up; the store's checksum of
    the parts' checksums (from a HEAD, since moto's CompleteMultipartUpload
    reports none) is the one these parts make: no read-back."""
    client, calls = counted
    data = (hashlib.sha256(b"big").digest() * (6 * MiB // 32 + 1))[:6 * MiB + 7]
    source, digest = staged_file(tmp_path, data)
    target = S3PublicTarget(client, bucket=s3_buckets.public, prefix="site/",
                            multipart_threshold=5 * MiB, part_size=5 * MiB, verify=verify)
    found = target.publish_file("slug/big.bin", source, content_type="application/pdf",
                                size=len(data), sha256=digest)
    assert (found.size, found.sha256) == (len(data), digest)
    ops = calls.by_operation(s3_buckets.public)
    assert ops == {"HeadObject": 2, "CreateMultipartUpload": 1, "UploadPart": 2,
                   "CompleteMultipartUpload": 1}  # the HEADs: exists first, then the check
    assert stored(client, s3_buckets.public, "site/slug/big.bin") == data
    with pytest.raises(ObjectExistsError):
        target.publish_file("slug/big.bin", source, content_type="application/pdf",
                            size=len(data), sha256=digest)
    assert client.list_multipart_uploads(Bucket=s3_buckets.public).get("Uploads", []) == []


def test_a_big_staged_file_that_is_not_the_one_verified_is_never_visible(
        tmp_path: Path, counted: tuple[Any, Calls], s3_buckets: Buckets) -> None:
    """Same size, other bytes (changed after it was verified): the whole
    file's SHA-256 is checked before CompleteMultipartUpload, so the upload
    is aborted and nothing is published."""
    client, calls = counted
    data = os.urandom(6 * MiB)
    source, digest = staged_file(tmp_path, data)
    source.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    target = S3PublicTarget(client, bucket=s3_buckets.public, prefix="site/",
                            multipart_threshold=5 * MiB, part_size=5 * MiB)
    with pytest.raises(StorageError, match=r"is not the one verified"):
        target.publish_file("slug/big.bin", source, content_type="application/pdf",
                            size=len(data), sha256=digest)
    assert calls.count("CompleteMultipartUpload", s3_buckets.public) == 0
    assert all_keys(client, s3_buckets.public) == []
    assert client.list_multipart_uploads(Bucket=s3_buckets.public).get("Uploads", []) == []


@pytest.mark.parametrize(("workers", "publish_workers", "pool"),
                         [(16, 4, 64), (1, 1, 32), (32, 8, 256)])
def test_the_client_keeps_a_connection_for_every_put_in_flight(
        tmp_path: Path, workers: int, publish_workers: int, pool: int) -> None:
    """Releases published at once (scheduler.workers) times the documents of
    each put at once (scheduler.publish_workers), and never fewer than 32:
    a connection handed back to a full pool is closed, and the next PUT after
    the instant would open a new one."""
    settings = load_settings(environ={}, overrides={
        "data_dir": str(tmp_path), "s3.endpoint_url": "http://127.0.0.1:9",
        "scheduler.workers": workers, "scheduler.publish_workers": publish_workers})
    assert make_client(settings).meta.config.max_pool_connections == pool


# -- multipart: read back ------------------------------------------------------------------
def test_a_multipart_object_is_read_back_and_verified(counted: tuple[Any, Calls],
                                                      s3_buckets: Buckets) -> None:
    """One byte over the default threshold goes up in parts; its SHA-256 on
    the store is of the parts' checksums, so stat reads the bytes back."""
    client, calls = counted
    target = S3PublicTarget(client, bucket=s3_buckets.public, prefix="site/")
    assert target.multipart_threshold == PART_SIZE
    data = (hashlib.sha256(b"big").digest() * (PART_SIZE // 32 + 1))[:PART_SIZE + 1]
    with target.writer("slug/big.bin", content_type="application/octet-stream") as out:
        out.write(data)
    ops = calls.by_operation(s3_buckets.public)
    assert ops["CreateMultipartUpload"] == 1 and ops["UploadPart"] == 2
    assert "PutObject" not in ops
    head = client.head_object(Bucket=s3_buckets.public, Key="site/slug/big.bin",
                              ChecksumMode="ENABLED")
    assert head["ETag"].endswith('-2"')
    assert head.get("ChecksumSHA256") != base64.b64encode(hashlib.sha256(data).digest()).decode()
    calls.seen.clear()
    found = target.stat("slug/big.bin")
    assert (found.size, found.sha256) == (len(data), sha(data))
    assert calls.by_operation(s3_buckets.public) == {"HeadObject": 1, "GetObject": 1}


# -- through the publisher ---------------------------------------------------------------
@pytest.fixture
def counted_services(tmp_path: Path, s3_server: str, s3_buckets: Buckets,
                     counted: tuple[Any, Calls]) -> Iterator[tuple[Settings, Services]]:
    settings = s3_settings(tmp_path, s3_server, s3_buckets)
    services = build_services(settings, s3_client=counted[0],
                              clock=FakeClock(datetime(2014, 9, 1, tzinfo=UTC)))
    yield settings, services
    services.engine.dispose()


def queue(services: Services, tmp_path: Path, letters: int) -> tuple[Any, Callable[[str], bytes]]:
    bundle = write_bundle(tmp_path / "bundle", letters=letters)
    release = ReleaseService(services, actor="comms").queue(load_manifest(bundle))
    files = {path.name: path for path in bundle.parent.rglob("*") if path.is_file()}
    return release, lambda filename: files[filename].read_bytes()


@pytest.mark.parametrize("verify", ["checksum", "head"])
def test_each_document_after_the_instant_is_one_put_and_a_head_only_if_asked(
        tmp_path: Path, s3_server: str, s3_buckets: Buckets, counted: tuple[Any, Calls],
        verify: str) -> None:
    """s3.verify = "checksum" (the default): the PUT's returned SHA-256 is the
    store's account, so the only requests to the public bucket after the
    instant are one create-only PUT per document (with its SHA-256 for the
    store to check) and the manifest's; "head": a HEAD after each PUT too (the
    manifest's included: it is published from staging as the documents are)."""
    client, calls = counted
    settings = s3_settings(tmp_path, s3_server, s3_buckets, verify=verify)
    services = build_services(settings, s3_client=client,
                              clock=FakeClock(datetime(2014, 9, 1, tzinfo=UTC)))
    try:
        release, plaintext = queue(services, tmp_path, letters=3)
        calls.seen.clear()
        calls.params.clear()
        outcome = publish_at_seed(settings, services, release.id)
    finally:
        services.engine.dispose()
    assert outcome.status == "published", outcome.detail
    public = s3_buckets.public
    documents = len(release.documents)
    assert calls.by_operation(public) == (
        {"PutObject": documents + 1} if verify == "checksum"
        else {"PutObject": documents + 1, "HeadObject": documents + 1})
    for doc in release.documents:
        key = f"site/{release.slug}/{doc.filename}"
        assert calls.count("PutObject", public, key) == 1
        assert calls.count("HeadObject", public, key) == (verify == "head")
        put = calls.params[key]
        assert put["IfNoneMatch"] == "*"
        assert put["ChecksumSHA256"] == base64.b64encode(bytes.fromhex(doc.sha256)).decode()
        assert stored(client, public, key) == plaintext(doc.filename)
    assert release_row(services, release.id).state == PUBLISHED
    assert len(all_keys(client, public)) == documents + 1


def test_a_resumed_publication_accepts_its_own_earlier_object_by_head(
        tmp_path: Path, counted_services: tuple[Settings, Services],
        counted: tuple[Any, Calls], s3_buckets: Buckets) -> None:
    """An earlier attempt put a document (with its SHA-256): this attempt's
    create gets a 412, and the HEAD's matching SHA-256 counts as success."""
    settings, services = counted_services
    client, calls = counted
    release, plaintext = queue(services, tmp_path, letters=2)
    done = release.documents[1]
    key = f"site/{release.slug}/{done.filename}"
    put_out_of_band(client, s3_buckets.public, key, plaintext(done.filename))
    calls.seen.clear()
    outcome = publish_at_seed(settings, services, release.id)
    assert outcome.status == "published", outcome.detail
    assert calls.count("PutObject", s3_buckets.public, key) == 1  # answered 412
    assert calls.count("HeadObject", s3_buckets.public, key) == 1
    assert calls.count("GetObject", s3_buckets.public, key) == 0
    # the documents this attempt created are vouched for by their PUTs
    assert calls.count("HeadObject", s3_buckets.public) == 1


def test_another_object_with_its_own_sha256_fails_the_release_loudly(
        tmp_path: Path, counted_services: tuple[Settings, Services],
        counted: tuple[Any, Calls], s3_buckets: Buckets) -> None:
    settings, services = counted_services
    client, calls = counted
    release, _ = queue(services, tmp_path, letters=2)
    victim = release.documents[1]
    key = f"site/{release.slug}/{victim.filename}"
    put_out_of_band(client, s3_buckets.public, key, b"someone else's bytes")
    calls.seen.clear()
    outcome = publish_at_seed(settings, services, release.id)
    assert outcome.status in ("retry", "failed")
    assert "holds other content" in (outcome.detail or "")
    theirs = sha(b"someone else's bytes")
    assert f"sha256 {theirs[:12]}" in (outcome.detail or "")
    assert calls.count("GetObject", s3_buckets.public, key) == 0  # the HEAD's SHA-256 decided
    assert stored(client, s3_buckets.public, key) == b"someone else's bytes"
    assert release_row(services, release.id).state != PUBLISHED
    assert f"site/{release.slug}/manifest.json" not in all_keys(client, s3_buckets.public)


def test_publication_is_unchanged_for_a_store_without_checksums(
        tmp_path: Path, counted_services: tuple[Settings, Services],
        counted: tuple[Any, Calls], s3_buckets: Buckets) -> None:
    """The documents were put by an earlier attempt on a store that kept no
    SHA-256: every 412 is settled by reading the object back."""
    settings, services = counted_services
    client, calls = counted
    release, plaintext = queue(services, tmp_path, letters=2)
    for doc in release.documents:
        client.put_object(Bucket=s3_buckets.public, Key=f"site/{release.slug}/{doc.filename}",
                          Body=plaintext(doc.filename))
    calls.seen.clear()
    outcome = publish_at_seed(settings, services, release.id)
    assert outcome.status == "published", outcome.detail
    for doc in release.documents:
        key = f"site/{release.slug}/{doc.filename}"
        assert calls.count("HeadObject", s3_buckets.public, key) == 1
        assert calls.count("GetObject", s3_buckets.public, key) == 1
