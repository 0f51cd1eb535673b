"""Mail transports: ``.eml`` files (the embedded default, for trying Embargo
out: a copy delivered there is plaintext on this disk) and SMTP.

An SMTP transport can also send a message flattened ahead of time
(:class:`Prepared`, made by :func:`prepare_message`): the "published"
notices are built in the lead window before the instant, so that at the
instant the relay only hands bytes over an open connection."""

from __future__ import annotations

import copy
import io
import os
import re
import smtplib
import ssl
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from email.generator import BytesGenerator
from email.message import Message
from email.utils import format_datetime, getaddresses
from pathlib import Path
from typing import ClassVar

from sqlalchemy import select

from config.errors import DeliveryError, DeliveryRefused
from config.retry import SMTP_RECONNECT
from config.settings import Settings
from release import audit
from release.context import Services
from release.records import OutboxMessage, Purpose
from storage.db import transaction


@dataclass(frozen=True, kw_only=True)
class Prepared:
    """A message flattened as SMTP sends it (CRLF line ends), with its
    envelope, and its Date header left to be filled in when it goes: the
    bytes of ``message`` from :func:`prepare_message`, the Date aside."""

    message_id: str
    sender: str
    recipients: tuple[str, ...]
    before_date: bytes
    after_date: bytes

    def data(self, date: datetime) -> bytes:
        return self.before_date + format_datetime(date).encode("ascii") + self.after_date


def prepare_message(message: Message) -> Prepared | None:
    """``message`` flattened ahead of time, as ``smtplib.SMTP.send_message``
    would flatten it, with the envelope it would take from the headers; None
    when that is not possible here (an address that needs SMTPUTF8, no single
    Date header): such a message is sent by :meth:`MailTransport.send`."""
    sender = message["Sender"] if message["Sender"] is not None else message["From"]
    if sender is None or len(message.get_all("Date", [])) != 1:
        return None
    from_addr = getaddresses([str(sender)])[0][1]
    to_addrs = tuple(a[1] for a in getaddresses(
        [str(v) for field in ("To", "Cc", "Bcc") for v in message.get_all(field, [])]))
    if not from_addr or not to_addrs or not all(
            a.isascii() for a in (from_addr, *to_addrs)):
        return None
    flat = copy.copy(message)
    del flat["Bcc"]
    del flat["Resent-Bcc"]
    with io.BytesIO() as out:
        BytesGenerator(out).flatten(flat, linesep="\r\n")
        data = out.getvalue()
    value = str(message["Date"])
    line = b"\r\nDate: " + value.encode("ascii", "replace") + b"\r\n"
    head = b"\r\n" + data[:data.find(b"\r\n\r\n") + 2]  # the top-level headers
    at = head.find(line)
    if not value.isascii() or at < 0 or head.find(line, at + 1) >= 0:
        return None
    start = at + len(b"\r\nDate: ") - 2  # in ``data``, which lacks the leading CRLF
    return Prepared(message_id=str(message["Message-ID"]), sender=from_addr,
                    recipients=to_addrs, before_date=data[:start],
                    after_date=data[start + len(value):])


class MailTransport(ABC):
    """Hands messages to their next hop. Used by one relay thread at a time."""

    #: Whether :meth:`send_prepared` is supported (messages flattened ahead).
    prepares: ClassVar[bool] = False

    @abstractmethod
    def send(self, message: Message) -> str:
        """Deliver ``message``; return where it went (a path or a server).
        Sending the same Message-ID twice must not make two copies where the
        transport can prevent it. Raises DeliveryRefused when the server refused it
        for good (a 5xx about the message or its recipient), DeliveryError when
        it may be retried (a 4xx, no connection, a 5xx about the session)."""

    def send_prepared(self, prepared: Prepared, date: datetime) -> str:
        """Deliver a message flattened ahead of time, its Date set to
        ``date``; as :meth:`send` otherwise. Only where ``prepares``."""
        raise NotImplementedError(f"{type(self).__name__} does not send prepared messages")

    def connect(self) -> None:
        """Open the connection now rather than at the first send, where there
        is one. Raises DeliveryError when it cannot be opened."""
        return None

    def keep_alive(self) -> bool:
        """Check an open connection that has been idle (SMTP ``NOOP``),
        closing it when the server has dropped it, so the next send opens a
        new one. Returns whether a connection is still open."""
        return False

    def close(self) -> None:
        """Release any connection held between sends."""
        return None


