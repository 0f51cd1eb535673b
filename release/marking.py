"""Marking pre-embargo copies: every page of a PDF gets the embargo line and
the copy id, and the copy id goes into the PDF's metadata, so a leaked file
names the officer it was sent to. Other files are sent unchanged (their copy
id travels in the message). Finding the id again is :mod:`release.copy_ids`."""

from __future__ import annotations

import io

from config.errors import InputError
from release.copy_ids import METADATA_KEY
from release.pdf_text import helvetica, pdf_string


def stamp_line(headline: str, copy_id: str) -> str:
    return f"EMBARGOED UNTIL {headline} - NOT FOR PUBLICATION - COPY {copy_id}"


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
