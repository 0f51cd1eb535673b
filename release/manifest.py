"""The queue manifest: a TOML file naming the documents and recipients of one
release. Everything is checked here, before anything is sealed or stored."""

from __future__ import annotations

import mimetypes
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from config.errors import InputError
from release import text as texts

TOP_KEYS = {"title", "publish_on", "at", "zone", "owner", "copies_at", "documents", "recipients"}
DOCUMENT_KEYS = {"path", "kind", "organisation", "name", "content_type"}
RECIPIENT_KEYS = {"name", "email", "organisation"}
KINDS = ("report", "letter")
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ].+")
_EMAIL = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
                    r"[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$")


@dataclass(frozen=True, kw_only=True)
class DocumentSpec:
    path: Path
    filename: str
    kind: str
    organisation: str | None
    content_type: str
    size: int


@dataclass(frozen=True, kw_only=True)
class RecipientSpec:
    name: str
    email: str
    organisation: str | None


@dataclass(frozen=True, kw_only=True)
class ReleaseSpec:
    """A validated request to queue a release. Times stay as the user wrote
    them; the service resolves them against its clock."""

    title: str
    publish_on: str
    at: str | None
    zone: str | None
    owner: str | None
    copies_at: str | None
    documents: tuple[DocumentSpec, ...]
    recipients: tuple[RecipientSpec, ...]
    warnings: tuple[str, ...] = field(default=())


# Deeper than any manifest needs: [[documents]] is a list of tables of text.
MAX_DEPTH = 4
_CONTENT_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*$")
# Limits per field: (maximum characters). See release/text.py.
_LIMITS = {"title": texts.TITLE_MAX, "name": texts.NAME_MAX,
           "organisation": texts.ORGANISATION_MAX, "email": texts.EMAIL_MAX,
           "owner": texts.EMAIL_MAX, "content_type": texts.CONTENT_TYPE_MAX,
           "path": 4096}


def check_email(email: str, where: str) -> str:
    # The pattern is ASCII without controls: stricter than release.text.
    if not isinstance(email, str):
        raise InputError(f"{where}: an email address must be text")
    email = email.strip()
    if len(email) > texts.EMAIL_MAX or not _EMAIL.match(email):
        raise InputError(f"{where}: {email!r} is not a valid email address")
    return email


def safe_filename(name: str) -> str:
    """The last part of ``name`` as a file name: ``../../x.pdf`` becomes
    ``x.pdf``. Raises InputError if nothing usable is left, or if the name
    cannot be published (see :func:`release.text.clean_filename`)."""
    base = PureWindowsPath(PurePosixPath(name.replace("\\", "/")).name).name.strip()
    if base in ("", ".", ".."):
        raise InputError(f"{name!r} does not name a file")
    return texts.clean_filename(base, field="file name")


def _text(table: dict[str, Any], key: str, where: str, *, required: bool,
          max_len: int | None = None) -> str | None:
    value = table.get(key)
    if value is None:
        if required:
            raise InputError(f"{where}: {key!r} is required")
        return None
    return texts.clean_text(value, field=f"{where}: {key!r}",
                            max_len=max_len or _LIMITS.get(key, texts.FLAG_MAX),
                            required=required) or None


def _flag(value: str | None, name: str) -> str | None:
    """A command-line value, through the same validator as the file's."""
    return texts.optional_text(value, field=name, max_len=texts.FLAG_MAX)


