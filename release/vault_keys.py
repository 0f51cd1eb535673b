"""The names of a release's objects in the vault."""

from __future__ import annotations


def dek_key(release_id: str) -> str:
    """The release's sealed data key."""
    return f"releases/{release_id}/dek.hpke"


def document_key(release_id: str, document_id: str) -> str:
    """One sealed document of the release."""
    return f"releases/{release_id}/{document_id}.emb"
