"""The words of each notice: built from the records when the relay delivers
it, so a retry sends the same message under the same Message-ID. (The
"published" notices are built once more ahead of the instant, and used only
while their inputs are unchanged: :func:`published_inputs`.)

Messages are built with the standard library's ``email.mime`` classes (the
compat32 policy) rather than ``EmailMessage``: the newer API parses and
refolds every header it is given, which made composing and flattening a
notice cost ~4.5 ms against ~1 ms, on the path of every notice after the
instant. Display names, file names (RFC 2231) and bodies (quoted-printable
UTF-8) outside ASCII are encoded here; the generator encodes any other header
(RFC 2047)."""

from __future__ import annotations

import html
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from email import encoders
from email.charset import QP, Charset
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from email.utils import format_datetime, formataddr, getaddresses
from typing import assert_never

from release.alerts import alert_text
from release.copy_ids import COPY_ID
from release.instants import embargo_of
from release.marking import stamp_line, stamp_pdf
from release.records import Document, OutboxMessage, Purpose, Recipient, Release

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


@dataclass(frozen=True, kw_only=True)
class Delivery:
    """What became of one officer's notice of publication, for the owner's
    summary."""

    name: str
    address: str
    delivered: bool
    error: str | None = None


def compose(row: OutboxMessage, release: Release, recipient: Recipient | None,
            *, sender: str, attachments: Sequence[Attachment] = (),
            summary: Sequence[Delivery] | None = None,
            unstampable: str = "refuse") -> Message:
    """The message for one outbox row, with its stable Message-ID. A
    pre-embargo copy carries its documents, PDFs stamped with the copy id.
    The owner's summary says what became of each officer's notice
    (``summary``, once they are all done). Raises whatever a record that
    cannot be composed, or a PDF that cannot be stamped, raises: the relay
    records it against this notice. With ``unstampable="send-unmarked"``
    (``copies.unstampable``) such a PDF is attached unmarked instead, its
    copy id in the headers and body only."""
    embargo = embargo_of(release)
    # The headers first; the MIME structure is built at the end, around the body.
    message = Message()
    message["From"] = _address(sender)
    message["To"] = _address(row.to_addr)
    message["Message-ID"] = row.message_id
    message["Date"] = format_datetime(row.created_at)
    message["X-Embargo-Release"] = release.id
    purpose = Purpose(row.purpose)  # an unknown purpose raises ValueError: no default words
    if purpose is Purpose.PUBLISHED:
        assert recipient is not None
        reports, letter = _links(release, recipient.organisation)
        subject = f"Published: {release.title}"
        text = [f"Dear {recipient.name},", "",
                f"The embargo on \"{release.title}\" has lifted: it was published at "
                f"{embargo.describe_long()}.", "", "The national report:", *reports]
        if letter:
            text += ["", f"The letter to {recipient.organisation}:", f"- {letter}"]
        text += ["", "This notice was sent automatically by Embargo."]
    elif purpose is Purpose.COPY:
        assert recipient is not None
        copy_id = attachments[0].copy_id if attachments else _copy_id(row)
        subject = f"EMBARGOED UNTIL {embargo.headline()}: {release.title}"
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
    elif purpose is Purpose.WITHDRAWN or purpose is Purpose.RESCHEDULED:
        assert recipient is not None
        copy_id = _copy_id(row)
        message["X-Embargo-Copy-Id"] = copy_id
        if purpose is Purpose.WITHDRAWN:
            subject = f"WITHDRAWN: {release.title}"
            text = [f"Dear {recipient.name},", "",
                    f"The release \"{release.title}\", which was embargoed until "
                    f"{embargo.describe_long()}, has been withdrawn and will not be "
                    "published.", "",
                    f"Please delete your pre-embargo copy ({copy_id}) and do not share it."]
        else:
            subject = (f"NEW EMBARGO: {release.title} is now embargoed until "
                       f"{embargo.headline()}")
            text = [f"Dear {recipient.name},", "",
                    f"The embargo on \"{release.title}\" has changed. It is now "
                    f"embargoed until {embargo.describe_long()}.", "",
                    f"Your pre-embargo copy ({copy_id}) must not be published or shared "
                    "before then."]
    elif purpose is Purpose.OWNER_SUMMARY:
        subject = f"Release published: {release.title}"
        text = [f"\"{release.title}\" was published for {embargo.describe_long()}.",
                f"Publication started {release.lateness_ms or 0:.1f} ms after the instant.", "",
                "Documents:", *[f"- {d.filename} ({d.size} bytes): {d.public_url}"
                                for d in release.documents], "",
                *_summary_lines(summary or [])]
    elif purpose is Purpose.ALERT:
        subject, text = alert_text(row.details)
        text = [*text, "", f"Release {release.id}: \"{release.title}\", due "
                f"{embargo.describe_long()}.", "",
                "This alert was sent automatically by Embargo."]
    elif purpose is Purpose.OWNER_FAILURE:
        subject = f"FAILED: {release.title} was not published"
        text = [f"Publication of \"{release.title}\" ({release.id}), due "
                f"{embargo.describe_long()}, has failed and needs attention:", "",
                f"  {release.reason}", "",
                f"Run `embargo show {release.id}` for the details."]
    else:
        assert_never(purpose)
    message["Subject"] = subject  # the generator encodes non-ASCII (RFC 2047)
    body = "\n".join(text) + "\n"
    links = frozenset(d.public_url for d in release.documents if d.public_url)
    alternative = MIMEMultipart("alternative", None, [_text(body, "plain"),
                                                     _text(_html(body, links), "html")])
    if attachments:
        root = MIMEMultipart("mixed", None, [alternative, *(
            _attachment(a, embargo.headline(), unstampable) for a in attachments)])
        del alternative["MIME-Version"]
    else:
        root = alternative
    for name, value in message.items():
        root[name] = value
    return root


