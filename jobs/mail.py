"""Mail transports: ``.eml`` files (the embedded default) and SMTP."""

from __future__ import annotations

import os
import re
import smtplib
import ssl
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from email.message import Message
from pathlib import Path

from config.errors import DeliveryError
from config.settings import Settings


class MailTransport(ABC):
    """Hands messages to their next hop. Used by one relay thread at a time."""

    @abstractmethod
    def send(self, message: Message) -> str:
        """Deliver ``message``; return where it went (a path or a server).
        Sending the same Message-ID twice must not make two copies where the
        transport can prevent it. Raises DeliveryError when it may be retried."""

    def close(self) -> None:
        """Release any connection held between sends."""
        return None


class FileMailTransport(MailTransport):
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def send(self, message: Message) -> str:
        name = re.sub(r"[^A-Za-z0-9._-]", "_", str(message["Message-ID"]).strip("<>"))
        path = self.folder / f"{name}.eml"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".part-")
            with os.fdopen(fd, "wb") as handle:
                handle.write(message.as_bytes())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            raise DeliveryError(f"cannot write {path}: {exc.strerror}") from None
        return str(path)


class SmtpMailTransport(MailTransport):
    def __init__(self, host: str, port: int, *, security: str = "starttls",
                 username: str | None = None, password: str | None = None,
                 timeout: float = 10.0, context: ssl.SSLContext | None = None) -> None:
        """``context`` may be shared between transports (building one reads
        the system's CA certificates: ~45 ms); by default each builds its own
        on first use, and only for ``tls`` or ``starttls``."""
        self.host, self.port, self.security = host, port, security
        self.username, self.password, self.timeout = username, password, timeout
        self.context = context
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
        return smtp

    def send(self, message: Message) -> str:
        where = f"smtp://{self.host}:{self.port}"
        for reuse in (True, False):
            try:
                if self._smtp is None:
                    self._smtp = self._connect()
                self._smtp.send_message(message)
                return where
            except smtplib.SMTPServerDisconnected:
                self.close()
                if not reuse:
                    raise DeliveryError(f"{where} closed the connection") from None
            except smtplib.SMTPAuthenticationError as exc:
                self.close()
                raise DeliveryError(f"{where} refused the login: {exc.smtp_code}") from None
            except smtplib.SMTPResponseException as exc:
                self.close()
                raise DeliveryError(f"{where} answered {exc.smtp_code} "
                                    f"{exc.smtp_error!r}") from None
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
                self._smtp.quit()
            except (OSError, smtplib.SMTPException):
                pass
            self._smtp = None


def mail_probe(settings: Settings) -> SmtpMailTransport | None:
    """What a rehearsal asks of the mail server: None with the file transport."""
    if settings["mail.transport"] != "smtp":
        return None
    return SmtpMailTransport(
        settings["mail.smtp_host"], settings["mail.smtp_port"],
        security=settings["mail.smtp_security"], username=settings["mail.smtp_username"],
        password=settings["mail.smtp_password"])


def transport_factory(settings: Settings) -> Callable[[], MailTransport]:
    """Makes the configured transport, one per relay worker; SMTP transports
    share one TLS context."""
    if settings["mail.transport"] != "smtp":
        return lambda: FileMailTransport(settings.outbox_dir)
    context = (ssl.create_default_context() if settings["mail.smtp_security"] != "none"
               else None)
    return lambda: SmtpMailTransport(
        settings["mail.smtp_host"], settings["mail.smtp_port"],
        security=settings["mail.smtp_security"], username=settings["mail.smtp_username"],
        password=settings["mail.smtp_password"], context=context)
