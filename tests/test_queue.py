"""Queueing: a release is sealed the moment it is queued, recorded whole or
not at all, and cancelling shreds its data key."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text

from config.errors import EmbargoError, InputError, NotFoundError, SealError, StateError
from config.settings import Settings
from release import audit, sealing
from release.keys import load_private_key
from release.manifest import load_manifest
from release.records import CANCELLED, QUEUED
from release.service import ReleaseService, Services, dek_key, document_key
from release.views import ReleaseDetail
from tests.conftest import (
    MARKER,
    SEED_INSTANT,
    FakeClock,
    all_bytes_under,
    release_row,
    write_bundle,
)

SEPTEMBER_1 = datetime(2014, 9, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(SEPTEMBER_1)


@pytest.fixture
def services14(services: Services, clock: FakeClock) -> Services:
    """The services, with the clock on 1 September 2014."""
    return dataclasses.replace(services, clock=clock)


@pytest.fixture
def svc(services14: Services) -> ReleaseService:
    return ReleaseService(services14, actor="comms@test")


def vault_files(settings: Settings) -> list[Path]:
    """Every file under the vault folder, staging included."""
    root = settings.vault.path
    assert root is not None
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def release_rows(services: Services) -> int:
    with services.engine.connect() as conn:
        return int(conn.execute(text("select count(*) from releases")).scalar_one())


def assert_nothing_left(services: Services, settings: Settings) -> None:
    assert release_rows(services) == 0
    with services.engine.connect() as conn:
        for table in ("documents", "recipients", "audit_events"):
            assert conn.execute(text(f"select count(*) from {table}")).scalar_one() == 0, table
    assert list(services.vault.keys()) == []
    assert vault_files(settings) == []
    assert settings.vault.path is not None
    releases = settings.vault.path / "releases"
    assert not releases.exists() or list(releases.iterdir()) == []  # no empty folders either
    assert ReleaseService(services, actor="x").verify_audit().ok


def open_document(services: Services, release_id: str, document_id: str) -> bytes:
    private = load_private_key(services.keys_dir)
    dek = sealing.open_dek(services.vault.get_bytes(dek_key(release_id)), private, release_id)
    out = io.BytesIO()
    with services.vault.reader(document_key(release_id, document_id)) as src:
        sealing.open_stream(dek, document_id, src, out)
    return out.getvalue()


# -- a good queue --------------------------------------------------------------------------
def test_queue_records_the_release(svc: ReleaseService, bundle: Path) -> None:
    release = svc.queue(load_manifest(bundle))
    assert release.id.startswith("rel_")
    assert release.state == QUEUED
    assert release.instant == SEED_INSTANT
    assert release.instant.tzinfo is not None
    assert (release.zone, release.wall) == ("Europe/London", "2014-09-04T00:01")
    assert release.title == "Core business: a test inspection"
    assert release.owner == "press@inspectorate.example"
    row = release_row(svc.s, release.id)
    assert row.created_by == "comms@test"
    assert row.created_at == SEPTEMBER_1
    assert release.slug == "2014-09-04-core-business-a-test-inspection"

    folder = bundle.parent
    files = [folder / "national-report.txt"] + [
        folder / "letters" / f"force-{i}.txt" for i in (1, 2, 3)]
    assert [d.filename for d in release.documents] == [f.name for f in files]
    assert [d.position for d in row.documents] == [0, 1, 2, 3]
    assert [d.kind for d in release.documents] == ["report", "letter", "letter", "letter"]
    assert [d.organisation for d in release.documents] == [None, "Force 1", "Force 2",
                                                           "Force 3"]
    for doc, path in zip(release.documents, files, strict=True):
        data = path.read_bytes()
        assert doc.size == len(data)
        assert doc.sha256 == hashlib.sha256(data).hexdigest()
        assert doc.content_type == "text/plain"
        assert doc.id.startswith("doc_")
        assert doc.published_at is None
    assert len({d.id for d in release.documents}) == 4
    assert [(r.name, r.email, r.organisation) for r in release.recipients] == [
        (f"Liaison {i}", f"liaison{i}@force{i}.police.example", f"Force {i}") for i in (1, 2, 3)]

    again = svc.get(release.id)
    assert again.instant == SEED_INSTANT
    assert [d.sha256 for d in again.documents] == [d.sha256 for d in release.documents]
    assert svc.get(release.id[:10]).id == release.id  # a unique prefix finds it
    assert [r.id for r in svc.list_releases()] == [release.id]

    events = svc.get(release.id).events
    assert [e.action for e in events] == ["release_queued"]
    assert events[0].actor == "comms@test"
    details = events[0].details
    assert details["instant"] == "2014-09-03T23:01:00+00:00"
    assert "00:01 BST" in details["embargo"] and "23:01 UTC" in details["embargo"]
    assert [d["id"] for d in details["documents"]] == [d.id for d in release.documents]
    assert svc.verify_audit().ok


@pytest.mark.parametrize("approval", [False, True])
@pytest.mark.parametrize("officers", [3, 0])
def test_queue_returns_what_get_reads_back(services14: Services, tmp_path: Path,
                                           approval: bool, officers: int) -> None:
    """queue builds its detail from what it wrote, in the same transaction,
    instead of reading the release back: it must be the detail get() reads."""
    svc = ReleaseService(dataclasses.replace(services14, approval_required=approval),
                         actor="comms@test")
    release = svc.queue(load_manifest(write_bundle(tmp_path / "b", letters=officers)))
    assert release == svc.get(release.id)
    assert len(release.recipients) == officers and len(release.events) == 1


def test_sealed_objects_are_durable_before_the_release_commits(
        svc: ReleaseService, services14: Services, settings: Settings, bundle: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each sealed object's file, the release's folder that holds them, and
    the folder that holds that new folder are fsynced before the commit
    that records the release (a crash after it must find every object)."""
    steps: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        steps.append(os.readlink(f"/proc/self/fd/{fd}"))

    monkeypatch.setattr(os, "fsync", fsync)
    event.listen(services14.engine, "commit", lambda conn: steps.append("COMMIT"))
    vault = settings.vault.path
    assert vault is not None
    # Folders this queue makes (the vault's own on a first queue): each one's parent too.
    made = [f for f in (vault / "releases", vault, vault.parent) if not f.exists()]
    release = svc.queue(load_manifest(bundle))
    before = steps[:steps.index("COMMIT")]
    # Files are fsynced while still unnamed in the release's folder (O_TMPFILE),
    # before they are linked in.
    files = [s for s in before if s.startswith(str(vault / "releases" / release.id / "#"))
             and s.endswith(" (deleted)")]
    assert len(files) == len(release.documents) + 1  # each document and the data key
    assert str(vault / "releases" / release.id) in before
    assert str(vault / "releases") in before  # the new folder's own entry
    # Each folder once, not once per object; the folder holding each folder
    # this queue made too.
    assert sorted(set(before) - set(files)) == sorted(before[len(files):])
    assert set(before) - set(files) == {str(vault / "releases" / release.id),
                                        str(vault / "releases")} | {str(f.parent) for f in made}


