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
whatever the document's size: about two segments for a small document, at most
a few batches of about 1 MiB (or two segments, whichever is larger) for a big one.

Speed: the plaintext's SHA-256 (about 1.4 GB/s) is slower than AES-256-GCM
(several GB/s), so past its first :data:`_PARALLEL_AFTER` bytes a document is
hashed on a second thread, batch by batch, while this one reads, encrypts or
decrypts and writes; both release the GIL. Once threaded, reads and writes go
in batches of several segments (:data:`_BATCH_BYTES`). The bytes written are
the same either way.
"""

from __future__ import annotations

import hashlib
import io
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
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

# A document's first _PARALLEL_AFTER bytes go one segment at a time and are
# hashed inline; the rest go in batches of about _BATCH_BYTES of plaintext
# (whole segments), hashed on a second thread. At most _POOL_BYTES of batches
# (but at least two) are in flight. Starting the thread (~0.2 ms) and its
# buffers (~0.4 ms a MiB when fresh) costs more than it saves below ~2 MiB.
_PARALLEL_AFTER = 1024 * 1024
_BATCH_BYTES = 1024 * 1024
_POOL_BYTES = 4 * _BATCH_BYTES


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
    _write_all(dst, memoryview(header))

    # Each read asks for one byte more than a whole number of segments, so a
    # full segment is known to be the last one exactly when nothing follows
    # it; that byte is carried to the front of the next buffer.
    batch = _batch_segments(segment_size)
    out_view = memoryview(bytearray(segment_size + _TAG_SIZE))
    carried: int | None = None
    counter = 0
    total = 0
    with _Hasher(segment_size + 1, batch * segment_size + 1) as hasher:
        while True:
            in_view = hasher.take()
            start = 0
            if carried is not None:
                in_view[0] = carried
                start = 1
            got = start + _read_full(readinto, in_view[start:])
            end = got < len(in_view)
            body = got if end else len(in_view) - 1
            hasher.hash(in_view[:body])  # on the other thread, while this one encrypts
            sizes = _split(body, segment_size)
            need = body + len(sizes) * _TAG_SIZE
            if len(out_view) < need:
                out_view = memoryview(bytearray(len(in_view) - 1 + batch * _TAG_SIZE))
            offset = 0
            for i, size in enumerate(sizes):
                if counter >= _MAX_SEGMENTS:
                    raise ValueError("document too large: more than 2**32 segments")
                last = end and i == len(sizes) - 1
                nonce = prefix + counter.to_bytes(4, "big") + (_LAST if last else _NOT_LAST)
                aead.encrypt_into(
                    nonce,
                    in_view[offset - i * _TAG_SIZE : offset - i * _TAG_SIZE + size],
                    header,
                    out_view[offset : offset + size + _TAG_SIZE],
                )
                offset += size + _TAG_SIZE
                counter += 1
            _write_all(dst, out_view[:need])
            total += body
            if on_progress is not None:
                for size in sizes:
                    on_progress(size)
            if end:
                return StreamResult(size=total, sha256=hasher.hexdigest())
            carried = in_view[body]


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

    # As in seal_stream: one byte more than a whole number of sealed segments
    # is read, and carried to the front of the buffer for the next read.
    chunk = segment_size + _TAG_SIZE
    batch = _batch_segments(segment_size)
    in_view = memoryview(bytearray(chunk + 1))
    carried: int | None = None
    counter = 0
    total = 0
    with _Hasher(segment_size, batch * segment_size) as hasher:
        while True:
            out_view = hasher.take()
            cap = len(out_view) // segment_size * chunk + 1
            if len(in_view) < cap:
                in_view = memoryview(bytearray(cap))
            start = 0
            if carried is not None:
                in_view[0] = carried
                start = 1
            got = start + _read_full(readinto, in_view[start:cap])
            end = got < cap
            body = got if end else cap - 1
            sizes = _split(body, chunk)
            offset = 0
            for i, size in enumerate(sizes):
                last = end and i == len(sizes) - 1
                # Only a lone segment may be empty; anything shorter than a tag is cut.
                if size < _TAG_SIZE or (last and size == _TAG_SIZE and counter > 0):
                    raise _sealerror_after(dst, out_view[: offset - i * _TAG_SIZE])
                if counter >= _MAX_SEGMENTS:
                    raise _sealerror_after(dst, out_view[: offset - i * _TAG_SIZE])
                nonce = prefix + counter.to_bytes(4, "big") + (_LAST if last else _NOT_LAST)
                plain_at = offset - i * _TAG_SIZE
                try:
                    aead.decrypt_into(
                        nonce,
                        in_view[offset : offset + size],
                        header,
                        out_view[plain_at : plain_at + size - _TAG_SIZE],
                    )
                except InvalidTag:
                    raise _sealerror_after(dst, out_view[:plain_at]) from None
                offset += size
                counter += 1
            plain = out_view[: body - len(sizes) * _TAG_SIZE]
            hasher.hash(plain)  # on the other thread, while this one writes
            _write_all(dst, plain)
            total += len(plain)
            if on_progress is not None:
                for size in sizes:
                    on_progress(size - _TAG_SIZE)
            if end:
                return StreamResult(size=total, sha256=hasher.hexdigest())
            carried = in_view[body]


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


def _batch_segments(segment_size: int) -> int:
    """Segments per batch once the hash runs on its own thread."""
    return max(1, _BATCH_BYTES // segment_size)


def _split(size: int, piece: int) -> list[int]:
    """The sizes of ``size`` bytes cut into ``piece``-sized pieces: all full
    but the last, which holds 1 to ``piece`` bytes (0 only if ``size`` is 0)."""
    if size <= piece:
        return [size]
    count = -(-size // piece)
    return [piece] * (count - 1) + [size - (count - 1) * piece]


def _sealerror_after(dst: BinaryIO, authenticated: memoryview) -> SealError:
    """Write the segments of the batch that did authenticate, as a stream of
    one segment per write would have, and return the error to raise."""
    _write_all(dst, authenticated)
    return SealError()


class _Hasher:
    """The SHA-256 of a document's plaintext, and the buffers it is read
    through, for one call of :func:`seal_stream` or :func:`open_stream`.

    :meth:`take` returns the buffer to fill next; :meth:`hash` hands (a start
    of) it over, in order. Until :data:`_PARALLEL_AFTER` bytes have been
    handed over, that is one small buffer hashed at once; after, it is one of
    at most ``max(2, _POOL_BYTES // big)`` big buffers, hashed by a second
    thread, and :meth:`take` waits for one that thread is done with (so memory
    stays flat). A buffer handed over must not be written until :meth:`take`
    returns it again; it may be read.

    Use it in a ``with`` block: leaving the block, normally or not (an error,
    KeyboardInterrupt), stops and joins the thread. An exception in the thread
    is raised by the next :meth:`take` or by :meth:`hexdigest`.
    """

    def __init__(self, small: int, big: int) -> None:
        self._sha = hashlib.sha256()
        self._small: memoryview | None = memoryview(bytearray(small))
        self._big = big
        self._pool = max(2, _POOL_BYTES // big)
        self._made = 0
        self._handed = 0
        self._free: queue.SimpleQueue[bytearray | None] = queue.SimpleQueue()
        self._todo: queue.SimpleQueue[tuple[memoryview, bytearray] | None] = (
            queue.SimpleQueue())
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stop = False

    def __enter__(self) -> _Hasher:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._join(stop=True)

    def take(self) -> memoryview:
        if self._thread is None:
            if self._handed < _PARALLEL_AFTER and self._small is not None:
                return self._small
            self._start()
        self._raise()
        try:
            buf = self._free.get_nowait()
        except queue.Empty:
            if self._made < self._pool:
                self._made += 1
                return memoryview(bytearray(self._big))
            buf = self._free.get()
        if buf is None:  # the thread failed
            self._raise()
            raise RuntimeError("the SHA-256 thread stopped")  # pragma: no cover
        return memoryview(buf)

    def hash(self, view: memoryview) -> None:
        self._handed += len(view)
        if self._thread is None:
            self._sha.update(view)
        else:
            self._todo.put((view, cast(bytearray, view.obj)))

    def hexdigest(self) -> str:
        self._join(stop=False)
        self._raise()
        return self._sha.hexdigest()

    def _start(self) -> None:
        small, self._small = self._small, None
        if small is not None and len(small) >= self._big:  # one segment a batch
            self._made = 1
            self._free.put(cast(bytearray, small.obj))
        self._thread = threading.Thread(target=self._run, name="embargo-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while (item := self._todo.get()) is not None:
                view, buf = item
                if not self._stop:
                    self._sha.update(view)
                self._free.put(buf)
        except BaseException as exc:  # raised on the caller's thread
            self._error = exc
            self._free.put(None)

    def _join(self, *, stop: bool) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop = stop
            self._todo.put(None)
            thread.join()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error


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