def published_inputs(release: Release) -> tuple[object, ...]:
    """What a "published" notice takes from its release, for :func:`compose`:
    two notices to the same recipient (:func:`recipient_inputs`) whose
    releases give equal tuples are the same message but for their Date.
    The relay builds these notices before the instant, from the public
    addresses the documents will have, and sends one so built only when the
    published release still gives the same tuple. Keep in step with
    ``compose``."""
    return release_inputs(release.id, release.title, release.instant, release.zone,
                          release.wall, [(d.kind, d.filename, d.organisation, d.public_url)
                                         for d in release.documents])


def release_inputs(release_id: str, title: str, instant: datetime, zone: str, wall: str,
                   documents: Iterable[tuple[str, str, str | None, str | None]]
                   ) -> tuple[object, ...]:
    """:func:`published_inputs` from the values themselves (documents as
    ``(kind, filename, organisation, public_url)``, in their order), for a
    reader that does not load the records."""
    return (release_id, title, instant, zone, wall, tuple(tuple(d) for d in documents))


def recipient_inputs(row: OutboxMessage, name: str | None, organisation: str | None,
                     sender: str) -> tuple[object, ...]:
    """What a "published" notice takes from its outbox row (but its Date,
    ``created_at``), its recipient's name and organisation, and the sender;
    see :func:`published_inputs`."""
    return (row.message_id, row.release_id, row.purpose, row.to_addr, sender, name,
            organisation)


def _summary_lines(summary: Sequence[Delivery]) -> list[str]:
    delivered = [d for d in summary if d.delivered]
    failed = [d for d in summary if not d.delivered]
    lines = [f"Notices of publication: delivered {len(delivered)}, failed {len(failed)} "
             f"(of {len(summary)} liaison officers)."]
    if failed:
        lines += ["", "Not delivered (see `embargo show`; `embargo resend` sends again):",
                  *[f"- {d.name} <{d.address}>: {d.error or 'no reason recorded'}"
                    for d in failed]]
    if delivered:
        lines += ["", "Delivered:", *[f"- {d.name} <{d.address}>" for d in delivered]]
    return lines


_UTF8_QP = Charset("utf-8")
_UTF8_QP.body_encoding = QP


def _text(body: str, subtype: str) -> MIMENonMultipart:
    part = MIMENonMultipart("text", subtype)
    part.set_payload(body, "us-ascii" if body.isascii() else _UTF8_QP)
    del part["MIME-Version"]  # once, at the top of the message
    return part


def _address(value: str) -> str:
    """An address header value with any non-ASCII display name encoded."""
    if value.isascii():
        return value
    return ", ".join(formataddr(pair, charset="utf-8") for pair in getaddresses([value]))


def _copy_id(row: OutboxMessage) -> str:
    match = COPY_ID.search(row.message_id)
    return match.group(0) if match else "unknown"


def _attachment(attachment: Attachment, headline: str, unstampable: str) -> MIMEBase:
    document = attachment.document
    data = attachment.data
    if document.content_type == "application/pdf":
        try:
            data = stamp_pdf(data, line=stamp_line(headline, attachment.copy_id),
                             copy_id=attachment.copy_id)
        except Exception:  # pypdf raises many classes on a malformed PDF
            if unstampable != "send-unmarked":
                raise
            log.warning("%s cannot be stamped; attached unmarked (copies.unstampable = "
                        "send-unmarked: the copy id is in the message only)", document.filename)
    maintype, _, subtype = document.content_type.partition("/")
    part = MIMEBase(maintype or "application", subtype or "octet-stream")
    del part["MIME-Version"]  # once, at the top of the message
    part.set_payload(data)
    encoders.encode_base64(part)
    filename: str | tuple[str, str, str] = (
        document.filename if document.filename.isascii() else ("utf-8", "", document.filename))
    part.add_header("Content-Disposition", "attachment", filename=filename)
    return part


def _html(text: str, links: frozenset[str] = frozenset()) -> str:
    """The HTML part: every line escaped; only the release's own public
    addresses (``links``) become links, never text that came from a name,
    a title or a file name."""
    parts = []
    for line in text.splitlines():
        escaped = html.escape(line)
        label, _, url = line[2:].rpartition(": ")
        if line.startswith("- ") and url in links:
            escaped = (f'&bull; {html.escape(label)}: '
                       f'<a href="{html.escape(url, quote=True)}">{html.escape(url)}</a>')
        parts.append(f"{escaped}<br>")
    return "<html><body>" + "\n".join(parts) + "</body></html>\n"
