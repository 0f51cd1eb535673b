"""A real S3-protocol server for the tests: moto's server mode, started once per
session in its own process on a free loopback port, reached over HTTP through
boto3 like any S3 endpoint. No in-process ``mock_aws``, no patching.

A pytest plugin: register it with ``pytest_plugins = ["tests.s3server"]``.
Without moto the S3 tests skip, or fail when ``CI`` is set."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import boto3
import pytest
from botocore.config import Config

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REGION = "us-east-1"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


class Buckets(NamedTuple):
    vault: str
    public: str


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def client_for(endpoint: str, **config: Any) -> Any:
    """A boto3 S3 client to ``endpoint`` with dummy credentials, path-style
    addressing and the production retry mode."""
    options: dict[str, Any] = {"s3": {"addressing_style": "path"},
                               "retries": {"mode": "standard", "max_attempts": 8},
                               "connect_timeout": 5, "read_timeout": 60,
                               "max_pool_connections": 32}
    options.update(config)
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=REGION,
                                          config=Config(**options), **CREDENTIALS)


def empty_and_delete(client: Any, bucket: str) -> None:
    with contextlib.suppress(client.exceptions.NoSuchBucket):
        uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        for upload in uploads:
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"],
                                          UploadId=upload["UploadId"])
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        client.delete_bucket(Bucket=bucket)


def _unavailable(what: str) -> NoReturn:
    if IN_CI:
        pytest.fail(f"{what} is required in CI")
    pytest.skip(f"{what} is not available")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means it is serving
    except OSError:
        return False


def _start(log_path: Path) -> tuple[subprocess.Popen[bytes], str] | None:
    """Start ``python -m moto.server`` on a free port; a few tries in case
    another process takes the port between our probe and its bind."""
    for _ in range(3):
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            if _answers(endpoint):
                return proc, endpoint
            time.sleep(0.05)
        _stop(proc)
    return None


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The endpoint URL of a moto S3 server running in a child process."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        _unavailable("moto[server] (the S3 test server)")
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    started = _start(log_path)
    if started is None:
        tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
        _unavailable(f"the moto S3 server (it did not start: {tail.strip() or 'no output'})")
    proc, endpoint = started
    try:
        yield endpoint
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def _s3_shared_client(s3_server: str) -> Any:
    return client_for(s3_server)  # building a client costs ~0.3 s; clients are thread-safe


@pytest.fixture
def s3_client(_s3_shared_client: Any) -> Any:
    """A boto3 client to the test server, dummy credentials, us-east-1."""
    return _s3_shared_client


@pytest.fixture
def s3_client_for() -> Any:
    """``client_for``, for tests that need a client to another endpoint (a
    fault-injecting proxy) without importing this plugin module."""
    return client_for


@pytest.fixture
def s3_buckets(s3_client: Any) -> Iterator[Buckets]:
    """Two fresh buckets, one for a vault and one for a public target,
    emptied and deleted afterwards."""
    tag = uuid.uuid4().hex[:12]
    buckets = Buckets(vault=f"vault-{tag}", public=f"public-{tag}")
    for bucket in buckets:
        s3_client.create_bucket(Bucket=bucket)
    try:
        yield buckets
    finally:
        for bucket in buckets:
            empty_and_delete(s3_client, bucket)
