"""S3 under faults, against the real moto server: a small fault-injecting HTTP
proxy sits between boto3 and the server and answers chosen requests with
503, 409, 403 or silence; the exactly-once rules of publication hold; large
objects go up and come down with flat memory; and a seed-shaped bundle is
published through S3 with every object verified."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest

from config.errors import StorageError
from config.retry import RetryPolicy
from config.settings import Settings, load_settings
from jobs.app import build_services
from release import keys as keyfile
from release.keys import load_private_key
from release.manifest import load_manifest
from release.publishing import Publisher
from release.records import PUBLISHED
from release.service import ReleaseService, Services
from storage.base import ObjectExistsError
from storage.s3 import S3PublicTarget, S3Vault
from tests.conftest import SEED_INSTANT, FakeClock, release_row, write_bundle

if TYPE_CHECKING:
    from tests.s3server import Buckets


ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
       "proxy-connection", "content-length"}


# -- the fault-injecting proxy ---------------------------------------------------------
@dataclasses.dataclass
class Fault:
    """Answer the next ``times`` requests that match with ``status``/``code``.
    ``after_forwarding``: the server does the work, the client sees the
    fault (a lost response). ``hold``: say nothing for that many seconds,
    then drop the connection (a timeout). ``edit``: relay the server's
    answer with these response headers replaced (None: removed), e.g. a
    store that reports another checksum than the one it was sent."""

    method: str
    path_contains: str = ""
    query_contains: str = ""
    status: int = 503
    code: str = "SlowDown"
    times: int = 1
    after_forwarding: bool = False
    hold: float = 0.0
    edit: dict[str, str | None] | None = None

    def matches(self, method: str, path: str, query: str) -> bool:
        return (self.times > 0 and method == self.method and self.path_contains in path
                and self.query_contains in query)


@dataclasses.dataclass(frozen=True)
class Seen:
    method: str
    path: str
    query: str
    faulted: int | None  # the injected status, or None when relayed


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        target = urlsplit(upstream)
        self.upstream = (target.hostname or "127.0.0.1", target.port or 80)
        self.faults: list[Fault] = []
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def inject(self, fault: Fault) -> Fault:
        with self.lock:
            self.faults.append(fault)
        return fault

    def requests(self, method: str, path_contains: str = "",
                 query_contains: str = "") -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.method == method and path_contains in s.path
                    and query_contains in s.query]

    def _take(self, method: str, path: str, query: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.matches(method, path, query):
                    fault.times -= 1
                    return fault
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    data = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(data)
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _relay(self) -> None:
                path, _, query = self.path.partition("?")
                body = self._body()
                fault = proxy._take(self.command, path, query)
                edit = fault.edit if fault is not None else None
                with proxy.lock:
                    proxy.seen.append(Seen(self.command, path, query,
                                           fault.status if fault and edit is None else None))
                if fault is not None and fault.hold:
                    time.sleep(fault.hold)
                    self.close_connection = True
                    return
                if fault is None or fault.after_forwarding or edit is not None:
                    status, headers, answer = self._forward(body)
                if edit is not None:
                    headers = [(n, v) for n, v in headers if n.lower() not in edit]
                    headers += [(n, v) for n, v in edit.items() if v is not None]
                elif fault is not None:
                    status, headers, answer = self._fault(fault)
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in HOP:
                        self.send_header(name, value)
                length = next((v for n, v in headers if n.lower() == "content-length"), None)
                if self.command == "HEAD" and length is not None:
                    self.send_header("Content-Length", length)
                else:
                    self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(answer)

            def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
                connection = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                    headers["Content-Length"] = str(len(body))
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    return response.status, response.getheaders(), response.read()
                finally:
                    connection.close()

            def _fault(self, fault: Fault) -> tuple[int, list[tuple[str, str]], bytes]:
                xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{fault.code}</Code>'
                       f"<Message>injected by the test proxy</Message></Error>").encode()
                return fault.status, [("Content-Type", "application/xml")], xml

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _relay

        return Handler


@pytest.fixture
def proxy(s3_server: str) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server) as running:
        yield running


@pytest.fixture
def proxied(proxy: FaultProxy, s3_client_for: Callable[..., Any]) -> Any:
    """A client that talks to the moto server through the proxy."""
    return s3_client_for(proxy.endpoint)


def target_on(client: Any, bucket: str, **kw: Any) -> S3PublicTarget:
    return S3PublicTarget(client, bucket=bucket, prefix="site/", base_url=None, acl=None,
                          cache_control="public, max-age=300", **kw)


def stored(client: Any, bucket: str, key: str) -> bytes:
    return bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())


def all_keys(client: Any, bucket: str) -> list[str]:
    return [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]


# -- 503, lost responses, timeouts -----------------------------------------------------
def test_a_503_on_one_put_is_retried_and_stored_once(
        proxy: FaultProxy, proxied: Any, s3_client: Any, s3_buckets: Buckets) -> None:
    proxy.inject(Fault("PUT", path_contains="/site/slug/a.txt", status=503, code="SlowDown"))
    target = target_on(proxied, s3_buckets.public)
    with target.writer("slug/a.txt", content_type="text/plain") as out:
        out.write(b"published once")
    puts = proxy.requests("PUT", "/site/slug/a.txt")
    assert [p.faulted for p in puts] == [503, None]
    assert stored(s3_client, s3_buckets.public, "site/slug/a.txt") == b"published once"
    assert all_keys(s3_client, s3_buckets.public) == ["site/slug/a.txt"]


def test_a_503_on_a_vault_put_is_retried(proxy: FaultProxy, proxied: Any, s3_client: Any,
                                         s3_buckets: Buckets) -> None:
    proxy.inject(Fault("PUT", path_contains="/sealed/d.emb", status=500, code="InternalError"))
    S3Vault(proxied, bucket=s3_buckets.vault, prefix="sealed").put_bytes("d.emb", b"EMB1...")
    assert [p.faulted for p in proxy.requests("PUT", "/sealed/d.emb")] == [500, None]
    assert stored(s3_client, s3_buckets.vault, "sealed/d.emb") == b"EMB1..."


def test_a_lost_response_after_a_successful_put_is_not_a_second_write(
        proxy: FaultProxy, proxied: Any, s3_client: Any, s3_buckets: Buckets) -> None:
    """The server stored the object but the client saw a 503: botocore retries
    the conditional put, the server answers 412, and the caller's check
    (stat) finds its own bytes (what the publisher counts as success)."""
    proxy.inject(Fault("PUT", path_contains="/site/slug/a.txt", after_forwarding=True))
    target = target_on(proxied, s3_buckets.public)
    with pytest.raises(ObjectExistsError), \
            target.writer("slug/a.txt", content_type="text/plain") as out:
        out.write(b"ours")
    assert [p.faulted for p in proxy.requests("PUT", "/site/slug/a.txt")] == [503, None]
    assert target.stat("slug/a.txt").sha256 == hashlib.sha256(b"ours").hexdigest()


def test_a_timeout_is_retried(proxy: FaultProxy, s3_client_for: Callable[..., Any],
                              s3_client: Any, s3_buckets: Buckets) -> None:
    client = s3_client_for(proxy.endpoint, read_timeout=0.5, connect_timeout=1)
    proxy.inject(Fault("PUT", path_contains="/site/slug/t.txt", hold=1.0))
    with target_on(client, s3_buckets.public).writer("slug/t.txt",
                                                     content_type="text/plain") as out:
        out.write(b"in time")
    assert len(proxy.requests("PUT", "/site/slug/t.txt")) == 2
    assert stored(s3_client, s3_buckets.public, "site/slug/t.txt") == b"in time"


def test_retries_are_bounded(proxy: FaultProxy, s3_client_for: Callable[..., Any],
                             s3_buckets: Buckets) -> None:
    # botocore's "max_attempts" counts retries: 1 means two requests per call
    client = s3_client_for(proxy.endpoint, retries={"mode": "standard", "max_attempts": 1})
    proxy.inject(Fault("PUT", path_contains="/site/slug/never.txt", times=100))
    target = target_on(client, s3_buckets.public, attempts=3,
                       retry=RetryPolicy(base=0.01, cap=0.01))
    with pytest.raises(StorageError, match=r"cannot publish site/slug/never.txt .*SlowDown"), \
            target.writer("slug/never.txt", content_type="text/plain") as out:
        out.write(b"x")
    assert len(proxy.requests("PUT", "/site/slug/never.txt")) == 2 * 3
    assert not target.exists("slug/never.txt")


# -- 409 and 412 -------------------------------------------------------------------------
def test_a_409_conditional_conflict_is_retried(
        proxy: FaultProxy, proxied: Any, s3_client: Any, s3_buckets: Buckets) -> None:
    proxy.inject(Fault("PUT", path_contains="/site/slug/c.txt", status=409,
                       code="ConditionalRequestConflict", times=2))
    slept: list[float] = []
    target = target_on(proxied, s3_buckets.public, sleep=slept.append)
    with target.writer("slug/c.txt", content_type="text/plain") as out:
        out.write(b"after two conflicts")
    assert [p.faulted for p in proxy.requests("PUT", "/site/slug/c.txt")] == [409, 409, None]
    assert len(slept) == 2 and all(0 <= s <= 0.05 * 2 ** (i + 1) for i, s in enumerate(slept))
    assert stored(s3_client, s3_buckets.public, "site/slug/c.txt") == b"after two conflicts"


def test_a_409_on_complete_multipart_upload_is_retried(
        proxy: FaultProxy, proxied: Any, s3_client: Any, s3_buckets: Buckets) -> None:
    proxy.inject(Fault("POST", path_contains="/site/slug/big.bin", query_contains="uploadId=",
                       status=409, code="ConditionalRequestConflict"))
    target = target_on(proxied, s3_buckets.public, multipart_threshold=5 * MiB,
                       part_size=5 * MiB, sleep=lambda _: None)
    data = os.urandom(6 * MiB)
    with target.writer("slug/big.bin", content_type="application/octet-stream") as out:
        out.write(data)
    completes = proxy.requests("POST", "/site/slug/big.bin", "uploadId=")
    assert [c.faulted for c in completes] == [409, None]
    assert stored(s3_client, s3_buckets.public, "site/slug/big.bin") == data


def test_a_lost_response_to_complete_multipart_upload(
        proxy: FaultProxy, proxied: Any, s3_client: Any, s3_buckets: Buckets) -> None:
    """The server completed the upload but the client saw a 503: the retried
    CompleteMultipartUpload is answered as a success (moto) or NoSuchUpload
    (counted as "already there"); either way one object, with our bytes."""
    proxy.inject(Fault("POST", path_contains="/site/slug/big.bin", query_contains="uploadId=",
                       after_forwarding=True))
    target = target_on(proxied, s3_buckets.public, multipart_threshold=5 * MiB,
                       part_size=5 * MiB)
    data = os.urandom(6 * MiB)
    try:
        with target.writer("slug/big.bin", content_type="application/octet-stream") as out:
            out.write(data)
    except ObjectExistsError:
        pass
    completes = proxy.requests("POST", "/site/slug/big.bin", "uploadId=")
    assert [c.faulted for c in completes] == [503, None]
    assert target.stat("slug/big.bin").sha256 == hashlib.sha256(data).hexdigest()
    assert all_keys(s3_client, s3_buckets.public) == ["site/slug/big.bin"]


def test_a_412_with_a_mismatching_object_keeps_the_old_one(
        proxy: FaultProxy, proxied: Any, s3_client: Any, s3_buckets: Buckets) -> None:
    s3_client.put_object(Bucket=s3_buckets.public, Key="site/slug/r.txt", Body=b"old content")
    target = target_on(proxied, s3_buckets.public)
    with pytest.raises(ObjectExistsError), \
            target.writer("slug/r.txt", content_type="text/plain") as out:
        out.write(b"new content")
    puts = proxy.requests("PUT", "/site/slug/r.txt")
    assert len(puts) == 1  # a 412 is an answer, not something to retry
    assert stored(s3_client, s3_buckets.public, "site/slug/r.txt") == b"old content"
    assert target.stat("slug/r.txt").sha256 != hashlib.sha256(b"new content").hexdigest()


# -- verification by HEAD --------------------------------------------------------------------
def test_stat_is_one_head_and_a_503_on_it_is_retried(
        proxy: FaultProxy, proxied: Any, s3_buckets: Buckets) -> None:
    target = target_on(proxied, s3_buckets.public)
    with target.writer("slug/v.txt", content_type="text/plain") as out:
        out.write(b"verified by its checksum")
    proxy.inject(Fault("HEAD", path_contains="/site/slug/v.txt", status=503, code="SlowDown"))
    found = target.stat("slug/v.txt")
    assert found.sha256 == hashlib.sha256(b"verified by its checksum").hexdigest()
    assert found.size == len(b"verified by its checksum")
    assert [h.faulted for h in proxy.requests("HEAD", "/site/slug/v.txt")] == [503, None]
    assert proxy.requests("GET", "/site/slug/v.txt") == []  # the body was not read back


def test_a_refused_head_is_an_error_not_a_read_back(
        proxy: FaultProxy, proxied: Any, s3_buckets: Buckets) -> None:
    target = target_on(proxied, s3_buckets.public)
    with target.writer("slug/d.txt", content_type="text/plain") as out:
        out.write(b"x")
    proxy.inject(Fault("HEAD", path_contains="/site/slug/d.txt", status=403, code="AccessDenied"))
    with pytest.raises(StorageError,
                       match=r"cannot look up site/slug/d\.txt .*access to bucket .* denied"):
        target.stat("slug/d.txt")
    assert proxy.requests("GET", "/site/slug/d.txt") == []


# -- publish_file: the PUT's checksum, trusted only when it is ours ---------------------------
def staged(tmp_path: Path, data: bytes) -> tuple[Path, str]:
    path = tmp_path / "staged.bin"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


OTHER_SHA256 = base64.b64encode(hashlib.sha256(b"someone else's bytes").digest()).decode()


@pytest.mark.parametrize("returned", [OTHER_SHA256, None], ids=["other", "missing"])
def test_a_put_that_confirms_another_or_no_checksum_is_not_trusted(
        tmp_path: Path, proxy: FaultProxy, proxied: Any, s3_client: Any, s3_buckets: Buckets,
        returned: str | None) -> None:
    """The store answers the PUT with another SHA-256 than the one sent, or
    none: publish_file does not vouch for the object; it asks with a HEAD
    (which here, unedited, reports the true one)."""
    source, digest = staged(tmp_path, b"published bytes")
    proxy.inject(Fault("PUT", path_contains="/site/slug/a.txt",
                       edit={"x-amz-checksum-sha256": returned}))
    found = target_on(proxied, s3_buckets.public).publish_file(
        "slug/a.txt", source, content_type="text/plain", size=15, sha256=digest)
    assert (found.size, found.sha256) == (15, digest)
    assert len(proxy.requests("PUT", "/site/slug/a.txt")) == 1
    assert len(proxy.requests("HEAD", "/site/slug/a.txt")) == 1
    assert stored(s3_client, s3_buckets.public, "site/slug/a.txt") == b"published bytes"


def test_a_store_that_reports_other_content_fails_the_release(
        tmp_path: Path, proxy: FaultProxy, proxied: Any, s3_buckets: Buckets,
        s3_client: Any) -> None:
    """PUT and HEAD both report someone else's SHA-256 for one document: the
    release is not published, no manifest, and the error says so."""
    settings = s3_settings(tmp_path, proxy.endpoint, s3_buckets)
    services = build_services(settings, s3_client=proxied,
                              clock=FakeClock(datetime(2014, 9, 1, tzinfo=UTC)))
    try:
        release = ReleaseService(services, actor="comms").queue(
            load_manifest(write_bundle(tmp_path / "bundle", letters=2)))
        victim = f"/site/{release.slug}/{release.documents[1].filename}"
        for method in ("PUT", "HEAD"):
            proxy.inject(Fault(method, path_contains=victim, times=5,
                               edit={"x-amz-checksum-sha256": OTHER_SHA256}))
        outcome = publish_at_seed(settings, services, release.id)
        assert outcome.status in ("retry", "failed")
        assert "holds other content" in (outcome.detail or "")
        assert release_row(services, release.id).state != PUBLISHED
    finally:
        services.engine.dispose()
    # publish_file's HEAD, then the failure's account of which documents are public
    assert len(proxy.requests("HEAD", victim)) == 2
    assert f"site/{release.slug}/manifest.json" not in all_keys(s3_client, s3_buckets.public)


def test_publish_file_after_a_lost_response_is_settled_by_the_publishers_stat(
        tmp_path: Path, proxy: FaultProxy, proxied: Any, s3_client: Any,
        s3_buckets: Buckets) -> None:
    """The PUT went through but its answer was lost: botocore's retry gets a
    412, publish_file says ObjectExistsError, and stat (the publisher's next
    step) finds our bytes: one object, written once."""
    source, digest = staged(tmp_path, b"once")
    proxy.inject(Fault("PUT", path_contains="/site/slug/a.txt", after_forwarding=True))
    target = target_on(proxied, s3_buckets.public)
    with pytest.raises(ObjectExistsError):
        target.publish_file("slug/a.txt", source, content_type="text/plain", size=4,
                            sha256=digest)
    assert [p.faulted for p in proxy.requests("PUT", "/site/slug/a.txt")] == [503, None]
    assert target.stat("slug/a.txt").sha256 == digest
    assert all_keys(s3_client, s3_buckets.public) == ["site/slug/a.txt"]


def test_publish_file_resends_the_whole_staged_file_after_a_503(
        tmp_path: Path, proxy: FaultProxy, proxied: Any, s3_client: Any,
        s3_buckets: Buckets) -> None:
    data = os.urandom(300 * 1024)
    source, digest = staged(tmp_path, data)
    proxy.inject(Fault("PUT", path_contains="/site/slug/b.bin", status=503, code="SlowDown"))
    found = target_on(proxied, s3_buckets.public).publish_file(
        "slug/b.bin", source, content_type="application/octet-stream", size=len(data),
        sha256=digest)
    assert found.sha256 == digest
    assert [p.faulted for p in proxy.requests("PUT", "/site/slug/b.bin")] == [503, None]
    assert proxy.requests("HEAD", "/site/slug/b.bin") == []
    assert stored(s3_client, s3_buckets.public, "site/slug/b.bin") == data


def test_parts_whose_checksum_the_store_does_not_confirm_are_read_back(
        tmp_path: Path, proxy: FaultProxy, proxied: Any, s3_buckets: Buckets) -> None:
    """The HEAD after a multipart upload reports another checksum of the
    parts than ours: not trusted; the object is read back and hashed."""
    data = os.urandom(6 * MiB)
    source, digest = staged(tmp_path, data)
    proxy.inject(Fault("HEAD", path_contains="/site/slug/big.bin", times=2,
                       edit={"x-amz-checksum-sha256": f"{OTHER_SHA256}-2"}))
    target = target_on(proxied, s3_buckets.public, multipart_threshold=5 * MiB,
                       part_size=5 * MiB)
    found = target.publish_file("slug/big.bin", source, content_type="application/pdf",
                                size=len(data), sha256=digest)
    assert (found.size, found.sha256) == (len(data), digest)
    assert len(proxy.requests("GET", "/site/slug/big.bin")) == 1


# -- access errors at start ----------------------------------------------------------------
@pytest.mark.parametrize(("method", "status", "code", "words"), [
    ("HEAD", 403, "Forbidden", "access to bucket {bucket} denied"),
    ("GET", 403, "InvalidAccessKeyId", "the AWS credentials were refused"),
    ("GET", 403, "SignatureDoesNotMatch", "the AWS credentials were refused"),
])
def test_check_names_refused_access(proxy: FaultProxy, proxied: Any, s3_buckets: Buckets,
                                    method: str, status: int, code: str, words: str) -> None:
    proxy.inject(Fault(method, path_contains=f"/{s3_buckets.vault}", status=status, code=code))
    with pytest.raises(StorageError) as caught:
        S3Vault(proxied, bucket=s3_buckets.vault, prefix="sealed/").check()
    message = str(caught.value)
    assert message.startswith(f"vault s3://{s3_buckets.vault}/sealed/: ")
    assert words.format(bucket=s3_buckets.vault) in message
    assert "\n" not in message and "Traceback" not in message


# -- flat memory -----------------------------------------------------------------------------
CHILD = r"""
import hashlib, json, pathlib, sys, time
import boto3
from botocore.config import Config
from storage.s3 import S3PublicTarget, S3Vault

