"""Publishing several documents of one release at once: everything public
once, verified, and a bad document stops the release loudly."""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import UTC, datetime
from pathlib import Path

from config.settings import Settings
from release.keys import load_private_key
from release.manifest import load_manifest
from release.publishing import Publisher
from release.records import FAILED, PUBLISHED
from release.service import ReleaseService, Services, document_key
from tests.conftest import SEED_INSTANT, FakeClock, release_row, write_bundle


def seeded(services: Services, tmp_path: Path, letters: int) -> str:
    queuing = dataclasses.replace(services, clock=FakeClock(datetime(2014, 9, 1, tzinfo=UTC)))
    manifest = write_bundle(tmp_path / "b", letters=letters, letter_bytes=200_000)
    return ReleaseService(queuing, actor="t").queue(load_manifest(manifest)).id


def publisher(settings: Settings, services: Services, workers: int) -> Publisher:
    at_instant = dataclasses.replace(services, clock=FakeClock(SEED_INSTANT))
    return Publisher(at_instant, load_private_key(settings.keys_dir), claimant="p",
                     workers=workers)


def test_twelve_documents_four_at_a_time(settings: Settings, services: Services,
                                         tmp_path: Path) -> None:
    release_id = seeded(services, tmp_path, letters=11)
    outcome = publisher(settings, services, 4).publish(release_id)
    assert outcome.status == "published" and outcome.lateness_ms == 0
    release = release_row(services, release_id)
    assert release.state == PUBLISHED and len(release.documents) == 12
    assert settings.public.path is not None
    folder = settings.public.path / release.slug
    for doc in release.documents:
        data = (folder / doc.filename).read_bytes()
        assert hashlib.sha256(data).hexdigest() == doc.sha256 and len(data) == doc.size
        assert doc.published_at is not None
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [d.filename for d in release.documents] + ["manifest.json"])


def test_a_tampered_document_fails_the_release(settings: Settings, services: Services,
                                               tmp_path: Path) -> None:
    release_id = seeded(services, tmp_path, letters=5)
    release = release_row(services, release_id)
    bad = release.documents[3]
    key = document_key(release_id, bad.id)
    blob = bytearray(services.vault.get_bytes(key))
    blob[100] ^= 0x01
    services.vault.put_bytes(key, bytes(blob))
    outcome = publisher(settings, services, 4).publish(release_id)
    assert outcome.status == "failed"
    assert outcome.detail is not None and "could not be opened" in outcome.detail
    after = release_row(services, release_id)
    assert after.state == FAILED and after.reason == outcome.detail
    assert settings.public.path is not None
    assert not (settings.public.path / after.slug / bad.filename).exists()
    assert not (settings.public.path / after.slug / "manifest.json").exists()
    events = [e.action for e in ReleaseService(services, actor="t").get(release_id).events]
    assert "publication_failed" in events and "release_published" not in events
