"""What the service returns: frozen, typed views, never ORM rows.

The command line and the web console render these, and ``--json`` is a view
serialised by :func:`to_data` (instants as ISO 8601 UTC with a ``Z``, enums
as their text). Each view has a JSON Schema under ``docs/json/``, written by
:func:`json_schema` (``python -m release.views docs/json``)."""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from release.records import Purpose, ReleaseState


@dataclass(frozen=True, kw_only=True)
class Moment:
    """An instant shown both ways ("00:01 BST Thu 4 Sep 2014 (23:01 UTC Wed
    3 Sep)", in the release's zone) with the raw UTC instant."""

    utc: datetime
    shown: str


@dataclass(frozen=True, kw_only=True)
class DocumentView:
    id: str
    kind: str  # "report" or "letter"
    organisation: str | None
    filename: str
    content_type: str
    size: int
    sha256: str
    published_at: Moment | None
    public_url: str | None


@dataclass(frozen=True, kw_only=True)
class RecipientView:
    id: str
    name: str
    email: str
    organisation: str | None


@dataclass(frozen=True, kw_only=True)
class ReleaseSummary:
    """One release as ``embargo list`` shows it."""

    id: str
    slug: str
    title: str
    state: ReleaseState
    owner: str | None
    instant: datetime  # the embargo, UTC
    zone: str
    wall: str  # the local wall time that was asked for, e.g. 2014-09-04T00:01
    embargo: str  # the embargo shown both ways
    time_left: str | None  # while queued or publishing
    published_at: Moment | None
    lateness_ms: float | None
    reason: str | None  # why it failed or was cancelled
    copies_at: Moment | None  # when pre-embargo copies go (or went)
    documents: tuple[DocumentView, ...]
    recipient_count: int
    forced_reason: str | None  # approved by its own submitter, why; until someone reviews it


@dataclass(frozen=True, kw_only=True)
class AccessEntry:
    """One officer's pre-embargo copy: who, of what, when."""

    copy_id: str
    name: str
    email: str
    organisation: str | None
    documents: tuple[str, ...]  # file names, in attachment order
    issued_at: Moment
    sent_at: Moment | None


class NoticeState(StrEnum):
    DELIVERED = "delivered"
    FAILED = "failed"  # refused for good, or the message could not be built
    GIVEN_UP = "given up"  # retried until mail.give_up_after, or too late for a copy
    PENDING = "pending"  # waiting, or being retried (see its last error)


@dataclass(frozen=True, kw_only=True)
class NoticeView:
    """One outbox notice; ``number`` is how ``resend`` names it."""

    number: int
    to: str
    purpose: Purpose
    message_id: str
    state: NoticeState
    delivered_at: Moment | None
    via: str | None
    attempts: int
    given_up_at: Moment | None
    failed_at: Moment | None
    last_error: str | None


@dataclass(frozen=True, kw_only=True)
class EventView:
    seq: int
    at: datetime
    action: str
    actor: str
    details: dict[str, object]


@dataclass(frozen=True, kw_only=True)
class RehearsalView:
    """The newest rehearsal of a release: when, for which lead ("1h before",
    or "by hand"), whether it would publish, and the report's lines."""

    at: Moment
    lead: str
    ready: bool
    lines: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class ReleaseDetail(ReleaseSummary):
    """One release in full, as ``embargo show`` shows it. A failed or
    cancelled release's documents that are public all the same (a partial
    publication) carry their ``public_url``."""

    started_at: Moment | None  # the first attempt at publication
    created_by: str  # who built it (queued it, or made the draft)
    submitted_by: str | None  # who sent the draft for approval (the console)
    approved_by: str | None
    review_comment: str | None  # the last send-back comment for its editor
    rehearsal: RehearsalView | None  # the newest rehearsal, if any
    recipients: tuple[RecipientView, ...]
    access_list: tuple[AccessEntry, ...]
    notices: tuple[NoticeView, ...]
    events: tuple[EventView, ...]


@dataclass(frozen=True, kw_only=True)
class TraceResult:
    """Whose copy a leaked file or copy id is."""

    copy_id: str
    release_id: str
    title: str
    name: str
    email: str
    organisation: str | None
    issued_at: Moment
    sent_at: Moment | None


@dataclass(frozen=True, kw_only=True)
class NodeStatus:
    """One ``embargo run`` node as the database server's clock sees it."""

    name: str
    state: str  # live, stopped, or "silent (dead?)"
    started_at: datetime
    heartbeat_at: datetime
    heartbeat_s_ago: float
    skew_ms: float | None
    clock_ok: bool
    doing: str | None


