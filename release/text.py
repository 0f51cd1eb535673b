"""The one validator for text that people give Embargo: titles, names,
organisations, file names, reasons, flag values. The manifest, the command
line and the web console all call it, so a value accepted by one is accepted
by all, and refused the same way on SQLite and PostgreSQL.

A value is refused (:class:`~config.errors.InputError`, one line naming the
field) when it is not text, holds a control character (C0, DEL, C1: a CR LF
in a title becomes a mail header, a NUL is refused by PostgreSQL), a byte-
order mark, a line or paragraph separator, a bidirectional override (text
that displays other than it reads), or a lone surrogate (not encodable as
UTF-8), or when it is longer than the database column holds. Accepted text
is stripped of surrounding spaces and normalised to NFC, so that the same
name typed on two keyboards is the same name.
"""

from __future__ import annotations

import unicodedata

from config.errors import InputError

# Column limits, in characters, shared with release/records.py.
TITLE_MAX = 500
NAME_MAX = 200
ORGANISATION_MAX = 200
EMAIL_MAX = 320
CONTENT_TYPE_MAX = 100
REASON_MAX = 2000
FLAG_MAX = 200
# A file name is one path part: most file systems and S3 keys allow 255 bytes.
FILENAME_MAX_BYTES = 255
# Names a document may not have: the manifest written beside the documents,
# and anything hidden (a leading dot: staging folders, probes, dot files).
RESERVED_FILENAMES = frozenset({"manifest.json"})

_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_SEPARATORS = frozenset("\u2028\u2029\u0085")


def _problem(char: str) -> str | None:
    """Why ``char`` may not appear in a value, or None when it may."""
    if char == "\ufeff":
        return "a byte-order mark"
    if char in _SEPARATORS:
        return "a line separator"
    if char in _BIDI:
        return "a bidirectional override"
    category = unicodedata.category(char)
    if category == "Cc":
        return "a control character"
    if category == "Cs":
        return "a lone surrogate (not valid UTF-8)"
    return None


def clean_text(value: object, *, field: str, max_len: int, required: bool = True) -> str:
    """``value`` checked and normalised (stripped, NFC).

    Raises InputError naming ``field`` if ``value`` is not text, holds a
    character no field may hold (see the module's docstring), is empty while
    ``required``, or is longer than ``max_len`` characters. An empty value
    that is not required comes back as ``""``."""
    if not isinstance(value, str):
        raise InputError(f"{field} must be text, not {type(value).__name__}")
    for position, char in enumerate(value, start=1):
        problem = _problem(char)
        if problem is not None:
            raise InputError(f"{field} contains {problem} (U+{ord(char):04X}) at "
                             f"character {position}")
    text = unicodedata.normalize("NFC", value.strip())
    if required and not text:
        raise InputError(f"{field} must not be empty")
    if len(text) > max_len:
        raise InputError(f"{field} is {len(text)} characters long; at most {max_len} "
                         "are allowed")
    return text


def optional_text(value: object, *, field: str, max_len: int) -> str | None:
    """Like :func:`clean_text` for a value that may be absent: None and
    blank text give None."""
    if value is None:
        return None
    return clean_text(value, field=field, max_len=max_len, required=False) or None


def clean_filename(value: object, *, field: str) -> str:
    """A document's published file name: :func:`clean_text`, and one path
    part of at most :data:`FILENAME_MAX_BYTES` bytes in UTF-8, not hidden
    (no leading dot) and not reserved (``manifest.json``, in any case, for
    case-insensitive stores). Raises InputError."""
    name = clean_text(value, field=field, max_len=4 * FILENAME_MAX_BYTES)  # bytes: below
    if "/" in name or "\\" in name:
        raise InputError(f"{field} {name!r} must be a file name, not a path")
    if name.startswith("."):
        raise InputError(f"{field} {name!r} starts with a dot: hidden and reserved names "
                         "cannot be published")
    if name.casefold() in RESERVED_FILENAMES:
        raise InputError(f"{field} {name!r} is reserved: the release's manifest.json is "
                         "published under that name")
    size = len(name.encode("utf-8"))
    if size > FILENAME_MAX_BYTES:
        raise InputError(f"{field} {name[:40]!r}… is {size} bytes in UTF-8; file names may "
                         f"have at most {FILENAME_MAX_BYTES}")
    return name


def fold(name: str) -> str:
    """The form two names are compared in for case-insensitive stores."""
    return unicodedata.normalize("NFC", name.casefold())
