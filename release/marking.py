"""Marking pre-embargo copies: every page of a PDF gets the embargo line and
the copy id, and the copy id goes into the PDF's metadata, so a leaked file
names the officer it was sent to. Other files are sent unchanged (their copy
id travels in the message)."""

from __future__ import annotations

import io
import re

from config.errors import InputError

COPY_ID = re.compile(r"\bCPY-[0-9A-HJKMNP-TV-Z]{4}-[0-9A-HJKMNP-TV-Z]{4}-[0-9A-HJKMNP-TV-Z]{4}\b")
METADATA_KEY = "/EmbargoCopyId"


def stamp_line(headline: str, copy_id: str) -> str:
    return f"EMBARGOED UNTIL {headline} - NOT FOR PUBLICATION - COPY {copy_id}"


def _pdf_text(text: str) -> bytes:
    safe = text.encode("latin-1", "replace")
    return b"(" + safe.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)") + b")"


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
        text = _pdf_text(line)
        content = DecodedStreamObject()
        content.set_data(
            b"q 0.75 0 0 rg BT /EmbargoStamp %.1f Tf %.1f %.1f Td %s Tj ET "
            b"BT /EmbargoStamp %.1f Tf %.1f %.1f Td %s Tj ET Q"
            % (size, left + 18, bottom + height - 14, text,
               size, left + 18, bottom + 8, text))
        font = DictionaryObject({
            NameObject("/Type"): NameObject("/Font"),
            NameObject("/Subtype"): NameObject("/Type1"),
            NameObject("/BaseFont"): NameObject("/Helvetica-Bold"),
            NameObject("/Encoding"): NameObject("/WinAnsiEncoding"),
        })
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


def text_pdf(pages: list[list[str]]) -> bytes:
    """A plain PDF with one page per list of lines (A4, Helvetica): for
    demo bundles and tests, not for typesetting."""
    from pypdf import PageObject, PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    writer = PdfWriter()
    for lines in pages:
        page = PageObject.create_blank_page(width=595.0, height=842.0)
        ops = [b"BT /Body 11 Tf 14 TL 56 780 Td"]
        ops += [_pdf_text(line) + b" Tj T*" for line in lines]
        ops.append(b"ET")
        content = DecodedStreamObject()
        content.set_data(b"\n".join(ops))
        font = DictionaryObject({
            NameObject("/Type"): NameObject("/Font"),
            NameObject("/Subtype"): NameObject("/Type1"),
            NameObject("/BaseFont"): NameObject("/Helvetica"),
            NameObject("/Encoding"): NameObject("/WinAnsiEncoding"),
        })
        page[NameObject("/Resources")] = DictionaryObject({
            NameObject("/Font"): DictionaryObject({NameObject("/Body"): font})})
        page[NameObject("/Contents")] = content
        writer.add_page(page)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def find_copy_id(data: bytes) -> str | None:
    """The copy id a file carries: in a PDF's metadata or page text, or
    anywhere in a text file. None when there is none."""
    if data.startswith(b"%PDF"):
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError

        try:
            reader = PdfReader(io.BytesIO(data))
            meta = reader.metadata
            found = str(meta.get(METADATA_KEY, "")) if meta is not None else ""
            if COPY_ID.fullmatch(found):
                return found
            for page in reader.pages:
                match = COPY_ID.search(page.extract_text() or "")
                if match:
                    return match.group(0)
        except (PdfReadError, ValueError, KeyError, TypeError):
            pass
    match = COPY_ID.search(data.decode("latin-1"))
    return match.group(0) if match else None