@dataclass(frozen=True, kw_only=True)
class Finding:
    """One line of a check: what was looked at, whether it is fine, why not."""

    what: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{self.what:8} {'ok  ' if self.ok else 'FAIL'} {self.detail}"


@dataclass(frozen=True, kw_only=True)
class Counts:
    """How many releases are in each state."""

    draft: int = 0
    awaiting_approval: int = 0
    queued: int = 0
    publishing: int = 0
    published: int = 0
    cancelled: int = 0
    failed: int = 0

    @property
    def active(self) -> int:
        return self.queued + self.publishing


VIEWS: tuple[type, ...] = (ReleaseSummary, ReleaseDetail, AccessEntry, TraceResult, NodeStatus,
                           Finding, Counts)


# -- serialising ---------------------------------------------------------------------------
def utc_text(instant: datetime) -> str:
    return instant.astimezone(UTC).isoformat().replace("+00:00", "Z")


def to_data(value: object) -> object:
    """A view (or a list of views) as plain JSON data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, StrEnum):
        return value.value
    if isinstance(value, datetime):
        return utc_text(value)
    if isinstance(value, list | tuple):
        return [to_data(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_data(v) for k, v in value.items()}
    return value


def to_json(value: object) -> str:
    return json.dumps(to_data(value), indent=2, ensure_ascii=False)


# -- schemas ---------------------------------------------------------------------------------
def json_schema(view: type) -> dict[str, object]:
    """The JSON Schema (2020-12) of ``view`` as :func:`to_data` writes it."""
    defs: dict[str, object] = {}
    root = _object_schema(view, defs)
    schema: dict[str, object] = {"$schema": "https://json-schema.org/draft/2020-12/schema",
                                 "$id": f"{view.__name__}.schema.json",
                                 "title": view.__name__}
    schema.update(root)
    if defs:
        schema["$defs"] = defs
    return schema


def _object_schema(cls: type, defs: dict[str, object]) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    schema: dict[str, object] = {
        "type": "object",
        "properties": {name: _type_schema(hints[name], defs) for name in names},
        "required": names,
        "additionalProperties": False,
    }
    doc = (cls.__doc__ or "").strip()
    if doc and not doc.startswith(cls.__name__ + "("):
        schema["description"] = " ".join(doc.split())
    return schema


def _type_schema(hint: object, defs: dict[str, object]) -> dict[str, object]:
    if isinstance(hint, types.UnionType):
        return {"anyOf": [_type_schema(arg, defs) for arg in typing.get_args(hint)]}
    origin = typing.get_origin(hint)
    if origin is tuple:
        return {"type": "array", "items": _type_schema(typing.get_args(hint)[0], defs)}
    if origin is dict:
        return {"type": "object"}
    if hint is type(None):
        return {"type": "null"}
    if isinstance(hint, type) and issubclass(hint, StrEnum):
        return {"enum": [member.value for member in hint]}
    if hint is datetime:
        return {"type": "string", "format": "date-time", "pattern": r"Z$"}
    if hint is bool:
        return {"type": "boolean"}
    if hint is int:
        return {"type": "integer"}
    if hint is float:
        return {"type": "number"}
    if hint is str:
        return {"type": "string"}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if hint.__name__ not in defs:
            defs[hint.__name__] = {}  # placeholder: a view may nest itself
            defs[hint.__name__] = _object_schema(hint, defs)
        return {"$ref": f"#/$defs/{hint.__name__}"}
    raise TypeError(f"no JSON Schema for {hint!r}")


def settings_schema() -> dict[str, object]:
    """The schema of ``embargo config show --json``: every setting by its
    dotted key (secrets masked), then the effective locations."""
    from config.settings import FIELDS

    scalar = {"anyOf": [{"type": ["string", "number", "boolean", "null"]},
                        {"type": "array", "items": {"type": "string"}}]}
    keys = [f.key for f in FIELDS] + [
        f"(effective) {k}" for k in ("database.url", "storage.vault", "storage.public",
                                     "keys.dir", "mail.outbox_dir")]
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "Settings.schema.json", "title": "Settings", "type": "object",
            "description": "The effective settings, as `embargo config show --json` prints "
                           "them; secrets are shown as \"(set)\".",
            "properties": {key: scalar for key in keys}, "required": keys,
            "additionalProperties": False}


def schemas() -> dict[str, dict[str, object]]:
    """Every schema under ``docs/json/``, by file name."""
    found = {f"{view.__name__}.schema.json": json_schema(view) for view in VIEWS}
    found["Settings.schema.json"] = settings_schema()
    return found


def write_schemas(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in schemas().items():
        path = folder / name
        path.write_text(json.dumps(schema, indent=2) + "\n", encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write_schemas(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/json")):
        sys.stdout.write(f"{path}\n")