def _depth(value: Any) -> int:
    """How deeply ``value`` nests lists and tables (without recursion)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if level > MAX_DEPTH:
            break
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def _document_path(base: Path, rel: str, here: str) -> Path:
    """The document's file, checked to exist, be a regular file and be
    readable; every problem (a part too long for the file system included)
    is one InputError."""
    for part in PurePosixPath(rel.replace("\\", "/")).parts:
        if len(part.encode("utf-8")) > texts.FILENAME_MAX_BYTES:
            raise InputError(f"{here}: a part of the path {part[:40]!r}… is longer than "
                             f"{texts.FILENAME_MAX_BYTES} bytes, more than a file system allows")
    try:
        file_path = (base / rel).expanduser() if not Path(rel).is_absolute() else Path(rel)
        if not file_path.exists():
            raise InputError(f"{here}: file {file_path} does not exist")
        if not file_path.is_file():
            raise InputError(f"{here}: {file_path} is not a regular file")
        if not os.access(file_path, os.R_OK):
            raise InputError(f"{here}: file {file_path} is not readable")
        file_path.stat()
    except OSError as exc:
        raise InputError(f"{here}: path {rel[:80]!r} cannot be used: "
                         f"{exc.strerror or exc}") from None
    except ValueError as exc:
        raise InputError(f"{here}: path {rel[:80]!r} cannot be used: {exc}") from None
    return file_path


def _unknown(table: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise InputError(f"{where}: unknown key{'s' if len(extra) > 1 else ''} "
                         f"{', '.join(repr(k) for k in extra)} "
                         f"(allowed: {', '.join(sorted(allowed))})")


def load_manifest(path: Path, *, publish_on: str | None = None, at: str | None = None,
                  zone: str | None = None, copies_at: str | None = None) -> ReleaseSpec:
    """Read and check a manifest; command-line values override the file's.

    Raises InputError with one line naming the manifest, the entry and the
    problem."""
    try:
        with path.open("rb") as handle:
            table = tomllib.load(handle)
    except FileNotFoundError:
        raise InputError(f"manifest {path} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"manifest {path} is a folder, not a file") from None
    except OSError as exc:
        raise InputError(f"manifest {path} cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"manifest {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise InputError(f"manifest {path} is not UTF-8 text") from None
    except RecursionError:
        raise InputError(f"manifest {path} nests values more deeply than a manifest "
                         f"needs (at most {MAX_DEPTH} levels)") from None
    except ValueError as exc:  # e.g. a NUL in the path
        raise InputError(f"manifest {str(path)[:80]!r} cannot be read: {exc}") from None
    where = str(path)
    if _depth(table) > MAX_DEPTH:
        raise InputError(f"{where}: values nest more deeply than a manifest needs "
                         f"(at most {MAX_DEPTH} levels)")
    publish_on, at = _flag(publish_on, "--publish-on"), _flag(at, "--at")
    zone, copies_at = _flag(zone, "--zone"), _flag(copies_at, "--copies-at")
    _unknown(table, TOP_KEYS, where)
    title = _text(table, "title", where, required=True)
    assert title is not None
    when = publish_on or _text(table, "publish_on", where, required=False)
    if not when:
        raise InputError(f"{where}: no publication date: set publish_on or use --publish-on")
    owner = _text(table, "owner", where, required=False)
    if owner:
        owner = check_email(owner, f"{where}: owner")

    base = path.parent
    documents: list[DocumentSpec] = []
    names: dict[str, int] = {}
    raw_docs = table.get("documents", [])
    if not isinstance(raw_docs, list) or not raw_docs:
        raise InputError(f"{where}: at least one [[documents]] entry is required")
    for number, raw in enumerate(raw_docs, start=1):
        here = f"{where}: document {number}"
        if not isinstance(raw, dict):
            raise InputError(f"{here}: must be a table")
        _unknown(raw, DOCUMENT_KEYS, here)
        rel = _text(raw, "path", here, required=True)
        assert rel is not None
        kind = _text(raw, "kind", here, required=True)
        if kind not in KINDS:
            raise InputError(f"{here}: kind {kind!r} is not one of {', '.join(KINDS)}")
        organisation = _text(raw, "organisation", here, required=kind == "letter")
        file_path = _document_path(base, rel, here)
        given = _text(raw, "name", here, required=False, max_len=4 * texts.FILENAME_MAX_BYTES)
        try:
            filename = safe_filename(given or file_path.name)
        except InputError as exc:
            raise InputError(f"{here}: {exc}") from None
        folded = texts.fold(filename)
        if folded in names:
            raise InputError(f"{here}: two documents are named {filename!r} "
                             f"(document {names[folded]} too; names that differ only in "
                             "case collide on case-insensitive stores)")
        names[folded] = number
        content_type = (_text(raw, "content_type", here, required=False)
                        or mimetypes.guess_type(filename)[0] or "application/octet-stream")
        if not _CONTENT_TYPE.match(content_type):
            raise InputError(f"{here}: content_type {content_type!r} is not a media type "
                             "like application/pdf")
        documents.append(DocumentSpec(path=file_path, filename=filename, kind=kind,
                                      organisation=organisation, content_type=content_type,
                                      size=file_path.stat().st_size))
    if not any(d.kind == "report" for d in documents):
        raise InputError(f"{where}: no document has kind = \"report\"")

    recipients: list[RecipientSpec] = []
    emails: set[str] = set()
    raw_recipients = table.get("recipients", [])
    if not isinstance(raw_recipients, list):
        raise InputError(f"{where}: recipients must be a list of [[recipients]] tables")
    for number, raw in enumerate(raw_recipients, start=1):
        here = f"{where}: recipient {number}"
        if not isinstance(raw, dict):
            raise InputError(f"{here}: must be a table")
        _unknown(raw, RECIPIENT_KEYS, here)
        name = _text(raw, "name", here, required=True)
        email = check_email(_text(raw, "email", here, required=True) or "", here)
        if email.lower() in emails:
            raise InputError(f"{here}: {email} is listed twice")
        emails.add(email.lower())
        assert name is not None
        recipients.append(RecipientSpec(name=name, email=email,
                                        organisation=_text(raw, "organisation", here,
                                                           required=False)))
    orgs = {r.organisation for r in recipients}
    warnings = tuple(
        f"letter {d.filename} is for {d.organisation}, which has no recipient"
        for d in documents if d.kind == "letter" and d.organisation not in orgs
    )
    return ReleaseSpec(
        title=title, publish_on=when,
        # A timestamp on the command line carries its own time of day: the
        # file's `at` belongs to the file's date, not to it.
        at=at or (None if publish_on and _TIMESTAMP.match(publish_on.strip())
                  else _text(table, "at", where, required=False)),
        zone=zone or _text(table, "zone", where, required=False),
        owner=owner,
        copies_at=copies_at or _text(table, "copies_at", where, required=False),
        documents=tuple(documents), recipients=tuple(recipients), warnings=warnings,
    )
