"""Copy ids (``CPY-XXXX-XXXX-XXXX``): making one, and finding the one a
leaked file carries (in a PDF's metadata or page text, or in a text file)."""

from __future__ import annotations

import io
import re
import secrets

COPY_ID = re.compile(r"\bCPY-[0-9A-HJKMNP-TV-Z]{4}-[0-9A-HJKMNP-TV-Z]{4}-[0-9A-HJKMNP-TV-Z]{4}\b")
METADATA_KEY = "/EmbargoCopyId"
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford: no I, L, O, U


def new_copy_id() -> str:
    chars = "".join(secrets.choice(_ALPHABET) for _ in range(12))
    return f"CPY-{chars[:4]}-{chars[4:8]}-{chars[8:]}"


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
