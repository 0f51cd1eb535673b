"""The words of each notice: built from the records when the relay delivers
it, so a retry sends the same message under the same Message-ID."""

from __future__ import annotations

import html
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import format_datetime

from config.errors import InputError
from release.context import embargo_of
from release.marking import COPY_ID, stamp_line, stamp_pdf
from release.records import Document, OutboxMessage, Recipient, Release

log = logging.getLogger(__name__)


def _links(release: Release, organisation: str | None) -> tuple[list[str], str | None]:
    lines = [f"- {d.filename}: {d.public_url}" for d in release.documents if d.kind == "report"]
    letter = next((d for d in release.documents
                   if d.kind == "letter" and organisation and d.organisation == organisation),
                  None)
    return lines, (f"{letter.filename}: {letter.public_url}" if letter else None)


@dataclass(frozen=True, kw_only=True)
class Attachment:
    document: Document
    data: bytes
    copy_id: str


def compose(row: OutboxMessage, release: Release, recipient: Recipient | None,
            *, sender: str, attachments: Sequence[Attachment] = ()) -> EmailMessage:
    """The message for one outbox row, with its stable Message-ID. A
    pre-embargo copy carries its documents, PDFs stamped with the copy id."""
    embargo = embargo_of(release)
    message = EmailMessage()
    message["From"] = sender
    message["To"] = row.to_addr
    message["Message-ID"] = row.message_id
    message["Date"] = format_datetime(row.created_at)
    message["X-Embargo-Release"] = release.id
    if row.purpose == "published":
        assert recipient is not None
        reports, letter = _links(release, recipient.organisation)
        message["Subject"] = f"Published: {release.title}"
        text = [f"Dear {recipient.name},", "",
                f"The embargo on \"{release.title}\" has lifted: it was published at "
                f"{embargo.describe_long()}.", "", "The national report:", *reports]
        if letter:
            text += ["", f"The letter to {recipient.organisation}:", f"- {letter}"]
        text += ["", "This notice was sent automatically by Embargo."]
    elif row.purpose == "copy":
        assert recipient is not None
        copy_id = attachments[0].copy_id if attachments else _copy_id(row)
        message["Subject"] = f"EMBARGOED UNTIL {embargo.headline()}: {release.title}"
        message["X-Embargo-Copy-Id"] = copy_id
        message["X-Embargo-Until"] = embargo.instant.isoformat().replace("+00:00", "Z")
        text = [f"Dear {recipient.name},", "",
                f"Attached is an embargoed copy of \"{release.title}\"",
                "with the letter to " + (recipient.organisation or "your organisation") + ".",
                "", f"EMBARGOED UNTIL {embargo.describe_long()}.", "",
                "These documents must not be published, shared or quoted before that time.",
                f"This copy is numbered {copy_id} and is recorded against your name; "
                "PDF pages carry the number.", "", "Attached:",
                *[f"- {a.document.filename}" for a in attachments]]
    elif row.purpose in ("withdrawn", "rescheduled"):
        assert recipient is not None
        copy_id = _copy_id(row)
        message["X-Embargo-Copy-Id"] = copy_id
        if row.purpose == "withdrawn":
            message["Subject"] = f"WITHDRAWN: {release.title}"
            text = [f"Dear {recipient.name},", "",
                    f"The release \"{release.title}\", which was embargoed until "
                    f"{embargo.describe_long()}, has been withdrawn and will not be "
                    "published.", "",
                    f"Please delete your pre-embargo copy ({copy_id}) and do not share it."]
        else:
            message["Subject"] = (f"NEW EMBARGO: {release.title} is now embargoed until "
                                  f"{embargo.headline()}")
            text = [f"Dear {recipient.name},", "",
                    f"The embargo on \"{release.title}\" has changed. It is now "
                    f"embargoed until {embargo.describe_long()}.", "",
                    f"Your pre-embargo copy ({copy_id}) must not be published or shared "
                    "before then."]
    elif row.purpose == "owner_summary":
        message["Subject"] = f"Release published: {release.title}"
        text = [f"\"{release.title}\" was published for {embargo.describe_long()}.",
                f"Publication started {release.lateness_ms or 0:.1f} ms after the instant.", "",
                "Documents:", *[f"- {d.filename} ({d.size} bytes): {d.public_url}"
                                for d in release.documents], "",
                f"{len(release.recipients)} liaison officers are being notified."]
    else:
        message["Subject"] = f"FAILED: {release.title} was not published"
        text = [f"Publication of \"{release.title}\" ({release.id}), due "
                f"{embargo.describe_long()}, has failed and needs attention:", "",
                f"  {release.reason}", "",
                f"Run `embargo show {release.id}` for the details."]
    body = "\n".join(text) + "\n"
    message.set_content(body)
    message.add_alternative(_html(body), subtype="html")
    for attachment in attachments:
        _attach(message, attachment, embargo.headline())
    return message


def _copy_id(row: OutboxMessage) -> str:
    match = COPY_ID.search(row.message_id)
    return match.group(0) if match else "unknown"


def _attach(message: EmailMessage, attachment: Attachment, headline: str) -> None:
    document = attachment.document
    data = attachment.data
    if document.content_type == "application/pdf":
        try:
            data = stamp_pdf(data, line=stamp_line(headline, attachment.copy_id),
                             copy_id=attachment.copy_id)
        except InputError:
            log.warning("%s is not a readable PDF; attached unmarked", document.filename)
    maintype, _, subtype = document.content_type.partition("/")
    message.add_attachment(data, maintype=maintype or "application",
                           subtype=subtype or "octet-stream", filename=document.filename)


def _html(text: str) -> str:
    parts = []
    for line in text.splitlines():
        escaped = html.escape(line)
        if line.startswith("- ") and "://" in line:
            label, _, url = line[2:].rpartition(": ")
            escaped = (f'&bull; {html.escape(label)}: '
                       f'<a href="{html.escape(url, quote=True)}">{html.escape(url)}</a>')
        parts.append(f"{escaped}<br>")
    return "<html><body>" + "\n".join(parts) + "</body></html>\n"