endpoint, vault_bucket, public_bucket, size_mib = sys.argv[1:5]
size = int(size_mib) << 20
client = boto3.session.Session().client(
    "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="t",
    aws_secret_access_key="t",
    config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard"}))
vault = S3Vault(client, bucket=vault_bucket, prefix="sealed/")
public = S3PublicTarget(client, bucket=public_bucket, prefix="site/")

def status(field):
    with open("/proc/self/status") as lines:
        for line in lines:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    raise LookupError(field)

# Peak RSS of this process. Not ru_maxrss: on Linux a child's ru_maxrss
# starts at its parent's RSS at fork (it survives exec), so it would report
# pytest's size. VmHWM belongs to this program's memory map, and writing 5
# to clear_refs resets it to the current RSS.
def reset_peak():
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")

def peak():
    return status("VmHWM")

def chunks():
    block = hashlib.sha256(b"seed").digest() * (1 << 15)  # 1 MiB
    for i in range(size >> 20):
        yield block[i % 32:] + block[:i % 32]

vault.put_bytes("warm.emb", b"w")  # load the code paths before measuring
with vault.reader("warm.emb") as src:
    src.read()
with public.writer("warm.txt", content_type="text/plain") as out:
    out.write(b"w")
public.stat("warm.txt")
phases = {}
timings = {}

def measure(name, step):
    reset_peak()
    base = status("VmRSS")
    started = time.monotonic()
    result = step()
    timings[name] = time.monotonic() - started
    phases[name] = peak() - base
    return result

def vault_put():
    digest = hashlib.sha256()
    with vault.writer("big.emb") as out:
        for chunk in chunks():
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()

def vault_get():
    back = hashlib.sha256()
    with vault.reader("big.emb") as src:
        while block := src.read(1 << 20):
            back.update(block)
    return back.hexdigest()

def public_put():
    with public.writer("big.bin", content_type="application/octet-stream") as out:
        for chunk in chunks():
            out.write(chunk)

def public_publish_file():
    return public.publish_file("staged.bin", staged, content_type="application/octet-stream",
                               size=size, sha256=expected)

expected = measure("vault_put", vault_put)
got = measure("vault_get", vault_get)
measure("public_put", public_put)
stat = measure("public_stat", lambda: public.stat("big.bin"))
staged = pathlib.Path(sys.argv[5])
with staged.open("wb") as out:
    for chunk in chunks():
        out.write(chunk)
published = measure("public_publish_file", public_publish_file)
print(json.dumps({
    "end_mib": status("VmRSS"), "growth_mib": max(phases.values()), "phases": phases,
    "timings": timings,
    "sha_ok": got == expected and stat.sha256 == expected and stat.size == size
              and published.sha256 == expected and published.size == size}))
"""


@pytest.mark.slow
def test_large_objects_keep_memory_flat(s3_server: str, s3_buckets: Buckets,
                                        tmp_path: Path) -> None:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("measuring peak RSS needs Linux's /proc/self/clear_refs")
    size_mib = int(os.environ.get("LARGE_OBJECT_MIB", "256"))
    done = subprocess.run(
        [sys.executable, "-c", CHILD, s3_server, s3_buckets.vault, s3_buckets.public,
         str(size_mib), str(tmp_path / "staged.bin")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    steps = ", ".join(f"{name} +{figures['phases'][name]:.1f} MiB in {seconds:.2f} s"
                      for name, seconds in figures["timings"].items())
    print(f"\n{size_mib} MiB through the S3 vault and public target: peak RSS growth "
          f"{figures['growth_mib']:.1f} MiB ({steps}; RSS at the end "
          f"{figures['end_mib']:.1f} MiB)")
    assert figures["sha_ok"]
    assert figures["growth_mib"] < 64


# -- publication end to end through S3 ----------------------------------------------------
def s3_settings(tmp_path: Path, endpoint: str, buckets: Buckets,
                verify: str = "checksum") -> Settings:
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    settings = load_settings(environ={}, overrides={
        "data_dir": str(data_dir), "storage.vault": f"s3://{buckets.vault}/sealed",
        "storage.public": f"s3://{buckets.public}/site", "s3.endpoint_url": endpoint,
        "s3.addressing_style": "path", "s3.acl": "public-read", "s3.verify": verify})
    keyfile.init_keys(settings.keys_dir)
    return settings


@pytest.fixture
def s3_services(tmp_path: Path, s3_server: str, s3_buckets: Buckets,
                s3_client: Any) -> Iterator[tuple[Settings, Services]]:
    settings = s3_settings(tmp_path, s3_server, s3_buckets)
    services = build_services(settings, s3_client=s3_client,
                              clock=FakeClock(datetime(2014, 9, 1, tzinfo=UTC)))
    assert isinstance(services.vault, S3Vault) and isinstance(services.public, S3PublicTarget)
    yield settings, services
    services.engine.dispose()


def publish_at_seed(settings: Settings, services: Services, release_id: str) -> Any:
    at_instant = dataclasses.replace(services, clock=FakeClock(SEED_INSTANT))
    publisher = Publisher(at_instant, load_private_key(settings.keys_dir), claimant="s3-node")
    return publisher.publish(release_id)


def test_seed_shaped_bundle_published_through_s3_every_object_verified(
        tmp_path: Path, s3_services: tuple[Settings, Services], s3_client: Any,
        s3_buckets: Buckets) -> None:
    settings, services = s3_services
    bundle = write_bundle(tmp_path / "bundle", letters=43, report_bytes=os.urandom(5 * MiB),
                          letter_bytes=100 * 1024)
    release = ReleaseService(services, actor="comms").queue(load_manifest(bundle))
    sealed = all_keys(s3_client, s3_buckets.vault)
    assert len(sealed) == 44 + 1 and all(k.startswith("sealed/releases/") for k in sealed)
    assert all_keys(s3_client, s3_buckets.public) == []
    started = time.monotonic()
    outcome = publish_at_seed(settings, services, release.id)
    elapsed = time.monotonic() - started
    assert outcome.status == "published", outcome.detail
    print(f"\npublished 5 MiB + 43 x 100 KiB through S3 (moto) in {elapsed:.2f} s")
    done = release_row(services, release.id)
    assert done.state == PUBLISHED
    for doc in done.documents:
        key = f"site/{done.slug}/{doc.filename}"
        body = stored(s3_client, s3_buckets.public, key)
        assert hashlib.sha256(body).hexdigest() == doc.sha256
        head = s3_client.head_object(Bucket=s3_buckets.public, Key=key)
        assert head["ContentType"] == doc.content_type
        assert head["Metadata"]["sha256"] == doc.sha256
        assert doc.public_url == services.public.url(f"{done.slug}/{doc.filename}")
    manifest = json.loads(stored(s3_client, s3_buckets.public,
                                 f"site/{done.slug}/manifest.json"))
    assert [d["sha256"] for d in manifest["documents"]] == [d.sha256 for d in done.documents]
    assert len(all_keys(s3_client, s3_buckets.public)) == 44 + 1


def test_a_mismatching_object_at_a_public_key_fails_the_release_loudly(
        tmp_path: Path, s3_services: tuple[Settings, Services], s3_client: Any,
        s3_buckets: Buckets) -> None:
    settings, services = s3_services
    bundle = write_bundle(tmp_path / "bundle", letters=2)
    release = ReleaseService(services, actor="comms").queue(load_manifest(bundle))
    victim = release.documents[1]
    key = f"site/{release.slug}/{victim.filename}"
    s3_client.put_object(Bucket=s3_buckets.public, Key=key, Body=b"someone else's bytes")
    outcome = publish_at_seed(settings, services, release.id)
    assert outcome.status in ("retry", "failed")
    assert "holds other content" in (outcome.detail or "")
    assert stored(s3_client, s3_buckets.public, key) == b"someone else's bytes"
    after = release_row(services, release.id)
    assert after.state != PUBLISHED
    assert f"site/{release.slug}/manifest.json" not in all_keys(s3_client, s3_buckets.public)