def test_vault_holds_only_sealed_objects(svc: ReleaseService, services14: Services,
                                         settings: Settings, bundle: Path) -> None:
    release = svc.queue(load_manifest(bundle))
    expected = {dek_key(release.id)} | {document_key(release.id, d.id)
                                        for d in release.documents}
    assert set(services14.vault.keys()) == expected
    root = settings.vault.path
    assert root is not None
    assert {p.relative_to(root).as_posix() for p in vault_files(settings)} == expected
    for doc in release.documents:
        blob = services14.vault.get_bytes(document_key(release.id, doc.id))
        assert blob[:4] == b"EMB1"
        assert int.from_bytes(blob[4:8], "big") == 65536
        # header + one segment + tag: ciphertext is exactly as long as it should be
        assert len(blob) == sealing.HEADER_SIZE + doc.size + 16
    sealed_dek = services14.vault.get_bytes(dek_key(release.id))
    assert not sealed_dek.startswith(b"EMB1")
    assert len(sealed_dek) == 32 + 32 + 16  # X25519 enc + DEK + GCM tag


def test_no_plaintext_anywhere_under_the_data_dir(svc: ReleaseService, services14: Services,
                                                  data_dir: Path, bundle: Path) -> None:
    svc.queue(load_manifest(bundle))
    svc.queue(load_manifest(write_bundle(bundle.parent.parent / "two", letters=5)))
    marker = MARKER.encode()
    # The engine is still open, so the SQLite WAL holds the latest pages.
    files = all_bytes_under(data_dir)
    names = {p.name for p, _ in files}
    assert {"embargo.db", "embargo.db-wal"} <= names
    for path, data in files:
        for needle in (marker, MARKER.encode("utf-16-le"), b"Letter to Force",
                       b"National report "):
            assert needle not in data, f"plaintext {needle!r} in {path}"
    # the search does see the database: the (public) title is there
    assert any(b"Core business: a test inspection" in data for _, data in files)
    services14.engine.dispose()  # checkpoint and close; look again
    for path, data in all_bytes_under(data_dir):
        assert marker not in data, f"plaintext in {path}"


