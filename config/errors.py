"""The one exception tree of Embargo.

Every layer raises a subclass of :class:`EmbargoError`; the command line turns
any of them into one line on standard error and a non-zero exit status.
"""

from __future__ import annotations


class EmbargoError(Exception):
    """Root of every error Embargo raises on purpose. ``str(error)`` is the
    whole message a user sees."""

    exit_status = 1


class ConfigError(EmbargoError):
    """A setting is missing or has a value that cannot be used."""

    exit_status = 2


class InputError(EmbargoError):
    """Something the user gave (a manifest, a date, a file, an id) is wrong."""

    exit_status = 2


class NotFoundError(EmbargoError):
    """A release, document, key or stored object does not exist."""

    exit_status = 3


class StateError(EmbargoError):
    """The action does not fit the release's current state (for example,
    cancelling a release that is already published)."""

    exit_status = 4


class SealError(EmbargoError):
    """A sealed object or data key could not be opened.

    Deliberately opaque: a flipped byte, a truncation, a reordering, a swapped
    object and a wrong key all give the same message."""

    exit_status = 5

    def __init__(self, message: str = "sealed data could not be opened: it is damaged, "
                 "tampered with, or sealed to another key") -> None:
        super().__init__(message)


class StorageError(EmbargoError):
    """A storage backend (database, vault, public target) failed."""

    exit_status = 6


class DeliveryError(EmbargoError):
    """A message could not be handed to the mail server; worth retrying."""

    exit_status = 7


class DeliveryRefused(DeliveryError):
    """The mail server refused the message for good (a 5xx reply, a refused
    recipient): retrying the same message to the same address cannot help."""
