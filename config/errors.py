"""The one exception tree of Embargo.

Every layer raises a subclass of :class:`EmbargoError`, in the domain's words
and with the facts (ids, revisions), never naming a command or a page. Each
interface maps the tree once: the command line to an exit status and a hint
(``jobs/cli.py``), the web console to an HTTP status (:data:`HTTP_STATUS`),
both through :func:`status_for`.
"""

from __future__ import annotations

from collections.abc import Mapping


class EmbargoError(Exception):
    """Root of every error Embargo raises on purpose. ``str(error)`` is the
    whole message a user sees."""


class ConfigError(EmbargoError):
    """A setting is missing or has a value that cannot be used."""


class InputError(EmbargoError):
    """Something the user gave (a manifest, a date, a file, an id) is wrong."""


class AmbiguousIdError(InputError):
    """A shortened release id matches more than one release."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        super().__init__(f"{prefix!r} matches more than one release; give more of the id")


class NotFoundError(EmbargoError):
    """A release, document, key or stored object does not exist."""


class ReleaseNotFoundError(NotFoundError):
    """No release has this id (or id prefix)."""

    def __init__(self, release_id: str) -> None:
        self.release_id = release_id
        super().__init__(f"no release {release_id!r}")


class StateError(EmbargoError):
    """The action does not fit the release's current state (for example,
    cancelling a release that is already published)."""


class SealError(EmbargoError):
    """A sealed object or data key could not be opened.

    Deliberately opaque: a flipped byte, a truncation, a reordering, a swapped
    object and a wrong key all give the same message."""

    def __init__(self, message: str = "sealed data could not be opened: it is damaged, "
                 "tampered with, or sealed to another key") -> None:
        super().__init__(message)


class StorageError(EmbargoError):
    """A storage backend (database, vault, public target) failed."""


class SchemaError(StorageError):
    """The database's schema is not the one this code needs (missing, older
    or newer); nothing was changed. Carries both revisions."""

    def __init__(self, *, current: str | None, needed: str) -> None:
        self.current = current
        self.needed = needed
        found = "has no Embargo schema" if current is None else f"schema is at {current}"
        super().__init__(f"the database {found}; this version of Embargo needs {needed}")


class DeliveryError(EmbargoError):
    """A message could not be handed to the mail server; worth retrying."""



class DeliveryRefused(DeliveryError):
    """The mail server refused the message for good (a 5xx reply, a refused
    recipient): retrying the same message to the same address cannot help."""

# The web console's mapping (the command line's is in jobs/cli.py): not found
# 404, bad input 422, wrong state 409; anything else is the server's problem.
HTTP_STATUS: Mapping[type[EmbargoError], int] = {
    NotFoundError: 404,
    InputError: 422,
    StateError: 409,
    EmbargoError: 500,
}


def status_for(error: EmbargoError, table: Mapping[type[EmbargoError], int]) -> int:
    """The status ``table`` gives the nearest class of ``error`` (a subclass
    takes its parent's status unless it has its own)."""
    for cls in type(error).__mro__:
        if cls in table:
            return table[cls]
    raise LookupError(f"{type(error).__name__} has no status in the table")