def test_ten_mebibyte_document_round_trips(svc: ReleaseService, services14: Services,
                                           tmp_path: Path) -> None:
    data = random.Random(2014).randbytes(10 * 1024 * 1024) + MARKER.encode()
    manifest = write_bundle(tmp_path / "big", report_bytes=data)
    calls: list[tuple[str, int, int]] = []
    release = svc.queue(load_manifest(manifest),
                        progress=lambda name, done, total: calls.append((name, done, total)))
    report = release.documents[0]
    assert report.size == len(data)
    assert report.sha256 == hashlib.sha256(data).hexdigest()
    assert open_document(services14, release.id, report.id) == data
    for letter in release.documents[1:]:
        body = (tmp_path / "big" / "letters" / letter.filename).read_bytes()
        assert open_document(services14, release.id, letter.id) == body
    report_calls = [c for c in calls if c[0] == report.filename]
    assert report_calls[-1] == (report.filename, len(data), len(data))
    assert [c[1] for c in report_calls] == sorted(c[1] for c in report_calls)
    assert len(report_calls) == len(data) // 65536 + 1


def test_documents_are_bound_to_their_ids(svc: ReleaseService, services14: Services,
                                          bundle: Path) -> None:
    """Swapping two documents' objects in the vault is detected."""
    release = svc.queue(load_manifest(bundle))
    first, second = release.documents[1], release.documents[2]
    vault = services14.vault
    a = vault.get_bytes(document_key(release.id, first.id))
    b = vault.get_bytes(document_key(release.id, second.id))
    vault.put_bytes(document_key(release.id, first.id), b)
    vault.put_bytes(document_key(release.id, second.id), a)
    with pytest.raises(SealError):
        open_document(services14, release.id, first.id)


def test_same_title_and_day_get_distinct_slugs(svc: ReleaseService, bundle: Path) -> None:
    slugs = [svc.queue(load_manifest(bundle)).slug for _ in range(3)]
    base = "2014-09-04-core-business-a-test-inspection"
    assert slugs == [base, f"{base}-2", f"{base}-3"]


def test_time_in_the_manifest_and_overrides(svc: ReleaseService, tmp_path: Path) -> None:
    manifest = write_bundle(tmp_path / "b", extra='at = "09:30"\nzone = "America/New_York"')
    release = svc.queue(load_manifest(manifest))
    assert release.instant == datetime(2014, 9, 4, 13, 30, tzinfo=UTC)
    assert (release.zone, release.wall) == ("America/New_York", "2014-09-04T09:30")
    release = svc.queue(load_manifest(manifest, publish_on="Thursday 4 September 2014",
                                      at="00:01", zone="Europe/London"))
    assert release.instant == SEED_INSTANT


@pytest.mark.parametrize("stamp", ["2014-09-04T00:01+01:00", "2014-09-03T23:01Z"])
def test_timestamp_on_the_command_line_overrides_the_files_time(
        svc: ReleaseService, tmp_path: Path, stamp: str) -> None:
    """--publish-on with a full timestamp replaces the manifest's date and
    time of day; the file's `at` must not then make it an error."""
    manifest = write_bundle(tmp_path / "b", publish_on="2014-09-11", extra='at = "09:30"')
    release = svc.queue(load_manifest(manifest, publish_on=stamp))
    assert release.instant == SEED_INSTANT


