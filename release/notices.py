"""The words of each notice: built from the records when the relay delivers
it, so a retry sends the same message under the same Message-ID."""

from __future__ import annotations

import html
from email.message import EmailMessage
from email.utils import format_datetime

from release.records import OutboxMessage, Recipient, Release
from release.service import embargo_of


def _links(release: Release, organisation: str | None) -> tuple[list[str], str | None]:
    lines = [f"- {d.filename}: {d.public_url}" for d in release.documents if d.kind == "report"]
    letter = next((d for d in release.documents
                   if d.kind == "letter" and organisation and d.organisation == organisation),
                  None)
    return lines, (f"{letter.filename}: {letter.public_url}" if letter else None)


def compose(row: OutboxMessage, release: Release, recipient: Recipient | None,
            *, sender: str) -> EmailMessage:
    """The message for one outbox row, with its stable Message-ID."""
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
    return message


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
