"""Query counts of the service's reads, measured with a SQLAlchemy event
listener: a page costs the same few statements however many copies,
documents or releases it shows."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

from freezegun import freeze_time
from sqlalchemy import event

from config.settings import Settings
from release.copies import issue_copies
from release.service import ReleaseService, Services
from tests.test_copies import QUEUED_AT, pdf_bundle, queue, relay_for


@contextmanager
def counted(services: Services) -> Iterator[list[str]]:
    statements: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if not statement.startswith(("BEGIN", "PRAGMA", "COMMIT", "ROLLBACK")):
            statements.append(" ".join(statement.split()))

    event.listen(services.engine, "before_cursor_execute", seen)
    try:
        yield statements
    finally:
        event.remove(services.engine, "before_cursor_execute", seen)


def _sent(settings: Settings, services: Services, letters: int) -> str:
    release = queue(services, pdf_bundle(settings.data_dir.parent / f"b{letters}",
                                         letters=letters))
    with freeze_time(QUEUED_AT + timedelta(minutes=1)):
        issue_copies(services, release.id, actor="t")
        relay_for(services, settings).run_once()
    return str(release.id)


def _statements(services: Services, read: Callable[[], object]) -> list[str]:
    with counted(services) as statements:
        read()
    return list(statements)


def test_show_reads_seven_statements_whatever_the_number_of_copies(
        settings: Settings, services: Services) -> None:
    service = ReleaseService(services, actor="t")
    small, large = _sent(settings, services, 1), _sent(settings, services, 6)
    few = _statements(services, lambda: service.get(small))
    many = _statements(services, lambda: service.get(large))
    assert len(service.get(large).access_list) == 6
    # release, documents, recipients, copies, notices, events, the newest rehearsal:
    # no query per copy
    assert len(few) == len(many) == 7, many
    assert sum(s.startswith("SELECT releases.") for s in many) == 1


def test_list_reads_three_statements_whatever_the_number_of_releases(
        settings: Settings, services: Services) -> None:
    service = ReleaseService(services, actor="t")
    _sent(settings, services, 1)
    one = _statements(services, service.list_releases)
    for letters in (2, 3, 4):
        _sent(settings, services, letters)
    four = _statements(services, service.list_releases)
    assert len(service.list_releases()) == 4
    assert len(one) == len(four) == 3, four  # releases, their documents, their recipients