@pytest.mark.parametrize(("publish_on", "at", "needle"), [
    ("2014-08-31", None, "past"),
    ("2015-03-29", "01:30", "does not exist"),
    ("2014-10-26", "01:30", "happens twice"),
    ("Wednesday 4 September 2014", None, "Thursday"),
    ("2014-09-31", None, "30 days"),
])
def test_bad_time_leaves_nothing(svc: ReleaseService, services14: Services, settings: Settings,
                                 bundle: Path, publish_on: str, at: str | None,
                                 needle: str) -> None:
    with pytest.raises(InputError, match=needle):
        svc.queue(load_manifest(bundle, publish_on=publish_on, at=at))
    assert_nothing_left(services14, settings)


def test_the_instant_itself_is_not_in_the_future(svc: ReleaseService, clock: FakeClock,
                                                 services14: Services, settings: Settings,
                                                 bundle: Path) -> None:
    clock.set(SEED_INSTANT)
    with pytest.raises(InputError, match="not in the future"):
        svc.queue(load_manifest(bundle))
    assert_nothing_left(services14, settings)
    clock.set(SEED_INSTANT - timedelta(microseconds=1))
    assert svc.queue(load_manifest(bundle)).instant == SEED_INSTANT


def test_missing_public_key_says_which_command_to_run(services14: Services, settings: Settings,
                                                      bundle: Path, tmp_path: Path) -> None:
    keyless = dataclasses.replace(services14, keys_dir=tmp_path / "no-keys")
    with pytest.raises(NotFoundError) as info:
        ReleaseService(keyless, actor="comms").queue(load_manifest(bundle))
    assert "embargo keys init" in str(info.value)
    assert "\n" not in str(info.value)
    assert_nothing_left(services14, settings)


# -- a queue that fails part-way leaves nothing ------------------------------------------------
Breaker = Callable[[pytest.MonkeyPatch, Services], "type[BaseException]"]


def _fail_on_nth_seal(n: int, exc: BaseException) -> Breaker:
    def breaker(monkeypatch: pytest.MonkeyPatch, services: Services) -> type[BaseException]:
        real = sealing.seal_stream
        count = 0

        def seal_stream(*args: Any, **kwargs: Any) -> sealing.StreamResult:
            nonlocal count
            count += 1
            if count == n:
                # write part of the object first, as a real failure would
                args[3].write(b"EMB1 partial")
                raise exc
            return real(*args, **kwargs)

        monkeypatch.setattr(sealing, "seal_stream", seal_stream)
        return type(exc)
    return breaker


def _fail_sealing_the_dek(monkeypatch: pytest.MonkeyPatch, services: Services
                          ) -> type[BaseException]:
    def boom(*args: Any, **kwargs: Any) -> bytes:
        raise ValueError("HPKE failed")
    monkeypatch.setattr(sealing, "seal_dek", boom)
    return ValueError


def _fail_storing_the_dek(monkeypatch: pytest.MonkeyPatch, services: Services
                          ) -> type[BaseException]:
    real_batch = services.vault.batch

    def batch() -> Any:
        inner = real_batch()
        real = inner.put_bytes

        def put_bytes(key: str, data: bytes, *, durable: bool = True) -> None:
            if key.endswith("dek.hpke"):
                raise OSError(28, "No space left on device")
            real(key, data, durable=durable)
        monkeypatch.setattr(inner, "put_bytes", put_bytes)
        return inner
    monkeypatch.setattr(services.vault, "batch", batch)
    return OSError


def _fail_the_audit(monkeypatch: pytest.MonkeyPatch, services: Services) -> type[BaseException]:
    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("audit store unavailable")
    monkeypatch.setattr(audit, "record", boom)
    return RuntimeError


def _fail_the_document_insert(monkeypatch: pytest.MonkeyPatch, services: Services
                              ) -> type[BaseException]:
    """A real database failure after the release row is written, in the same
    transaction."""
    with services.engine.begin() as conn:
        conn.execute(text("CREATE TRIGGER refuse_documents BEFORE INSERT ON documents "
                          "BEGIN SELECT RAISE(ABORT, 'disk full'); END"))
    return Exception


def _interrupt_in_progress(monkeypatch: pytest.MonkeyPatch, services: Services
                           ) -> type[BaseException]:
    """Ctrl-C in the middle of the second document (inside the progress
    callback, i.e. while its vault object is being written)."""
    real = ReleaseService._seal_file

    def _seal_file(self: ReleaseService, batch: Any, dek: bytes, document_id: str, path: Path,
                   name: str, size: int, key: str, progress: Any) -> sealing.StreamResult:
        def interrupting(name: str, done: int, total: int) -> None:
            if name == "force-1.txt" and done > 0:
                raise KeyboardInterrupt
        return real(self, batch, dek, document_id, path, name, size, key, interrupting)

    monkeypatch.setattr(ReleaseService, "_seal_file", _seal_file)
    return KeyboardInterrupt


