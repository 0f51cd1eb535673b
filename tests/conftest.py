"""Shared fixtures: a fresh data dir with keys, settings and services."""

from __future__ import annotations

import os
import socket
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from config.settings import Settings, load_settings
from jobs.app import build_services
from release import keys as keyfile
from release.clock import Clock
from release.records import Release
from release.service import ReleaseService, Services

pytest_plugins = ["tests.s3server"]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SEED_INSTANT = datetime(2014, 9, 3, 23, 1, tzinfo=UTC)  # 00:01 BST Thursday 4 September 2014
MARKER = "EMBARGO-PLAINTEXT-MARKER-7f3a"


def service_missing(what: str) -> None:
    """A missing service fails in CI and skips elsewhere."""
    if IN_CI:
        pytest.fail(f"{what} is required in CI")
    pytest.skip(f"{what} is not available")


class FakeClock(Clock):
    """A clock the test sets; ``sleep_until`` refuses to wait for it."""

    def __init__(self, now: datetime) -> None:
        self.current = now

    def now(self) -> datetime:
        return self.current

    def set(self, now: datetime) -> None:
        self.current = now


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "var"
    path.mkdir()
    return path


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    settings = load_settings(environ={}, overrides={"data_dir": str(data_dir)})
    keyfile.init_keys(settings.keys_dir)
    return settings


@pytest.fixture
def services(settings: Settings) -> Iterator[Services]:
    services = build_services(settings)
    yield services
    services.engine.dispose()


def release_row(services: Services, release_id: str) -> Release:
    """The release's database row, documents and recipients loaded, for tests
    that look at what the service does not show (claims, leases, revisions)."""
    from sqlalchemy.orm import selectinload

    with services.sessions() as session:
        release = session.get(Release, release_id, options=(
            selectinload(Release.documents), selectinload(Release.recipients)))
        assert release is not None, release_id
        return release


@pytest.fixture
def service(services: Services) -> ReleaseService:
    return ReleaseService(services, actor="tester")


def write_bundle(folder: Path, *, letters: int = 3, publish_on: str = "2014-09-04",
                 extra: str = "", report_bytes: bytes | None = None,
                 letter_bytes: int | None = None) -> Path:
    """A manifest with a report, ``letters`` letters (one per organisation)
    and one liaison officer per organisation. Every document contains
    MARKER so tests can search for plaintext."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "letters").mkdir(exist_ok=True)
    report = report_bytes if report_bytes is not None else (
        f"National report {MARKER}\n" * 50).encode()
    (folder / "national-report.txt").write_bytes(report)
    docs = ['[[documents]]\npath = "national-report.txt"\nkind = "report"\n']
    people = []
    for i in range(1, letters + 1):
        body = (f"Letter to Force {i} {MARKER}\n" * 10).encode()
        if letter_bytes is not None:
            body = (body * (letter_bytes // len(body) + 1))[:letter_bytes]
        (folder / "letters" / f"force-{i}.txt").write_bytes(body)
        docs.append(f'[[documents]]\npath = "letters/force-{i}.txt"\nkind = "letter"\n'
                    f'organisation = "Force {i}"\n')
        people.append(f'[[recipients]]\nname = "Liaison {i}"\n'
                      f'email = "liaison{i}@force{i}.police.example"\n'
                      f'organisation = "Force {i}"\n')
    manifest = folder / "manifest.toml"
    manifest.write_text(textwrap.dedent(f"""\
        title = "Core business: a test inspection"
        publish_on = "{publish_on}"
        owner = "press@inspectorate.example"
        {extra}
        """) + "\n".join(docs + people))
    return manifest


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return write_bundle(tmp_path / "bundle")


def wait_until(predicate: Callable[[], object], timeout: float, every: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on just now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Inbox:
    """An aiosmtpd handler that keeps every message it accepts."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.content))
        return "250 OK"


def all_bytes_under(folder: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in folder.rglob("*") if p.is_file()]


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "postgres: needs the PostgreSQL on 127.0.0.1:5432")


PG_ADMIN_URL = os.environ.get("PG_TEST_URL",
                              "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    import secrets

    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    try:
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text("select 1"))
    except (OperationalError, ModuleNotFoundError) as exc:
        service_missing(f"PostgreSQL at {PG_ADMIN_URL} ({exc.__class__.__name__})")
    name = f"embargo_{secrets.token_hex(6)}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def claims_held_during(services: Services, run: Callable[[], object]) -> list[int]:
    """Runs ``run`` in a thread and counts, every 50 ms until it ends, the
    outbox rows under a claim (``claim_expires_at`` set)."""
    from sqlalchemy import select

    from release.records import OutboxMessage

    held: list[int] = []
    runner = threading.Thread(target=run)
    runner.start()
    while runner.is_alive():
        with services.sessions() as session:
            held.append(len(session.scalars(select(OutboxMessage.id).where(
                OutboxMessage.claim_expires_at.is_not(None))).all()))
        time.sleep(0.05)
    runner.join()
    return held