class FileMailTransport(MailTransport):
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def send(self, message: Message) -> str:
        path = self.path_of(str(message["Message-ID"]))
        data = message.as_bytes()  # a message that cannot be flattened leaves no file
        tmp: str | None = None
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".part-")
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
            tmp = None
        except OSError as exc:
            raise DeliveryError(f"cannot write {path}: {exc.strerror}") from None
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
        return str(path)

    def path_of(self, message_id: str) -> Path:
        """Where the message with ``message_id`` is (or would be) written."""
        name = re.sub(r"[^A-Za-z0-9._-]", "_", message_id.strip().strip("<>"))
        return self.folder / f"{name}.eml"


class SmtpMailTransport(MailTransport):
    def __init__(self, host: str, port: int, *, security: str = "starttls",
                 username: str | None = None, password: str | None = None,
                 timeout: float = 10.0, context: ssl.SSLContext | None = None,
                 reply_timeout: float = 600.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        """``context`` may be shared between transports (building one reads
        the system's CA certificates: ~45 ms); by default each builds its own
        on first use, and only for ``tls`` or ``starttls``. ``timeout`` is
        for reaching the server (connect, EHLO, STARTTLS, login);
        ``reply_timeout`` for its replies about a message, the end of DATA
        above all: RFC 5321 (4.5.3.2.6) gives that ten minutes, and a client
        that stops waiting sooner sends again a message the server has."""
        self.host, self.port, self.security = host, port, security
        self.username, self.password, self.timeout = username, password, timeout
        self.reply_timeout = reply_timeout
        self.context = context
        self.sleep = sleep
        self._smtp: smtplib.SMTP | None = None

    def _tls(self) -> ssl.SSLContext:
        if self.context is None:
            self.context = ssl.create_default_context()
        return self.context

    def _connect(self) -> smtplib.SMTP:
        smtp: smtplib.SMTP
        if self.security == "tls":
            smtp = smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout,
                                    context=self._tls())
        else:
            smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
            if self.security == "starttls":
                smtp.starttls(context=self._tls())
        if self.username:
            smtp.login(self.username, self.password or "")
        # EHLO now (after STARTTLS it must be said again): else the first message of
        # a connection opened ahead of the instant pays for it, at the instant
        smtp.ehlo_or_helo_if_needed()
        if smtp.sock is not None:
            smtp.sock.settimeout(max(self.timeout, self.reply_timeout))
        return smtp

    prepares = True

    def send(self, message: Message) -> str:
        return self._send(lambda smtp: smtp.send_message(message))

    def send_prepared(self, prepared: Prepared, date: datetime) -> str:
        data = prepared.data(date)
        return self._send(lambda smtp: smtp.sendmail(prepared.sender, list(prepared.recipients),
                                                     data))

    def connect(self) -> None:
        if self._smtp is not None:
            return
        where = f"smtp://{self.host}:{self.port}"
        try:
            self._smtp = self._connect()
        except smtplib.SMTPAuthenticationError as exc:
            raise DeliveryError(f"{where} refused the login: {exc.smtp_code}") from None
        except (OSError, smtplib.SMTPException) as exc:
            raise DeliveryError(f"{where} cannot be reached: {exc}") from None

    def keep_alive(self) -> bool:
        if self._smtp is None:
            return False
        try:
            if self._smtp.sock is not None:
                self._smtp.sock.settimeout(self.timeout)
            code, _ = self._smtp.noop()
            if self._smtp.sock is not None:
                self._smtp.sock.settimeout(max(self.timeout, self.reply_timeout))
        except (OSError, smtplib.SMTPException):
            code = 0
        if code != 250:
            self.close()
            return False
        return True

    def _send(self, hand_over: Callable[[smtplib.SMTP], object]) -> str:
        where = f"smtp://{self.host}:{self.port}"
        for attempt in (1, 2):  # a connection held since the last send may have been closed
            connecting = self._smtp is None
            try:
                if self._smtp is None:
                    self._smtp = self._connect()
                connecting = False
                hand_over(self._smtp)
                return where
            except smtplib.SMTPServerDisconnected:
                self.close()
                if attempt == 2:
                    raise DeliveryError(f"{where} closed the connection") from None
                self.sleep(SMTP_RECONNECT.seconds(attempt))
            except smtplib.SMTPAuthenticationError as exc:
                self.close()  # a setting to fix, then every notice goes: temporary
                raise DeliveryError(f"{where} refused the login: {exc.smtp_code}") from None
            except smtplib.SMTPRecipientsRefused as exc:
                self.close()
                code, words = next(iter(exc.recipients.values()), (0, b""))
                raise _answered(where, "refused the recipient", code, words) from None
            except smtplib.SMTPSenderRefused as exc:
                self.close()  # 552 with SIZE: this message is too big; the rest is the
                # session (530 authentication required, sender not allowed): a setting
                # to fix, then every notice goes, like a refused login
                if exc.smtp_code == 552:
                    raise _answered(where, "answered", exc.smtp_code, exc.smtp_error) from None
                raise DeliveryError(f"{where} refused the sender {exc.sender}: "
                                    f"{exc.smtp_code} {_words(exc.smtp_error)}") from None
            except (smtplib.SMTPConnectError, smtplib.SMTPHeloError) as exc:
                self.close()  # the greeting, EHLO: about the session, not this message
                raise DeliveryError(f"{where} would not talk: {exc.smtp_code} "
                                    f"{_words(exc.smtp_error)}") from None
            except smtplib.SMTPResponseException as exc:
                self.close()
                if connecting:  # STARTTLS refused: the session again
                    raise DeliveryError(f"{where} would not talk: {exc.smtp_code} "
                                        f"{_words(exc.smtp_error)}") from None
                raise _answered(where, "answered", exc.smtp_code, exc.smtp_error) from None
            except (OSError, smtplib.SMTPException) as exc:
                self.close()
                raise DeliveryError(f"{where} cannot be reached: {exc}") from None
        raise DeliveryError(f"{where} failed")  # pragma: no cover

    def probe(self) -> str:
        """The rehearsal's check (release.rehearsal.MailProbe): connect, TLS
        as configured, log in, ``NOOP``, quit, on a connection of its own."""
        where = f"smtp://{self.host}:{self.port}"
        try:
            smtp = self._connect()
            try:
                code, answer = smtp.noop()
                if code != 250:
                    raise DeliveryError(f"{where} answered NOOP with {code} {answer!r}")
            finally:
                try:
                    smtp.quit()
                except (OSError, smtplib.SMTPException):
                    pass
        except smtplib.SMTPAuthenticationError as exc:
            raise DeliveryError(f"{where} refused the login: {exc.smtp_code}") from None
        except (OSError, smtplib.SMTPException) as exc:
            raise DeliveryError(f"{where} cannot be reached: {exc}") from None
        return where

    def close(self) -> None:
        if self._smtp is not None:
            try:
                if self._smtp.sock is not None:  # a server that hangs is not waited for
                    self._smtp.sock.settimeout(self.timeout)
                self._smtp.quit()
            except (OSError, smtplib.SMTPException):
                pass
            self._smtp = None


