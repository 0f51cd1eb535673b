"""S3 backends: the vault and the public target in buckets, through one boto3
client built at start by :func:`make_client` and passed in.

Writes are spooled to a temporary file (memory stays flat) and sent when the
block exits normally. The public target creates objects conditionally
(``If-None-Match: *``, on PutObject and on CompleteMultipartUpload), so a
second writer gets ObjectExistsError instead of replacing what is public.
Each object is put with its SHA-256 (``x-amz-checksum-sha256``), which S3
checks against the bytes it receives and keeps. ``publish_file`` sends a
staged document straight from its file and, with ``s3.verify = "checksum"``,
takes the SHA-256 the PUT returns as the store's account (one request per
document); ``stat`` asks with a HEAD, and reads the bytes back and hashes
them only when the store has no SHA-256 of the whole object (a multipart
upload's, or a store that keeps no checksums)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, BinaryIO, cast
from urllib.parse import quote, urlsplit

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from config.errors import ConfigError, NotFoundError, StorageError
from config.retry import S3_CREATE, RetryPolicy
from config.settings import Settings
from storage.base import (
    ObjectExistsError,
    PublicTarget,
    StagingArea,
    StoredObject,
    Vault,
    VaultEntry,
    check_key,
    hash_stream,
)

log = logging.getLogger(__name__)

MiB = 1 << 20
SPOOL_MAX = 1 * MiB  # bytes a writer keeps in memory before spilling to disk
PART_SIZE = 8 * MiB  # multipart part size; S3's minimum is 5 MiB
PART_CONCURRENCY = 4  # parts in flight per public multipart upload (sent from disk)
VAULT_PART_CONCURRENCY = 2  # s3transfer holds each part in memory: 2 x PART_SIZE
POOL_MIN = 32  # connections the client keeps, at least


class Verify(StrEnum):
    """How a published object is confirmed (``s3.verify``). CHECKSUM: by the
    SHA-256 that the create-only PUT returns, which a store that checks
    ``x-amz-checksum-sha256`` (AWS S3) confirmed against the bytes it
    received; HEAD: by a HEAD after every PUT, for stores that do not check
    the checksum sent."""

    CHECKSUM = "checksum"
    HEAD = "head"


_MISSING_KEY = frozenset({"NoSuchKey", "404", "NotFound"})
_DENIED = frozenset({"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId",
                     "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                     "AllAccessDisabled", "AccountProblem"})
_TRANSIENT = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                        "RequestTimeoutException", "InternalError", "ServiceUnavailable",
                        "RequestLimitExceeded", "TooManyRequestsException",
                        "PriorRequestNotComplete"})
_NETWORK = (EndpointConnectionError, ConnectionClosedError, ConnectTimeoutError, ReadTimeoutError)


def make_client(settings: Settings) -> Any:
    """The one S3 client: the standard credential chain (environment,
    profiles, instance or task roles), with the region, endpoint and
    addressing style from the ``s3.*`` settings.

    Its connection pool holds a connection for every request the node can
    have in flight at the instant (releases published at once, times the
    documents of each put at once): urllib3 closes a connection handed back
    to a full pool, and the next request pays a new one (a TLS handshake on
    AWS). botocore's own parameter validation stays on: switching it off
    saved no measurable time per request."""
    sched = settings.scheduler
    config = Config(
        s3={"addressing_style": settings.s3.addressing_style},
        retries={"mode": "standard", "max_attempts": 8},
        connect_timeout=5,
        read_timeout=60,
        max_pool_connections=max(POOL_MIN, sched.workers * sched.publish_workers),
        tcp_keepalive=True,
    )
    try:
        session = boto3.session.Session()
        return session.client("s3", region_name=settings.s3.region,
                              endpoint_url=settings.s3.endpoint_url, config=config)
    except (BotoCoreError, ValueError) as exc:
        raise ConfigError(f"cannot set up the S3 client: {exc}") from exc


def ensure_bucket(client: Any, bucket: str) -> bool:
    """Create ``bucket`` if it does not exist (for the demo and first set-up;
    the service itself never creates buckets). Returns True if it created it."""
    try:
        client.head_bucket(Bucket=bucket)
        return False
    except ClientError as exc:
        if _status(exc) != 404 and _code(exc) not in ("NoSuchBucket", "404", "NotFound"):
            raise StorageError(f"cannot use bucket {bucket}: {_problem(exc, bucket)}") from None
    except (BotoCoreError, *_NETWORK) as exc:
        raise StorageError(f"cannot use bucket {bucket}: {_problem(exc, bucket)}") from None
    region = client.meta.region_name
    extra = ({"CreateBucketConfiguration": {"LocationConstraint": region}}
             if region and region != "us-east-1" else {})
    try:
        client.create_bucket(Bucket=bucket, **extra)
    except ClientError as exc:
        if _code(exc) not in ("BucketAlreadyOwnedByYou",):
            raise StorageError(f"cannot create bucket {bucket}: {_problem(exc, bucket)}") from None
        return False
    return True


# -- errors --------------------------------------------------------------------------
def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _transient(exc: ClientError) -> bool:
    status = _status(exc)
    return _code(exc) in _TRANSIENT or status == 429 or status >= 500


def _problem(exc: Exception, bucket: str) -> str:
    """What went wrong, in words, for one line of an error message."""
    if isinstance(exc, NoCredentialsError):
        return ("no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE, or run with an instance or task role)")
    if isinstance(exc, EndpointConnectionError):
        return f"cannot reach the S3 endpoint {exc.kwargs.get('endpoint_url', '')}".rstrip()
    if not isinstance(exc, ClientError):
        return f"{type(exc).__name__}: {exc}"
    code = _code(exc)
    if code in ("NoSuchBucket", "404") or (code == "NotFound" and _status(exc) == 404):
        return f"bucket {bucket} does not exist"
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
        return f"the AWS credentials were refused ({code})"
    if code in _DENIED:
        return (f"access to bucket {bucket} denied: check the credentials and the bucket's "
                "policy")
    if code in ("301", "PermanentRedirect", "AuthorizationHeaderMalformed",
                "IllegalLocationConstraintException"):
        headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        region = headers.get("x-amz-bucket-region")
        where = f" ({region})" if region else ""
        return f"bucket {bucket} is in another region{where}: set s3.region"
    message = exc.response.get("Error", {}).get("Message") or ""
    return f"{code or _status(exc)} {message}".strip()


def _sha256_of(src: IO[bytes] | io.RawIOBase) -> bytes:
    """The raw SHA-256 of a seekable body, left rewound for the upload."""
    src.seek(0)
    found = hash_stream(cast(BinaryIO, src))
    src.seek(0)
    return bytes.fromhex(found.sha256)


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def _whole_object_sha256(head: dict[str, Any]) -> bytes | None:
    """The SHA-256 of the whole object that a HEAD with ``ChecksumMode``
    reports, or None when it reports none. A multipart upload's is a checksum
    of the parts' checksums, not of the object: S3 writes it ``…-N`` with
    ChecksumType COMPOSITE; moto writes neither, but a multipart object's
    ETag ends in ``-N`` on every store."""
    value = head.get("ChecksumSHA256")
    if not value or head.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT":
        return None
    if "-" in value or "-" in str(head.get("ETag", "")):
        return None
    try:
        digest = base64.b64decode(value, validate=True)
    except binascii.Error:
        return None
    return digest if len(digest) == 32 else None


def _is_composite(answer: dict[str, Any], composite: str) -> bool:
    """Whether a store's answer (CompleteMultipartUpload's, or a HEAD's)
    reports ``composite``, the checksum of the parts' checksums written
    ``<base64>-<parts>``. moto leaves out the ``-<parts>``; then the ETag's
    ``-<parts>`` must say the object has that many parts."""
    value = str(answer.get("ChecksumSHA256") or "")
    if value == composite:
        return True
    base, _, parts = composite.rpartition("-")
    return value == base and str(answer.get("ETag", "")).strip('"').endswith(f"-{parts}")


class _HashingWriter(io.BufferedIOBase):
    """The write-only stream a public writer hands out: what is written goes
    to the spool and through SHA-256, so the spool is not read again to hash
    it. Not seekable: what was hashed is what the spool holds."""

    def __init__(self, sink: IO[bytes]) -> None:
        super().__init__()
        self.sink = sink
        self.hasher = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sink.write(view)
        self.hasher.update(view)
        self.size += len(view)
        return len(view)


class _FileSlice(io.RawIOBase):
    """A read-only, seekable window ``[start, start + length)`` of an open
    file, read with ``os.pread``: several windows of one file can be sent
    from several threads at once, and botocore can rewind one to retry."""

    def __init__(self, fd: int, start: int, length: int) -> None:
        super().__init__()
        self.fd = fd
        self.start = start
        self.length = length
        self.position = 0

    def __len__(self) -> int:
        return self.length

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.length}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        count = min(len(view), self.length - self.position)
        if count <= 0:
            return 0
        data = os.pread(self.fd, count, self.start + self.position)
        view[: len(data)] = data
        self.position += len(data)
        return len(data)


# -- shared by both backends ------------------------------------------------------
class _S3Location:
    role = "storage"

    def __init__(self, client: Any, *, bucket: str, prefix: str) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(s3://{self.bucket}/{self.prefix})"

    def _name(self, key: str) -> str:
        check_key(key)
        return self.prefix + key

    def _error(self, exc: Exception, doing: str) -> StorageError:
        return StorageError(f"S3 {self.role}: cannot {doing} in s3://{self.bucket}: "
                            f"{_problem(exc, self.bucket)}")

    def _object_call(self, key: str, doing: str, method: Callable[..., Any],
                     **params: Any) -> Any:
        """One request about one object: a missing object is NotFoundError,
        any other failure a StorageError that says what was being done."""
        name = self._name(key)
        try:
            return method(Bucket=self.bucket, Key=name, **params)
        except ClientError as exc:
            if _code(exc) in _MISSING_KEY:
                raise NotFoundError(f"no stored object {key}") from None
            raise self._error(exc, f"{doing} {name}") from exc
        except BotoCoreError as exc:
            raise self._error(exc, f"{doing} {name}") from exc

    @contextmanager
    def _read(self, key: str) -> Iterator[BinaryIO]:
        response = self._object_call(key, "read", self.client.get_object)
        body = response["Body"]
        try:
            yield cast(BinaryIO, body)
        finally:
            body.close()

    def reader(self, key: str) -> AbstractContextManager[BinaryIO]:
        return self._read(key)

    def exists(self, key: str) -> bool:
        try:
            self._object_call(key, "look up", self.client.head_object)
        except NotFoundError:
            return False
        return True

    def delete(self, key: str) -> None:
        name = self._name(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=name)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, f"delete {name}") from exc

    def keys(self, prefix: str = "") -> Iterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for item in page.get("Contents", ()):
                    yield str(item["Key"])[len(self.prefix):]
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "list objects") from exc

    def check(self) -> None:
        where = f"s3://{self.bucket}/{self.prefix}"
        try:
            self.client.head_bucket(Bucket=self.bucket)
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"{self.role} {where}: {_problem(exc, self.bucket)}") from None
        log.debug("%s %s is reachable", self.role, where)


class S3Vault(_S3Location, Vault):
    role = "vault"

    def __init__(self, client: Any, *, bucket: str, prefix: str,
                 transfer: TransferConfig | None = None) -> None:
        super().__init__(client, bucket=bucket, prefix=prefix)
        if transfer is None:
            transfer = TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE,
                                      max_concurrency=VAULT_PART_CONCURRENCY, use_threads=True)
            # s3transfer reads each part into memory and by default keeps up to 10 of them
            transfer.max_in_memory_upload_chunks = VAULT_PART_CONCURRENCY
        self.transfer = transfer

    @contextmanager
    def _write(self, key: str) -> Iterator[BinaryIO]:
        name = self._name(key)
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_MAX) as spool:
            yield cast(BinaryIO, spool)
            spool.seek(0)
            try:
                self.client.upload_fileobj(spool, self.bucket, name, Config=self.transfer)
            except (ClientError, BotoCoreError, Boto3Error) as exc:
                raise self._error(exc, f"write {name}") from exc

    def writer(self, key: str) -> AbstractContextManager[BinaryIO]:
        return self._write(key)

    def size(self, key: str) -> int:
        return int(self._object_call(key, "look up", self.client.head_object)["ContentLength"])

    def entries(self, prefix: str = "") -> Iterator[VaultEntry]:
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for item in page.get("Contents", ()):
                    yield VaultEntry(key=str(item["Key"])[len(self.prefix):],
                                     size=int(item["Size"]), modified=item["LastModified"])
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "list objects") from exc

    def sweep_partials(self, older_than: datetime) -> tuple[int, int]:
        # A writer killed mid-upload leaves its multipart upload (and the parts'
        # storage, billed) until it is aborted.
        count = size = 0
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self.prefix)
            for page in pages:
                for upload in page.get("Uploads", ()):
                    if upload["Initiated"] >= older_than:
                        continue
                    parts = self.client.list_parts(Bucket=self.bucket, Key=upload["Key"],
                                                   UploadId=upload["UploadId"])
                    size += sum(int(part["Size"]) for part in parts.get("Parts", ()))
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                       UploadId=upload["UploadId"])
                    count += 1
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "remove unfinished uploads") from exc
        return count, size


class S3PublicTarget(_S3Location, PublicTarget):
    role = "public"

    def __init__(self, client: Any, *, bucket: str, prefix: str, base_url: str | None = None,
                 acl: str | None = None, cache_control: str | None = None,
                 multipart_threshold: int = PART_SIZE, part_size: int = PART_SIZE,
                 part_concurrency: int = PART_CONCURRENCY, attempts: int = 5,
                 retry: RetryPolicy = S3_CREATE,
                 sleep: Callable[[float], None] = time.sleep,
                 staging: Path | None = None, verify: Verify = Verify.CHECKSUM) -> None:
        super().__init__(client, bucket=bucket, prefix=prefix)
        self.staging = StagingArea(staging or Path(tempfile.gettempdir()) / "embargo-staging")
        self.base_url = base_url.rstrip("/") if base_url else None
        self.acl = acl or None
        self.cache_control = cache_control or None
        self.multipart_threshold = max(multipart_threshold, 1)
        self.part_size = part_size
        self.part_concurrency = max(part_concurrency, 1)
        self.attempts = max(attempts, 1)
        self.retry = retry
        self.sleep = sleep
        self.verify = Verify(verify)

    def writer(self, key: str, *, content_type: str) -> AbstractContextManager[BinaryIO]:
        return self._create(key, content_type)

    def url(self, key: str) -> str:
        path = quote(self._name(key), safe="/-_.~")
        if self.base_url:
            return f"{self.base_url}/{path}"
        endpoint = str(self.client.meta.endpoint_url).rstrip("/")
        style = (self.client.meta.config.s3 or {}).get("addressing_style") or "auto"
        parts = urlsplit(endpoint)
        aws = (parts.hostname or "").endswith(".amazonaws.com")
        if style == "virtual" or (style == "auto" and aws and "." not in self.bucket):
            return f"{parts.scheme}://{self.bucket}.{parts.netloc}/{path}"
        return f"{endpoint}/{quote(self.bucket)}/{path}"

    def stat(self, key: str) -> StoredObject:
        """Size and SHA-256 of the stored object: the SHA-256 that S3 checked
        the bytes against when they were put, from a HEAD; or, when the store
        has none for the whole object, the stored bytes read back and hashed.
        A missing checksum is never taken for a match."""
        head = self._object_call(key, "look up", self.client.head_object,
                                 ChecksumMode="ENABLED")
        digest = _whole_object_sha256(head)
        if digest is None:
            log.debug("s3://%s/%s has no whole-object SHA-256; reading it back", self.bucket,
                      self._name(key))
            return super().stat(key)
        return StoredObject(key=key, size=int(head["ContentLength"]), sha256=digest.hex())

    def publish_file(self, key: str, source: Path, *, content_type: str, size: int,
                     sha256: str) -> StoredObject:
        name = self._name(key)
        extra = self._extra(content_type, sha256)
        with source.open("rb") as src:
            sent = os.fstat(src.fileno()).st_size
            if sent != size:
                raise StorageError(f"staged {source.name} is {sent} bytes, not the {size} "
                                   f"verified; not publishing it at s3://{self.bucket}/{name}")
            if size > self.multipart_threshold:
                response, composite = self._multipart(key, name, src, size, extra,
                                                      expect_sha256=sha256)
                return self._parts_confirmed(key, response, composite, size, sha256)
            checksum = _b64(bytes.fromhex(sha256))
            response = self._put(name, src, checksum, extra)
        log.debug("created s3://%s/%s (%d bytes)", self.bucket, name, size)
        if self.verify is Verify.HEAD:
            return self.stat(key)
        confirmed = _whole_object_sha256(response)
        if confirmed is None:
            log.debug("s3://%s/%s: the PUT confirmed no SHA-256; asking with a HEAD",
                      self.bucket, name)
            return self.stat(key)
        if _b64(confirmed) != checksum:
            log.warning("s3://%s/%s: the PUT confirmed SHA-256 %s, not the %s sent; not "
                        "trusted, asking with a HEAD", self.bucket, name, confirmed.hex(),
                        sha256)
            return self.stat(key)
        return StoredObject(key=key, size=sent, sha256=confirmed.hex())

    def _parts_confirmed(self, key: str, response: dict[str, Any], composite: str, size: int,
                         sha256: str) -> StoredObject:
        """The account of an object put in parts from a file whose SHA-256
        was checked on the way: the store's checksum of its parts' checksums,
        if it is the one these parts make, from CompleteMultipartUpload's
        answer (unless verify is HEAD) or a HEAD; otherwise the bytes are
        read back."""
        if self.verify is Verify.CHECKSUM and _is_composite(response, composite):
            return StoredObject(key=key, size=size, sha256=sha256)
        head = self._object_call(key, "look up", self.client.head_object,
                                 ChecksumMode="ENABLED")
        if _is_composite(head, composite) and int(head["ContentLength"]) == size:
            return StoredObject(key=key, size=size, sha256=sha256)
        log.debug("s3://%s/%s: no checksum of its parts confirmed; reading it back",
                  self.bucket, self._name(key))
        return PublicTarget.stat(self, key)

    # -- the conditional create ----------------------------------------------------------
    def _extra(self, content_type: str, sha256: str) -> dict[str, Any]:
        extra: dict[str, Any] = {"ContentType": content_type, "Metadata": {"sha256": sha256}}
        if self.cache_control:
            extra["CacheControl"] = self.cache_control
        if self.acl:
            extra["ACL"] = self.acl
        return extra

    @contextmanager
    def _create(self, key: str, content_type: str) -> Iterator[BinaryIO]:
        name = self._name(key)
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_MAX) as spool:
            out = _HashingWriter(spool)
            yield cast(BinaryIO, out)
            size, digest = out.size, out.hasher.digest()
            extra = self._extra(content_type, digest.hex())
            if size <= self.multipart_threshold:
                self._put(name, spool, _b64(digest), extra)
            else:
                self._multipart(key, name, spool, size, extra)
            log.debug("created s3://%s/%s (%d bytes)", self.bucket, name, size)

    def _put(self, name: str, body: IO[bytes], checksum: str,
             extra: dict[str, Any]) -> dict[str, Any]:
        """One conditional PutObject of ``body`` (rewound for each attempt);
        returns the response, with the checksum the store confirmed."""
        def put() -> dict[str, Any]:
            body.seek(0)
            # ChecksumAlgorithm as well: without it moto keeps no checksum
            return cast(dict[str, Any], self.client.put_object(
                Bucket=self.bucket, Key=name, Body=body, IfNoneMatch="*",
                ChecksumAlgorithm="SHA256", ChecksumSHA256=checksum, **extra))

        return self._conditional(name, put)

    def _multipart(self, key: str, name: str, spool: IO[bytes], size: int,
                   extra: dict[str, Any], *, expect_sha256: str | None = None
                   ) -> tuple[dict[str, Any], str]:
        """Create the object from ``size`` bytes of ``spool`` in parts; with
        ``expect_sha256``, the whole file is hashed while the parts go up and
        the upload is aborted, before anything is visible, unless it matches.
        Returns CompleteMultipartUpload's response and the composite SHA-256
        (``<base64>-<parts>``, S3's checksum of the parts' checksums) that
        the store should report for these parts."""
        if self.exists(key):  # cheap; spares re-sending a large document that is there
            raise ObjectExistsError(f"s3://{self.bucket}/{name}")
        try:
            upload_id = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=name, ChecksumAlgorithm="SHA256", **extra)["UploadId"]
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, f"start uploading {name}") from exc
        try:
            parts = self._parts(name, upload_id, spool, size, expect_sha256)
            response = self._conditional(name, lambda: self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=name, UploadId=upload_id,
                MultipartUpload={"Parts": parts}, IfNoneMatch="*"))
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=name,
                                                   UploadId=upload_id)
            except (ClientError, BotoCoreError) as exc:
                log.warning("could not abort the multipart upload of s3://%s/%s: %s",
                            self.bucket, name, exc)
            raise
        digests = b"".join(base64.b64decode(part["ChecksumSHA256"]) for part in parts)
        return response, f"{_b64(hashlib.sha256(digests).digest())}-{len(parts)}"

    def _parts(self, name: str, upload_id: str, spool: IO[bytes], size: int,
               expect_sha256: str | None = None) -> list[dict[str, Any]]:
        """Upload the parts, ``part_concurrency`` at a time. Each part is sent
        from the spool file itself (a window read with pread), so memory does
        not grow with the part size or the number of parts in flight."""
        spool.flush()
        fd = spool.fileno()  # a SpooledTemporaryFile rolls over to disk here
        slices = [(number, start, min(self.part_size, size - start))
                  for number, start in enumerate(range(0, size, self.part_size), start=1)]
        with ThreadPoolExecutor(max_workers=self.part_concurrency + 1,
                                thread_name_prefix="s3-part") as pool:
            whole = (pool.submit(_sha256_of, _FileSlice(fd, 0, size))
                     if expect_sha256 is not None else None)
            futures = [pool.submit(self._part, name, upload_id, number, fd, start, length)
                       for number, start, length in slices]
            try:
                parts = [future.result() for future in futures]
                if whole is not None and whole.result().hex() != expect_sha256:
                    raise StorageError(f"the file sent as s3://{self.bucket}/{name} is not "
                                       "the one verified (its SHA-256 differs); not "
                                       "completing the upload")
                return parts
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    def _part(self, name: str, upload_id: str, number: int, fd: int, start: int,
              length: int) -> dict[str, Any]:
        body = _FileSlice(fd, start, length)
        checksum = _b64(_sha256_of(body))
        try:
            response = self.client.upload_part(
                Bucket=self.bucket, Key=name, UploadId=upload_id, PartNumber=number,
                Body=body, ChecksumSHA256=checksum)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, f"upload part {number} of {name}") from exc
        return {"PartNumber": number, "ETag": response["ETag"], "ChecksumSHA256": checksum}

    def _conditional(self, name: str, call: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run a conditional create; returns its response. 412:
        ObjectExistsError. 409 (a concurrent conditional write), throttling,
        5xx and network errors: retried with full-jitter backoff, on top of
        botocore's own retries."""
        for attempt in range(1, self.attempts + 1):
            try:
                return call()
            except ClientError as exc:
                if _code(exc) == "PreconditionFailed" or _status(exc) == 412:
                    raise ObjectExistsError(f"s3://{self.bucket}/{name}") from None
                if _code(exc) == "NoSuchUpload" and attempt > 1:
                    # a retried CompleteMultipartUpload whose first try went
                    # through: the caller's read-back decides, as for a 412
                    raise ObjectExistsError(f"s3://{self.bucket}/{name}") from None
                retry = (_code(exc) == "ConditionalRequestConflict" or _status(exc) == 409
                         or _transient(exc))
                if not retry or attempt == self.attempts:
                    raise self._error(exc, f"publish {name}") from exc
                reason = _code(exc) or str(_status(exc))
            except _NETWORK as exc:
                if attempt == self.attempts:
                    raise self._error(exc, f"publish {name}") from exc
                reason = type(exc).__name__
            except BotoCoreError as exc:
                raise self._error(exc, f"publish {name}") from exc
            delay = self.retry.seconds(attempt)
            log.warning("S3 %s creating s3://%s/%s; retry %d of %d in %.2f s", reason,
                        self.bucket, name, attempt, self.attempts - 1, delay)
            self.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")
