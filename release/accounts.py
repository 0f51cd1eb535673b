"""The console's local accounts and sessions.

Passwords are hashed with argon2id. A new or reset account gets a one-time
password that must be changed at the first sign-in. Five failed sign-ins in
a row lock an account for 15 minutes, and the refusal never says whether
the account exists. Sessions are database rows (revocable), keyed by the
SHA-256 of the cookie's random token, each with its own CSRF token; a
session ends after ``idle`` without use or ``absolute`` after sign-in."""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Boolean, ForeignKey, Integer, String, Text, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from config.errors import EmbargoError, InputError, NotFoundError
from release import audit
from release.context import Services
from release.records import Base, UTCDateTime
from storage.db import transaction

MAX_FAILURES = 5
LOCK_FOR = timedelta(minutes=15)
MIN_PASSWORD = 12
SIGN_IN_REFUSED = ("Sign-in refused: the name or password is wrong, or the account is "
                   "locked for 15 minutes after five failed attempts.")
_HASHER = PasswordHasher()  # argon2id, the library's RFC 9106 low-memory profile


@functools.cache
def _dummy_hash() -> str:
    """A hash to verify against for unknown names (the same work as a real
    one); made at the first need, not at import (each hash costs 64 MiB)."""
    return _HASHER.hash(secrets.token_urlsafe(16))


class Role(StrEnum):
    EDITOR = "editor"  # drafts, uploads, submit, discard own drafts
    APPROVER = "approver"  # approve or send back others' submissions; reschedule, cancel
    VIEWER = "viewer"  # read everything, write nothing
    ADMIN = "admin"  # accounts


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(120), unique=True)
    email: Mapped[str] = mapped_column(String(320))
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(Text)
    must_change: Mapped[bool] = mapped_column(Boolean, default=True)
    failed_count: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class WebSession(Base):
    __tablename__ = "web_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class SignInRefused(EmbargoError):
    """Wrong name, wrong password, disabled or locked: one message for all."""

    exit_status = 2

    def __init__(self) -> None:
        super().__init__(SIGN_IN_REFUSED)


@dataclass(frozen=True, kw_only=True)
class Account:
    """A user as the console and the command line see it (no hash)."""

    id: str
    name: str
    email: str
    role: Role
    must_change: bool
    disabled: bool
    locked_until: datetime | None


@dataclass(frozen=True, kw_only=True)
class SignedIn:
    """A live session: who, and the CSRF token its forms must carry."""

    session_id: str
    csrf: str
    account: Account


def _view(user: User) -> Account:
    return Account(id=user.id, name=user.name, email=user.email, role=Role(user.role),
                   must_change=user.must_change, disabled=user.disabled_at is not None,
                   locked_until=user.locked_until)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _one_time_password() -> str:
    return secrets.token_urlsafe(12)


def check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise InputError(f"a password needs at least {MIN_PASSWORD} characters")


def add_user(services: Services, *, name: str, email: str, role: str,
             actor: str) -> tuple[Account, str]:
    """Create an account; return it and its one-time password.

    :raises InputError: a bad name, email or role, or the name is taken
    """
    from release.manifest import check_email

    name = name.strip()
    if not name or len(name) > 120 or any(c.isspace() for c in name):
        raise InputError(f"{name!r} is not a user name (one word, at most 120 characters)")
    try:
        chosen = Role(role)
    except ValueError:
        raise InputError(f"{role!r} is not a role: {', '.join(r.value for r in Role)}") from None
    email = check_email(email, "user")
    password = _one_time_password()
    now = services.clock.now()
    with transaction(services.sessions) as session:
        if session.scalar(select(User.id).where(User.name == name)) is not None:
            raise InputError(f"there is already a user called {name!r}")
        user = User(id=f"usr_{secrets.token_hex(8)}", name=name, email=email, role=chosen.value,
                    password_hash=_HASHER.hash(password), must_change=True, failed_count=0,
                    created_at=now)
        session.add(user)
        session.flush()
        audit.record(session, action="user_added", actor=actor, at=now,
                     details={"user": name, "role": chosen.value})
        return _view(user), password


def list_users(services: Services) -> list[Account]:
    with transaction(services.sessions) as session:
        return [_view(u) for u in session.scalars(select(User).order_by(User.name))]


def _find(session: Session, name: str) -> User:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise NotFoundError(f"no user {name!r} (see `embargo users list`)")
    return user


