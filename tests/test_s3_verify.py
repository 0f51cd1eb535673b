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
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from config.errors import NotFoundError
from config.settings import Settings
from jobs.app import build_services
from release.manifest import load_manifest
from release.records import PUBLISHED
from release.service import ReleaseService, Services
from storage.base import ObjectExistsError
from storage.s3 import PART_SIZE, S3PublicTarget, _whole_object_sha256
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
        client.meta.events.register("before-parameter-build.s3", self._record)

    def _record(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        self.seen.append((model.name, str(params.get("Bucket", "")),
                          str(params.get("Key", "")), str(params.get("ChecksumMode", ""))))

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


def test_publication_verifies_each_document_by_head_without_reading_it_back(
        tmp_path: Path, counted_services: tuple[Settings, Services],
        counted: tuple[Any, Calls], s3_buckets: Buckets) -> None:
    settings, services = counted_services
    client, calls = counted
    release, plaintext = queue(services, tmp_path, letters=3)
    calls.seen.clear()
    outcome = publish_at_seed(settings, services, release.id)
    assert outcome.status == "published", outcome.detail
    public = s3_buckets.public
    assert calls.count("GetObject", public) == 0
    for doc in release.documents:
        key = f"site/{release.slug}/{doc.filename}"
        assert calls.count("PutObject", public, key) == 1
        assert ("HeadObject", public, key, "ENABLED") in calls.seen
        assert stored(client, public, key) == plaintext(doc.filename)
    assert len(all_keys(client, public)) == len(release.documents) + 1


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
