"""Console accounts from the command line: add (a one-time password),
list, disable (sessions end), reset (unlocked, new one-time password)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from config.settings import Settings
from jobs.cli import main
from release import accounts
from release.service import Services

NOW = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
IDLE, ABSOLUTE = timedelta(minutes=30), timedelta(hours=12)


def run(settings: Settings, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    status = main(["--data-dir", str(settings.data_dir), *args])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def test_users_add_list_disable_reset(settings: Settings, services: Services,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    status, out = run(settings, capsys, "users", "add", "ada", "ada@press.example",
                      "--role", "admin")
    assert status == 0 and "one-time password" in out
    one_time = out.strip().splitlines()[-1]
    who = accounts.sign_in(services, "ada", one_time, now=NOW)
    assert who.account.must_change and who.account.role == "admin"
    status, out = run(settings, capsys, "users", "add", "ada", "other@press.example",
                      "--role", "viewer")
    assert status == 2 and "already a user called 'ada'" in out
    status, out = run(settings, capsys, "users", "list")
    assert "ada" in out and "must change password" in out
    assert run(settings, capsys, "users", "disable", "ada")[0] == 0
    assert accounts.current(services, who.session_id, now=NOW, idle=IDLE,
                            absolute=ABSOLUTE) is None
    with pytest.raises(accounts.SignInRefused):
        accounts.sign_in(services, "ada", one_time, now=NOW)
    status, out = run(settings, capsys, "users", "reset", "ada")
    assert status == 0
    fresh = out.strip().splitlines()[-1]
    assert fresh != one_time
    assert accounts.sign_in(services, "ada", fresh, now=NOW).account.must_change
    assert run(settings, capsys, "users", "disable", "nobody")[0] == 3


def test_reset_unlocks_a_locked_account(services: Services) -> None:
    _, password = accounts.add_user(services, name="bo", email="bo@press.example",
                                    role="viewer", actor="t")
    for _ in range(accounts.MAX_FAILURES):
        with pytest.raises(accounts.SignInRefused):
            accounts.sign_in(services, "bo", "wrong", now=NOW)
    with pytest.raises(accounts.SignInRefused):
        accounts.sign_in(services, "bo", password, now=NOW)
    _, fresh = accounts.reset_user(services, "bo", actor="t")
    assert accounts.sign_in(services, "bo", fresh, now=NOW).account.name == "bo"


def test_passwords_are_stored_as_argon2id(services: Services) -> None:
    from sqlalchemy import select

    accounts.add_user(services, name="cy", email="cy@press.example", role="editor", actor="t")
    with services.sessions() as session:
        stored = session.scalar(select(accounts.User.password_hash))
    assert stored is not None and stored.startswith("$argon2id$")