def disable_user(services: Services, name: str, *, actor: str) -> Account:
    """Disable an account and end its sessions."""
    now = services.clock.now()
    with transaction(services.sessions) as session:
        user = _find(session, name)
        user.disabled_at = user.disabled_at or now
        session.execute(update(WebSession).where(WebSession.user_id == user.id,
                                                 WebSession.ended_at.is_(None))
                        .values(ended_at=now))
        audit.record(session, action="user_disabled", actor=actor, at=now,
                     details={"user": name})
        return _view(user)


def reset_user(services: Services, name: str, *, actor: str) -> tuple[Account, str]:
    """Give an account a new one-time password, unlock and re-enable it, and
    end its sessions."""
    password = _one_time_password()
    now = services.clock.now()
    with transaction(services.sessions) as session:
        user = _find(session, name)
        user.password_hash = _HASHER.hash(password)
        user.must_change, user.failed_count = True, 0
        user.locked_until = user.disabled_at = None
        session.execute(update(WebSession).where(WebSession.user_id == user.id,
                                                 WebSession.ended_at.is_(None))
                        .values(ended_at=now))
        audit.record(session, action="user_reset", actor=actor, at=now, details={"user": name})
        return _view(user), password


def sign_in(services: Services, name: str, password: str, *, now: datetime) -> SignedIn:
    """Check a name and password and start a session.

    :raises SignInRefused: unknown name, wrong password, disabled or locked
        account (one message, and the same hashing work, for every case)
    """
    with transaction(services.sessions) as session:
        user = session.scalar(select(User).where(User.name == name.strip()).with_for_update())
        if user is None:
            try:
                _HASHER.verify(_dummy_hash(), password)
            except VerificationError:
                pass
            raise SignInRefused()
        if user.locked_until is not None and user.locked_until > now:
            raise SignInRefused()  # not even a right password opens a locked account
        try:
            _HASHER.verify(user.password_hash, password)
            good = user.disabled_at is None
        except (VerificationError, InvalidHashError):
            good = False
        if not good:
            user.failed_count += 1
            if user.failed_count >= MAX_FAILURES:
                user.locked_until, user.failed_count = now + LOCK_FOR, 0
                audit.record(session, action="user_locked", actor=user.name, at=now,
                             details={"for": str(LOCK_FOR)})
        else:
            user.failed_count, user.locked_until = 0, None
            if _HASHER.check_needs_rehash(user.password_hash):
                user.password_hash = _HASHER.hash(password)
            token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
            session.add(WebSession(id=_digest(token), user_id=user.id, csrf=csrf,
                                   created_at=now, last_seen_at=now))
            audit.record(session, action="user_signed_in", actor=user.name, at=now)
            return SignedIn(session_id=token, csrf=csrf, account=_view(user))
    raise SignInRefused()  # the failure counted above is committed first


def current(services: Services, token: str, *, now: datetime, idle: timedelta,
            absolute: timedelta) -> SignedIn | None:
    """The live session behind a cookie's token, touched; None when there is
    none, it ended, it was idle longer than ``idle``, it began more than
    ``absolute`` ago, or its account is disabled. An expired one is ended."""
    if not token:
        return None
    with transaction(services.sessions) as session:
        row = session.get(WebSession, _digest(token))
        if row is None or row.ended_at is not None:
            return None
        user = session.get(User, row.user_id)
        if (user is None or user.disabled_at is not None or now - row.last_seen_at >= idle
                or now - row.created_at >= absolute):
            row.ended_at = now
            return None
        row.last_seen_at = now
        return SignedIn(session_id=token, csrf=row.csrf, account=_view(user))


def csrf_matches(signed_in: SignedIn, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(signed_in.csrf.encode(), (given or "").encode())


def sign_out(services: Services, token: str, *, now: datetime) -> None:
    with transaction(services.sessions) as session:
        row = session.get(WebSession, _digest(token))
        if row is not None and row.ended_at is None:
            row.ended_at = now


def change_password(services: Services, signed_in: SignedIn, *, old: str, new: str,
                    now: datetime) -> Account:
    """Change the signed-in user's password (the one-time one included).

    :raises InputError: the old password is wrong, or the new one is too short or the same
    """
    check_password(new)
    if new == old:
        raise InputError("choose a new password, not the one-time one again")
    with transaction(services.sessions) as session:
        user = session.get(User, signed_in.account.id)
        assert user is not None
        try:
            _HASHER.verify(user.password_hash, old)
        except (VerificationError, InvalidHashError):
            raise InputError("the current password is wrong") from None
        user.password_hash, user.must_change = _HASHER.hash(new), False
        audit.record(session, action="password_changed", actor=user.name, at=now)
        return _view(user)