BREAKERS: dict[str, Breaker] = {
    "3rd document fails": _fail_on_nth_seal(3, OSError(5, "Input/output error")),
    "1st document fails": _fail_on_nth_seal(1, OSError(5, "Input/output error")),
    "Ctrl-C on the 3rd document": _fail_on_nth_seal(3, KeyboardInterrupt()),
    "Ctrl-C on the last document": _fail_on_nth_seal(4, KeyboardInterrupt()),
    "Ctrl-C while writing a document": _interrupt_in_progress,
    "sealing the data key fails": _fail_sealing_the_dek,
    "storing the data key fails": _fail_storing_the_dek,
    "the audit append fails": _fail_the_audit,
    "the database refuses an insert": _fail_the_document_insert,
}


@pytest.mark.parametrize("case", list(BREAKERS))
def test_failure_part_way_leaves_nothing(case: str, svc: ReleaseService, services14: Services,
                                         settings: Settings, bundle: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    expected = BREAKERS[case](monkeypatch, services14)
    spec = load_manifest(bundle)
    with pytest.raises(expected):
        svc.queue(spec)
    assert_nothing_left(services14, settings)
    monkeypatch.undo()
    with services14.engine.begin() as conn:
        conn.execute(text("DROP TRIGGER IF EXISTS refuse_documents"))
    # and the next queue works normally
    release = svc.queue(spec)
    assert release.state == QUEUED
    assert len(list(services14.vault.keys())) == 5


# -- cancel ----------------------------------------------------------------------------------------
def test_cancel_shreds_the_data_key(svc: ReleaseService, services14: Services,
                                    bundle: Path) -> None:
    release = svc.queue(load_manifest(bundle))
    assert services14.vault.exists(dek_key(release.id))
    cancelled = svc.cancel(release.id, reason="withdrawn by the inspectorate")
    assert cancelled.state == CANCELLED
    assert cancelled.reason == "withdrawn by the inspectorate"
    assert release_row(svc.s, release.id).revision == 2
    assert not services14.vault.exists(dek_key(release.id))
    assert dek_key(release.id) not in set(services14.vault.keys())
    events = svc.get(release.id).events
    assert [e.action for e in events] == ["release_queued", "release_cancelled"]
    assert events[1].details["reason"] == "withdrawn by the inspectorate"
    assert events[1].actor == "comms@test"
    assert svc.verify_audit().ok
    with pytest.raises(NotFoundError):
        open_document(services14, release.id, release.documents[0].id)


def test_cancel_twice_is_a_state_error(svc: ReleaseService, bundle: Path) -> None:
    release = svc.queue(load_manifest(bundle))
    svc.cancel(release.id, reason="first")
    with pytest.raises(StateError, match="cancelled"):
        svc.cancel(release.id, reason="second")
    assert [e.action for e in svc.get(release.id).events] == ["release_queued", "release_cancelled"]
    assert svc.get(release.id).reason == "first"


def test_cancel_needs_a_reason(svc: ReleaseService, services14: Services, bundle: Path) -> None:
    release = svc.queue(load_manifest(bundle))
    with pytest.raises(InputError, match="reason"):
        svc.cancel(release.id, reason="  ")
    assert svc.get(release.id).state == QUEUED
    assert services14.vault.exists(dek_key(release.id))


def test_unknown_release(svc: ReleaseService) -> None:
    with pytest.raises(NotFoundError, match="rel_nope"):
        svc.cancel("rel_nope", reason="x")
    with pytest.raises(NotFoundError):
        svc.get("rel_")


# -- reschedule -----------------------------------------------------------------------------------
def test_reschedule_moves_the_instant(svc: ReleaseService, bundle: Path) -> None:
    release = svc.queue(load_manifest(bundle))
    moved = svc.reschedule(release.id, publish_on="Thursday 11 September 2014", at="09:30",
                           zone=None)
    assert moved.instant == datetime(2014, 9, 11, 8, 30, tzinfo=UTC)
    assert (moved.zone, moved.wall) == ("Europe/London", "2014-09-11T09:30")
    assert release_row(svc.s, release.id).revision == 2
    assert moved.state == QUEUED
    events = svc.get(release.id).events
    assert [e.action for e in events] == ["release_queued", "release_rescheduled"]
    details = events[1].details
    assert "Thu 4 Sep 2014" in details["from"] and "Thu 11 Sep 2014" in details["to"]
    assert details["instant"] == "2014-09-11T08:30:00+00:00"
    assert svc.verify_audit().ok


def test_reschedule_keeps_the_release_zone(svc: ReleaseService, tmp_path: Path) -> None:
    manifest = write_bundle(tmp_path / "b", extra='zone = "America/New_York"')
    release = svc.queue(load_manifest(manifest))
    moved = svc.reschedule(release.id, publish_on="2014-09-05", at="08:00", zone=None)
    assert moved.zone == "America/New_York"
    assert moved.instant == datetime(2014, 9, 5, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("publish_on", "at", "needle"), [
    ("2014-08-01", None, "past"),
    ("2014-09-01", "12:00", "past"),  # 12:00 BST is 11:00 UTC, before now
    ("2014-10-26", "01:30", "happens twice"),
    ("2014-09-04", "25:00", "not a time of day"),
])
def test_reschedule_refuses_bad_times(svc: ReleaseService, bundle: Path, publish_on: str,
                                      at: str | None, needle: str) -> None:
    release = svc.queue(load_manifest(bundle))
    with pytest.raises(InputError, match=needle):
        svc.reschedule(release.id, publish_on=publish_on, at=at, zone=None)
    again = svc.get(release.id)
    assert again.instant == SEED_INSTANT and release_row(svc.s, release.id).revision == 1
    assert [e.action for e in svc.get(release.id).events] == ["release_queued"]


def test_reschedule_a_cancelled_release_is_a_state_error(svc: ReleaseService,
                                                         bundle: Path) -> None:
    release = svc.queue(load_manifest(bundle))
    svc.cancel(release.id, reason="withdrawn")
    with pytest.raises(StateError, match="cancelled"):
        svc.reschedule(release.id, publish_on="2014-09-11", at=None, zone=None)


@pytest.fixture
def released(svc: ReleaseService, bundle: Path) -> Iterator[ReleaseDetail]:
    yield svc.queue(load_manifest(bundle))


def test_the_view_shows_both_clocks(svc: ReleaseService, released: ReleaseDetail) -> None:
    from release.views import to_data

    facts = to_data(svc.get(released.id))
    assert isinstance(facts, dict)
    assert facts["id"] == released.id
    assert facts["instant"] == "2014-09-03T23:01:00Z"
    assert facts["embargo"] == "00:01 BST Thu 4 Sep 2014 (23:01 UTC Wed 3 Sep)"
    assert facts["time_left"] == "2d 11:01:00"


# -- ids given by prefix -------------------------------------------------------------------------
def test_an_id_prefix_must_name_exactly_one_release(svc: ReleaseService, bundle: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`embargo cancel ID` accepts a unique prefix; an ambiguous prefix or
    one with SQL LIKE wildcards must not pick a release at random."""
    import release.service as service_module

    real = service_module.new_id
    ids = iter(["rel_abcdef0000000001", "rel_abcdef0000000002"])
    monkeypatch.setattr(service_module, "new_id",
                        lambda prefix: next(ids) if prefix == "rel" else real(prefix))
    spec = load_manifest(bundle)
    first, second = svc.queue(spec), svc.queue(spec)
    assert svc.get("rel_abcdef0000000001").id == first.id
    assert svc.get("rel_abcdef0000000002").id == second.id
    for ambiguous in ("rel_abcdef", "rel_abcdef000000000"):
        with pytest.raises(EmbargoError):
            svc.get(ambiguous)
        with pytest.raises(EmbargoError):
            svc.cancel(ambiguous, reason="which one?")
    for wildcard in ("%%%%%%", "rel_%0001", "______%"):
        with pytest.raises(NotFoundError):
            svc.get(wildcard)
        with pytest.raises(NotFoundError):
            svc.cancel(wildcard, reason="any one")
    assert {r.state for r in svc.list_releases()} == {QUEUED}
