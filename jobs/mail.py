"""Mail transports: ``.eml`` files (the embedded default) and SMTP."""

from __future__ import annotations

import os
import re
import smtplib
import ssl
import tempfile
from abc import ABC, abstractmethod
from email.message import EmailMessage
from pathlib import Path

from config.errors import DeliveryError
from config.settings import Settings


class MailTransport(ABC):
    """Hands messages to their next hop. Used by one relay thread at a time."""

    @abstractmethod
    def send(self, message: EmailMessage) -> str:
        """Deliver ``message``; return where it went (a path or a server).
        Sending the same Message-ID twice must not make two copies where the
        transport can prevent it. Raises DeliveryError when it may be retried."""

    def close(self) -> None:
        """Release any connection held between sends."""
        return None


class FileMailTransport(MailTransport):
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def send(self, message: EmailMessage) -> str:
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
                 timeout: float = 10.0) -> None:
        self.host, self.port, self.security = host, port, security
        self.username, self.password, self.timeout = username, password, timeout
        self._smtp: smtplib.SMTP | None = None

    def _connect(self) -> smtplib.SMTP:
        context = ssl.create_default_context()
        smtp: smtplib.SMTP
        if self.security == "tls":
            smtp = smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout, context=context)
        else:
            smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
            if self.security == "starttls":
                smtp.starttls(context=context)
        if self.username:
            smtp.login(self.username, self.password or "")
        return smtp

    def send(self, message: EmailMessage) -> str:
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

    def close(self) -> None:
        if self._smtp is not None:
            try:
                self._smtp.quit()
            except (OSError, smtplib.SMTPException):
                pass
            self._smtp = None


def make_transport(settings: Settings) -> MailTransport:
    if settings["mail.transport"] == "smtp":
        return SmtpMailTransport(
            settings["mail.smtp_host"], settings["mail.smtp_port"],
            security=settings["mail.smtp_security"], username=settings["mail.smtp_username"],
            password=settings["mail.smtp_password"])
    return FileMailTransport(settings.outbox_dir)