def mail_probe(settings: Settings) -> SmtpMailTransport | None:
    """What a rehearsal asks of the mail server: None with the file transport."""
    if settings.mail.transport != "smtp":
        return None
    return SmtpMailTransport(
        settings.mail.smtp_host, settings.mail.smtp_port,
        security=settings.mail.smtp_security, username=settings.mail.smtp_username,
        password=settings.mail.smtp_password)


def remove_copy_files(services: Services, release_id: str, folder: Path, *,
                      actor: str) -> tuple[int, int]:
    """After a cancellation: delete the release's pre-embargo copies left as
    files in the file outbox (plaintext documents, base64), delivered or
    not. Returns (files removed, copies delivered by mail, which remain in
    the officers' mailboxes). Audited when a file was removed."""
    with transaction(services.sessions) as session:
        rows = session.execute(select(OutboxMessage.message_id, OutboxMessage.delivered_to)
                               .where(OutboxMessage.release_id == release_id,
                                      OutboxMessage.purpose == Purpose.COPY)).all()
    files = FileMailTransport(folder)
    removed: list[str] = []
    mailed = 0
    for message_id, delivered_to in rows:
        path = files.path_of(message_id)
        if path.exists():
            path.unlink()
            removed.append(path.name)
        elif delivered_to and delivered_to.startswith("smtp://"):
            mailed += 1
    if removed:
        with transaction(services.sessions) as session:
            audit.record(session, action="copy_files_removed", actor=actor,
                         at=services.clock.now(), release_id=release_id,
                         details={"folder": str(folder), "files": removed})
    return len(removed), mailed


def _words(words: bytes | str) -> str:
    return words.decode("utf-8", "replace") if isinstance(words, bytes) else str(words)


def _answered(where: str, what: str, code: int, words: bytes | str) -> DeliveryError:
    """The error for a server's reply about this message or its recipient: a
    5xx is permanent (DeliveryRefused), anything else may be retried.
    Carries the server's own words."""
    error = DeliveryRefused if 500 <= code < 600 else DeliveryError
    return error(f"{where} {what}: {code} {_words(words)}")


def transport_factory(settings: Settings) -> Callable[[], MailTransport]:
    """Makes the configured transport, one per relay worker; SMTP transports
    share one TLS context."""
    mail = settings.mail
    if mail.transport != "smtp":
        return lambda: FileMailTransport(settings.outbox_dir)
    context = ssl.create_default_context() if mail.smtp_security != "none" else None
    return lambda: SmtpMailTransport(
        mail.smtp_host, mail.smtp_port, security=mail.smtp_security,
        username=mail.smtp_username, password=mail.smtp_password, context=context)
