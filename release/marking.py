"""Marking pre-embargo copies: every page of a PDF gets the embargo line and
the copy id, and the copy id goes into the PDF's metadata, so a leaked file
names the officer it was sent to. Other files are sent unchanged (their copy
id travels in the message). Finding the id again is :mod:`release.copy_ids`."""

from __future__ import annotations

import io
import logging

from config.errors import InputError
from release.copy_ids import METADATA_KEY
from release.pdf_text import helvetica, pdf_string

log = logging.getLogger(__name__)


def stamp_line(headline: str, copy_id: str) -> str:
    return f"EMBARGOED UNTIL {headline} - NOT FOR PUBLICATION - COPY {copy_id}"


def trial_stamp(data: bytes, *, filename: str, headline: str, unstampable: str) -> None:
    """Stamp the PDF ``data`` in memory as a pre-embargo copy would be, and
    throw the result away: a PDF that cannot be stamped is refused at the
    door (InputError with pypdf's reason, one line) unless ``unstampable`` is
    ``"send-unmarked"``, when it is logged and its copies go unmarked."""
    copy_id = "CPY-0000-0000-0000"
    try:
        stamp_pdf(data, line=stamp_line(headline, copy_id), copy_id=copy_id)
    except Exception as exc:  # pypdf raises ValueError, AttributeError,
        # TypeError, KeyError, RecursionError, its own PdfError tree incl. LimitReachedError…
        # on malformed files: any of them means "cannot be stamped"
        if unstampable != "send-unmarked":
            reason = str(exc).splitlines()[0][:200] if str(exc) else ""
            raise InputError(
                f"{filename} cannot be stamped as a pre-embargo copy "
                f"({type(exc).__name__}{': ' + reason if reason else ''}); repair the PDF, "
                "or set copies.unstampable = \"send-unmarked\" to send it unmarked with the "
                "copy id in the message only") from None
        log.warning("%s cannot be stamped (%s); its copies go unmarked",
                    filename, type(exc).__name__)


def stamp_pdf(data: bytes, *, line: str, copy_id: str) -> bytes:
    """A copy of the PDF ``data`` with ``line`` drawn at the top and bottom
    of every page and ``copy_id`` in the document information.
    Raises InputError if ``data`` is not a readable PDF."""
    from pypdf import PageObject, PdfReader, PdfWriter
    from pypdf.errors import PdfReadError
    from pypdf.generic import (
        DecodedStreamObject,
        DictionaryObject,
        NameObject,
    )

    try:
        reader = PdfReader(io.BytesIO(data))
        writer = PdfWriter(clone_from=reader)
    except (PdfReadError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"not a readable PDF: {exc}") from None
    for page in writer.pages:
        box = page.mediabox
        width, height = float(box.width), float(box.height)
        left, bottom = float(box.left), float(box.bottom)
        size = 8.0
        overlay = PageObject.create_blank_page(width=width, height=height)
        text = pdf_string(line)
        content = DecodedStreamObject()
        content.set_data(
            b"q 0.75 0 0 rg BT /EmbargoStamp %.1f Tf %.1f %.1f Td %s Tj ET "
            b"BT /EmbargoStamp %.1f Tf %.1f %.1f Td %s Tj ET Q"
            % (size, left + 18, bottom + height - 14, text,
               size, left + 18, bottom + 8, text))
        font = helvetica("Helvetica-Bold")
        overlay[NameObject("/Resources")] = DictionaryObject({
            NameObject("/Font"): DictionaryObject({NameObject("/EmbargoStamp"): font})})
        overlay[NameObject("/Contents")] = content
        page.merge_page(overlay)
    metadata = {k: str(v) for k, v in (reader.metadata or {}).items()}
    metadata[METADATA_KEY] = copy_id
    metadata["/Subject"] = line
    writer.add_metadata(metadata)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()
