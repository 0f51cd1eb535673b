"""Sealing: the vault format, one sealed object per document.

Modelled on the STREAM construction used by Tink's streaming AEAD and age.

- Per release a random 32-byte data key (DEK). It is sealed with HPKE (RFC 9180,
  base mode, suite X25519 / HKDF-SHA256 / AES-256-GCM) to the publisher's public
  key, with ``info = b"embargo/v1/dek/" + release_id``.
- Per document, a header: magic ``EMB1`` (4 bytes), segment size (4 bytes,
  big-endian, default 65536), salt (16 random bytes), nonce prefix (7 random
  bytes).
- Document key = HKDF-SHA256(DEK, salt, info = ``b"embargo/v1/doc/" +
  document_id``), 32 bytes. Each segment is AES-256-GCM with nonce = prefix (7)
  ‖ segment counter (4, big-endian, from 0) ‖ last-segment flag (1: ``01`` on the
  last segment, else ``00``), and the header as associated data. Every segment
  but the last holds exactly the segment size of plaintext; the last holds 1 to
  segment-size bytes (an empty document is one empty last segment).
- Ids in ``info`` strings are UTF-8.

Truncation, reordering, a swapped document, a wrong key and a flipped byte all
fail with the one opaque :class:`~config.errors.SealError`. Memory stays flat
(about two segments) whatever the document's size.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from config.errors import SealError

DEK_SIZE = 32
MAGIC = b"EMB1"
DEFAULT_SEGMENT_SIZE = 65536
MIN_SEGMENT_SIZE = 1024
MAX_SEGMENT_SIZE = 16 * 1024 * 1024

_SALT_SIZE = 16
_PREFIX_SIZE = 7
_TAG_SIZE = 16
HEADER_SIZE = len(MAGIC) + 4 + _SALT_SIZE + _PREFIX_SIZE  # 31

# The segment counter is 4 bytes: at most 2**32 segments per document.
_MAX_SEGMENTS = 2**32

_DEK_INFO = b"embargo/v1/dek/"
_DOC_INFO = b"embargo/v1/doc/"
_LAST = b"\x01"
_NOT_LAST = b"\x00"
_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)

_ReadInto = Callable[[memoryview], "int | None"]


@dataclass(frozen=True, kw_only=True)
class StreamResult:
    """What went through a stream: plaintext size in bytes and its SHA-256 (hex)."""

    size: int
    sha256: str


def new_dek() -> bytes:
    """Return a fresh random data key of :data:`DEK_SIZE` bytes."""
    return os.urandom(DEK_SIZE)


def seal_dek(dek: bytes, public_key: X25519PublicKey, release_id: str) -> bytes:
    """Return ``dek`` sealed with HPKE to ``public_key`` for ``release_id``.

    Raises ``ValueError`` if ``dek`` is not :data:`DEK_SIZE` bytes long.
    """
    _check_dek(dek)
    return _SUITE.encrypt(dek, public_key, info=_DEK_INFO + release_id.encode())


def open_dek(sealed: bytes, private_key: X25519PrivateKey, release_id: str) -> bytes:
    """Return the data key inside ``sealed``.

    Raises :class:`SealError` if it was sealed to another key or another
    release, was tampered with, or does not hold a key of the right size.
    """
    try:
        dek = _SUITE.decrypt(sealed, private_key, info=_DEK_INFO + release_id.encode())
    except (InvalidTag, ValueError):
        raise SealError() from None
    if len(dek) != DEK_SIZE:
        raise SealError()
    return dek


def seal_stream(
    dek: bytes,
    document_id: str,
    src: BinaryIO,
    dst: BinaryIO,
    *,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    on_progress: Callable[[int], None] | None = None,
) -> StreamResult:
    """Seal everything ``src`` holds into ``dst``; return the plaintext's size
    and SHA-256.

    ``on_progress`` is called after each segment with its plaintext size.
    Raises ``ValueError`` for a DEK of the wrong size, a segment size outside
    :data:`MIN_SEGMENT_SIZE`..:data:`MAX_SEGMENT_SIZE`, or a document of more
    than 2**32 segments (``dst`` is then incomplete).
    """
    _check_dek(dek)
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise ValueError(
            f"segment size must be {MIN_SEGMENT_SIZE} to {MAX_SEGMENT_SIZE} bytes, "
            f"not {segment_size}"
        )
    salt = os.urandom(_SALT_SIZE)
    prefix = os.urandom(_PREFIX_SIZE)
    header = MAGIC + segment_size.to_bytes(4, "big") + salt + prefix
    aead = _document_aead(dek, salt, document_id)
    readinto = _reader(src)
    hasher = hashlib.sha256()
    _write_all(dst, memoryview(header))

    # One byte more than a segment is read, so a full segment is known to be
    # the last one exactly when nothing follows it; the extra byte is carried
    # to the front of the buffer for the next segment.
    in_view = memoryview(bytearray(segment_size + 1))
    out_view = memoryview(bytearray(segment_size + _TAG_SIZE))
    carried = 0
    counter = 0
    total = 0
    while True:
        got = carried + _read_full(readinto, in_view[carried:])
        last = got <= segment_size
        size = got if last else segment_size
        if counter >= _MAX_SEGMENTS:
            raise ValueError("document too large: more than 2**32 segments")
        nonce = prefix + counter.to_bytes(4, "big") + (_LAST if last else _NOT_LAST)
        plain = in_view[:size]
        hasher.update(plain)
        sealed = out_view[: size + _TAG_SIZE]
        aead.encrypt_into(nonce, plain, header, sealed)
        _write_all(dst, sealed)
        total += size
        if on_progress is not None:
            on_progress(size)
        if last:
            return StreamResult(size=total, sha256=hasher.hexdigest())
        in_view[0] = in_view[segment_size]
        carried = 1
        counter += 1


def open_stream(
    dek: bytes,
    document_id: str,
    src: BinaryIO,
    dst: BinaryIO,
    *,
    on_progress: Callable[[int], None] | None = None,
) -> StreamResult:
    """Open the sealed object in ``src`` into ``dst``; return the plaintext's
    size and SHA-256.

    Each segment is written to ``dst`` only once it has authenticated, but a
    failure part-way leaves the segments before it in ``dst``: on error, discard
    ``dst``. ``on_progress`` is called after each segment with its plaintext
    size. Raises :class:`SealError` for a bad header, a wrong key or document
    id, and any truncation, reordering, extension or flipped byte; raises
    ``ValueError`` for a DEK of the wrong size.
    """
    _check_dek(dek)
    readinto = _reader(src)
    header_buf = bytearray(HEADER_SIZE)
    if _read_full(readinto, memoryview(header_buf)) != HEADER_SIZE:
        raise SealError()
    header = bytes(header_buf)
    if header[:4] != MAGIC:
        raise SealError()
    segment_size = int.from_bytes(header[4:8], "big")
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise SealError()
    salt = header[8 : 8 + _SALT_SIZE]
    prefix = header[8 + _SALT_SIZE :]
    aead = _document_aead(dek, salt, document_id)
    hasher = hashlib.sha256()

    chunk = segment_size + _TAG_SIZE
    in_view = memoryview(bytearray(chunk + 1))
    out_view = memoryview(bytearray(segment_size))
    carried = 0
    counter = 0
    total = 0
    while True:
        got = carried + _read_full(readinto, in_view[carried:])
        last = got <= chunk
        size = got if last else chunk
        # Only a lone segment may be empty; anything shorter than a tag is cut.
        if size < _TAG_SIZE or (last and size == _TAG_SIZE and counter > 0):
            raise SealError()
        if counter >= _MAX_SEGMENTS:
            raise SealError()
        nonce = prefix + counter.to_bytes(4, "big") + (_LAST if last else _NOT_LAST)
        plain = out_view[: size - _TAG_SIZE]
        try:
            aead.decrypt_into(nonce, in_view[:size], header, plain)
        except InvalidTag:
            raise SealError() from None
        hasher.update(plain)
        _write_all(dst, plain)
        total += len(plain)
        if on_progress is not None:
            on_progress(len(plain))
        if last:
            return StreamResult(size=total, sha256=hasher.hexdigest())
        in_view[0] = in_view[chunk]
        carried = 1
        counter += 1


def seal_bytes(
    dek: bytes, document_id: str, data: bytes, *, segment_size: int = DEFAULT_SEGMENT_SIZE
) -> bytes:
    """Return ``data`` sealed as one object; raises as :func:`seal_stream`."""
    dst = io.BytesIO()
    seal_stream(dek, document_id, io.BytesIO(data), dst, segment_size=segment_size)
    return dst.getvalue()


def open_bytes(dek: bytes, document_id: str, blob: bytes) -> bytes:
    """Return the plaintext of the sealed object ``blob``; raises as
    :func:`open_stream`."""
    dst = io.BytesIO()
    open_stream(dek, document_id, io.BytesIO(blob), dst)
    return dst.getvalue()


def _check_dek(dek: bytes) -> None:
    if len(dek) != DEK_SIZE:
        raise ValueError(f"a data key is {DEK_SIZE} bytes, not {len(dek)}")


def _document_aead(dek: bytes, salt: bytes, document_id: str) -> AESGCM:
    key = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=salt,
        info=_DOC_INFO + document_id.encode(),
    ).derive(dek)
    return AESGCM(key)


def _reader(src: BinaryIO) -> _ReadInto:
    """Return a ``readinto`` for ``src``, falling back to ``read`` and a copy
    for file-likes that have no ``readinto`` (some HTTP response bodies)."""
    readinto = getattr(src, "readinto", None)
    if callable(readinto):
        return cast(_ReadInto, readinto)

    def read_into(view: memoryview) -> int:
        data = src.read(len(view))
        view[: len(data)] = data
        return len(data)

    return read_into


def _read_full(readinto: _ReadInto, view: memoryview) -> int:
    """Fill ``view`` from the source; return the bytes read, fewer only at the
    end of the stream."""
    filled = 0
    while filled < len(view):
        got = readinto(view[filled:])
        if got is None:
            raise BlockingIOError("source stream is non-blocking and has no data ready")
        if got == 0:
            break
        filled += got
    return filled


def _write_all(dst: BinaryIO, view: memoryview) -> None:
    """Write all of ``view``, even to a raw stream that writes only part."""
    while view:
        written = dst.write(view)
        view = view[written:]
