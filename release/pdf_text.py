"""Small PDF pieces: a PDF string literal, a standard Helvetica font, and
plain text PDFs for demo bundles and tests."""

from __future__ import annotations

import io
from typing import Any


def pdf_string(text: str) -> bytes:
    """``text`` as a PDF string literal (Latin-1; other characters become ?)."""
    safe = text.encode("latin-1", "replace")
    return b"(" + safe.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)") + b")"


def helvetica(base_font: str) -> Any:
    """A standard Type 1 font dictionary (no embedding needed)."""
    from pypdf.generic import DictionaryObject, NameObject

    return DictionaryObject({
        NameObject("/Type"): NameObject("/Font"),
        NameObject("/Subtype"): NameObject("/Type1"),
        NameObject("/BaseFont"): NameObject(f"/{base_font}"),
        NameObject("/Encoding"): NameObject("/WinAnsiEncoding"),
    })


def text_pdf(pages: list[list[str]]) -> bytes:
    """A plain PDF with one page per list of lines (A4, Helvetica): for
    demo bundles and tests, not for typesetting."""
    from pypdf import PageObject, PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    writer = PdfWriter()
    for lines in pages:
        page = PageObject.create_blank_page(width=595.0, height=842.0)
        ops = [b"BT /Body 11 Tf 14 TL 56 780 Td"]
        ops += [pdf_string(line) + b" Tj T*" for line in lines]
        ops.append(b"ET")
        content = DecodedStreamObject()
        content.set_data(b"\n".join(ops))
        font = helvetica("Helvetica")
        page[NameObject("/Resources")] = DictionaryObject({
            NameObject("/Font"): DictionaryObject({NameObject("/Body"): font})})
        page[NameObject("/Contents")] = content
        writer.add_page(page)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()
