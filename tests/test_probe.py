"""The public target's probe write (storage/base.py ``PublicTarget.probe``),
the one check the rehearsal and ``embargo check`` share: on a folder and on
the tests' S3 server, it creates, reads back and deletes, and leaves nothing
in the public location whether it succeeds or fails."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from config.errors import StorageError
from storage.base import PROBE_PREFIX, PublicTarget
from storage.local import LocalPublicTarget
from storage.s3 import S3PublicTarget
from tests.test_s3_faults import Fault, FaultProxy

if TYPE_CHECKING:
    from tests.s3server import Buckets


def s3_keys(client: Any, bucket: str) -> list[str]:
    return [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]


@pytest.fixture(params=["folder", "s3"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[PublicTarget, Any]:
    """A public target and a function listing everything in its location."""
    if request.param == "folder":
        root = tmp_path / "public"
        root.mkdir()
        return LocalPublicTarget(root), lambda: sorted(p.name for p in root.rglob("*"))
    client = request.getfixturevalue("s3_client")
    buckets: Buckets = request.getfixturevalue("s3_buckets")
    return (S3PublicTarget(client, bucket=buckets.public, prefix="site/", acl="public-read"),
            lambda: s3_keys(client, buckets.public))


def test_probe_creates_reads_back_and_deletes(target: tuple[PublicTarget, Any]) -> None:
    public, listing = target
    key = public.probe()
    assert key.startswith(PROBE_PREFIX)
    assert not public.exists(key)
    assert listing() == []
    assert public.probe() != key  # a fresh key each time: never a clash with an old probe


def test_probe_of_unwritable_folder_names_the_write(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"not a folder")
    with pytest.raises(StorageError, match="probe write was refused"):
        LocalPublicTarget(blocker / "public").probe()
    assert blocker.read_bytes() == b"not a folder"


def test_probe_of_bucket_refusing_the_put(s3_server: str, s3_client: Any,
                                          s3_buckets: Buckets, s3_client_for: Any) -> None:
    with FaultProxy(s3_server) as proxy:
        client = s3_client_for(proxy.endpoint)
        public = S3PublicTarget(client, bucket=s3_buckets.public, prefix="site/")
        proxy.inject(Fault(method="PUT", path_contains=PROBE_PREFIX, status=403,
                           code="AccessDenied", times=10))
        with pytest.raises(StorageError, match=r"probe write was refused.*denied"):
            public.probe()
        assert proxy.requests("PUT", PROBE_PREFIX)
    assert s3_keys(s3_client, s3_buckets.public) == []


def test_probe_deletes_what_it_wrote_when_the_read_back_differs(tmp_path: Path) -> None:
    class Corrupting(LocalPublicTarget):
        def reader(self, key: str) -> Any:
            (self.root / key).write_bytes(b"someone else's bytes")
            return super().reader(key)

    root = tmp_path / "public"
    with pytest.raises(StorageError, match="read back differs"):
        Corrupting(root).probe()
    assert list(root.rglob("*")) == []
