"""The vault format: round trips, the format itself, and every way to break it."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import types
from collections.abc import Callable
from typing import BinaryIO, cast

import pytest
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from config.errors import SealError
from release import sealing
from release.sealing import (
    DEFAULT_SEGMENT_SIZE,
    DEK_SIZE,
    HEADER_SIZE,
    MAGIC,
    MAX_SEGMENT_SIZE,
    MIN_SEGMENT_SIZE,
    StreamResult,
    new_dek,
    open_bytes,
    open_dek,
    open_stream,
    seal_bytes,
    seal_dek,
    seal_stream,
)

OPAQUE = str(SealError())
TAG = 16
SEG = 1024  # small segments keep the tampering objects small
MiB = 1024 * 1024


def pattern(size: int) -> bytes:
    """Deterministic, non-repeating-per-segment bytes."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


def sealed_length(size: int, segment_size: int) -> int:
    segments = max(1, -(-size // segment_size))
    return HEADER_SIZE + segments * TAG + size


def assert_opaque(excinfo: pytest.ExceptionInfo[SealError]) -> None:
    assert type(excinfo.value) is SealError
    assert str(excinfo.value) == OPAQUE
    assert excinfo.value.__cause__ is None


def reference_key(dek: bytes, salt: bytes, document_id: str) -> AESGCM:
    key = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=salt,
        info=b"embargo/v1/doc/" + document_id.encode("utf-8"),
    ).derive(dek)
    return AESGCM(key)


def reference_seal(
    dek: bytes, document_id: str, segments: list[bytes], flags: list[int], segment_size: int = SEG
) -> bytes:
    """Build an object by hand, straight from DESIGN.md, with any flags."""
    salt, prefix = os.urandom(16), os.urandom(7)
    header = b"EMB1" + segment_size.to_bytes(4, "big") + salt + prefix
    aead = reference_key(dek, salt, document_id)
    body = b"".join(
        aead.encrypt(prefix + i.to_bytes(4, "big") + bytes([flag]), seg, header)
        for i, (seg, flag) in enumerate(zip(segments, flags, strict=True))
    )
    return header + body


@pytest.fixture(scope="module")
def dek() -> bytes:
    return new_dek()


# --- round trips -------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 65537, 10 * MiB], ids=lambda s: f"{s}B")
def test_stream_round_trip(dek: bytes, size: int) -> None:
    data = os.urandom(size)
    expected = StreamResult(size=size, sha256=hashlib.sha256(data).hexdigest())

    sealed = io.BytesIO()
    assert seal_stream(dek, "letter-01", io.BytesIO(data), sealed) == expected
    blob = sealed.getvalue()
    assert len(blob) == sealed_length(size, DEFAULT_SEGMENT_SIZE)

    opened = io.BytesIO()
    assert open_stream(dek, "letter-01", io.BytesIO(blob), opened) == expected
    assert opened.getvalue() == data


@pytest.mark.parametrize("size", [0, 1, 1023, 1024, 1025, 2048, 5000])
def test_small_segment_round_trip(dek: bytes, size: int) -> None:
    data = pattern(size)
    blob = seal_bytes(dek, "report", data, segment_size=SEG)
    assert len(blob) == sealed_length(size, SEG)
    assert open_bytes(dek, "report", blob) == data


@pytest.mark.parametrize("segment_size", [MIN_SEGMENT_SIZE, 4096, MAX_SEGMENT_SIZE])
def test_segment_size_bounds_accepted(dek: bytes, segment_size: int) -> None:
    data = pattern(3 * MIN_SEGMENT_SIZE + 7)
    blob = seal_bytes(dek, "report", data, segment_size=segment_size)
    assert blob[4:8] == segment_size.to_bytes(4, "big")
    assert open_bytes(dek, "report", blob) == data


@pytest.mark.parametrize("segment_size", [0, MIN_SEGMENT_SIZE - 1, MAX_SEGMENT_SIZE + 1])
def test_segment_size_out_of_bounds_refused(dek: bytes, segment_size: int) -> None:
    with pytest.raises(ValueError, match="segment size"):
        seal_bytes(dek, "report", b"x", segment_size=segment_size)


@pytest.mark.parametrize("bad_dek", [b"", bytes(DEK_SIZE - 1), bytes(DEK_SIZE + 1)])
def test_dek_of_wrong_size_refused(dek: bytes, bad_dek: bytes) -> None:
    blob = seal_bytes(dek, "report", b"x")
    with pytest.raises(ValueError, match="data key"):
        seal_bytes(bad_dek, "report", b"x")
    with pytest.raises(ValueError, match="data key"):
        open_bytes(bad_dek, "report", blob)
    with pytest.raises(ValueError, match="data key"):
        seal_dek(bad_dek, X25519PrivateKey.generate().public_key(), "r1")


def test_progress_reports_each_segment(dek: bytes) -> None:
    data = pattern(2 * SEG + 100)
    sealed_steps: list[int] = []
    dst = io.BytesIO()
    seal_stream(dek, "d", io.BytesIO(data), dst, segment_size=SEG, on_progress=sealed_steps.append)
    opened_steps: list[int] = []
    open_stream(dek, "d", io.BytesIO(dst.getvalue()), io.BytesIO(), on_progress=opened_steps.append)
    assert sealed_steps == opened_steps == [SEG, SEG, 100]


class Trickle(io.RawIOBase):
    """A raw stream that reads and writes at most a few bytes per call."""

    def __init__(self, data: bytes = b"", step: int = 7) -> None:
        self._src = io.BytesIO(data)
        self.written = bytearray()
        self._step = step

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        chunk = self._src.read(min(len(buf), self._step))
        buf[: len(chunk)] = chunk
        return len(chunk)

    def write(self, buf: memoryview) -> int:  # type: ignore[override]
        chunk = bytes(buf[: self._step])
        self.written += chunk
        return len(chunk)


class ReadOnly:
    """A file-like with only ``read`` (like some HTTP response bodies)."""

    def __init__(self, data: bytes) -> None:
        self._src = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self._src.read(min(size, 100))


def test_short_reads_and_writes(dek: bytes) -> None:
    data = pattern(3 * SEG + 5)
    dst = Trickle()
    seal_stream(dek, "d", cast(BinaryIO, Trickle(data)), cast(BinaryIO, dst), segment_size=SEG)
    blob = bytes(dst.written)
    assert open_bytes(dek, "d", blob) == data

    out = Trickle()
    result = open_stream(dek, "d", cast(BinaryIO, Trickle(blob)), cast(BinaryIO, out))
    assert bytes(out.written) == data
    assert result.size == len(data)


def test_source_without_readinto(dek: bytes) -> None:
    data = pattern(2 * SEG + 1)
    dst = io.BytesIO()
    seal_stream(dek, "d", cast(BinaryIO, ReadOnly(data)), dst, segment_size=SEG)
    out = io.BytesIO()
    open_stream(dek, "d", cast(BinaryIO, ReadOnly(dst.getvalue())), out)
    assert out.getvalue() == data


# --- the format itself -------------------------------------------------------


def test_header_layout_and_fresh_randomness(dek: bytes) -> None:
    first = seal_bytes(dek, "report", b"same text")
    second = seal_bytes(dek, "report", b"same text")
    assert HEADER_SIZE == 31
    assert first[:4] == MAGIC == b"EMB1"
    assert first[4:8] == (65536).to_bytes(4, "big")
    assert first[8:24] != second[8:24]  # salt
    assert first[24:31] != second[24:31]  # nonce prefix
    assert first[HEADER_SIZE:] != second[HEADER_SIZE:]


@pytest.mark.parametrize("size", [0, 1, SEG, SEG + 1, 3 * SEG])
def test_sealed_object_matches_design(dek: bytes, size: int) -> None:
    """Decrypt what seal_bytes wrote with an implementation of DESIGN.md."""
    data = pattern(size)
    blob = seal_bytes(dek, "letter-07", data, segment_size=SEG)
    header = blob[:HEADER_SIZE]
    assert int.from_bytes(header[4:8], "big") == SEG
    aead = reference_key(dek, header[8:24], "letter-07")
    prefix = header[24:31]
    chunks = [blob[i : i + SEG + TAG] for i in range(HEADER_SIZE, len(blob), SEG + TAG)]
    plain = b""
    for counter, chunk in enumerate(chunks):
        flag = b"\x01" if counter == len(chunks) - 1 else b"\x00"
        plain += aead.decrypt(prefix + counter.to_bytes(4, "big") + flag, chunk, header)
    assert plain == data


def test_hand_built_object_opens(dek: bytes) -> None:
    segments = [pattern(SEG), pattern(SEG)[::-1], b"tail"]
    blob = reference_seal(dek, "letter-07", segments, [0, 0, 1])
    assert open_bytes(dek, "letter-07", blob) == b"".join(segments)


def test_lone_empty_segment_is_an_empty_document(dek: bytes) -> None:
    blob = reference_seal(dek, "d", [b""], [1])
    assert len(blob) == HEADER_SIZE + TAG
    assert open_bytes(dek, "d", blob) == b""


@pytest.mark.parametrize(
    ("segments", "flags"),
    [
        pytest.param([pattern(SEG), b""], [0, 1], id="empty-last-after-full"),
        pytest.param([pattern(SEG), b"a", b"b"], [0, 1, 1], id="two-last-flags"),
        pytest.param([pattern(SEG), b"a"], [0, 0], id="no-last-flag"),
        pytest.param([pattern(SEG), pattern(SEG)], [1, 1], id="last-flag-first"),
        pytest.param([b"short", b"tail"], [0, 1], id="short-middle-segment"),
    ],
)
def test_hand_built_malformed_object_fails(
    dek: bytes, segments: list[bytes], flags: list[int]
) -> None:
    blob = reference_seal(dek, "d", segments, flags)
    with pytest.raises(SealError) as excinfo:
        open_bytes(dek, "d", blob)
    assert_opaque(excinfo)


# --- the data key ------------------------------------------------------------


def test_dek_round_trip() -> None:
    private = X25519PrivateKey.generate()
    dek = new_dek()
    assert len(dek) == DEK_SIZE
    assert new_dek() != dek
    sealed = seal_dek(dek, private.public_key(), "release-2014-09-04")
    assert dek not in sealed
    assert seal_dek(dek, private.public_key(), "release-2014-09-04") != sealed
    assert open_dek(sealed, private, "release-2014-09-04") == dek


def _flip(blob: bytes, index: int) -> bytes:
    out = bytearray(blob)
    out[index] ^= 0x01
    return bytes(out)


@pytest.mark.parametrize(
    "case", ["wrong-key", "wrong-release", "flipped-first", "flipped-last", "cut", "empty"]
)
def test_dek_open_failures(case: str) -> None:
    private = X25519PrivateKey.generate()
    sealed = seal_dek(new_dek(), private.public_key(), "r1")
    key, release_id = private, "r1"
    if case == "wrong-key":
        key = X25519PrivateKey.generate()
    elif case == "wrong-release":
        release_id = "r2"
    elif case == "flipped-first":
        sealed = _flip(sealed, 0)
    elif case == "flipped-last":
        sealed = _flip(sealed, len(sealed) - 1)
    elif case == "cut":
        sealed = sealed[:-1]
    elif case == "empty":
        sealed = b""
    with pytest.raises(SealError) as excinfo:
        open_dek(sealed, key, release_id)
    assert_opaque(excinfo)


@pytest.mark.parametrize("length", [0, DEK_SIZE - 1, DEK_SIZE + 1])
def test_dek_of_wrong_length_inside_fails(length: int) -> None:
    private = X25519PrivateKey.generate()
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    sealed = suite.encrypt(bytes(length), private.public_key(), info=b"embargo/v1/dek/r1")
    with pytest.raises(SealError) as excinfo:
        open_dek(sealed, private, "r1")
    assert_opaque(excinfo)


# --- tampering with a sealed object ------------------------------------------

# Three segments of 1024: two full, one of 500 bytes.
DATA = pattern(2 * SEG + 500)
CHUNK = SEG + TAG
SEG_AT = [HEADER_SIZE, HEADER_SIZE + CHUNK, HEADER_SIZE + 2 * CHUNK]


def _swap(blob: bytes, a: int, b: int) -> bytes:
    parts = [blob[:HEADER_SIZE]] + [blob[i : i + CHUNK] for i in SEG_AT]
    parts[a + 1], parts[b + 1] = parts[b + 1], parts[a + 1]
    return b"".join(parts)


def _set_segment_size(blob: bytes, size: int) -> bytes:
    return blob[:4] + size.to_bytes(4, "big") + blob[8:]


Tamper = Callable[[bytes], bytes]

TAMPERS: dict[str, Tamper] = {
    "header-magic": lambda b: _flip(b, 0),
    "header-segment-size": lambda b: _flip(b, 7),
    "header-salt": lambda b: _flip(b, 8 + 5),
    "header-nonce-prefix": lambda b: _flip(b, HEADER_SIZE - 1),
    "first-segment": lambda b: _flip(b, SEG_AT[0] + 3),
    "middle-segment": lambda b: _flip(b, SEG_AT[1] + SEG // 2),
    "middle-segment-tag": lambda b: _flip(b, SEG_AT[2] - 1),
    "last-segment": lambda b: _flip(b, SEG_AT[2]),
    "last-segment-tag": lambda b: _flip(b, len(b) - 1),
    "last-segment-cut": lambda b: b[:-3],
    "last-segment-cut-to-tag": lambda b: b[: SEG_AT[2] + TAG],
    "last-segment-dropped": lambda b: b[: SEG_AT[2]],
    "two-segments-dropped": lambda b: b[: SEG_AT[1]],
    "header-only": lambda b: b[:HEADER_SIZE],
    "shorter-than-header": lambda b: b[: HEADER_SIZE - 1],
    "few-bytes": lambda b: b[:4],
    "empty": lambda b: b"",
    "first-two-swapped": lambda b: _swap(b, 0, 1),
    "middle-and-last-swapped": lambda b: _swap(b, 1, 2),
    "extra-segment-appended": lambda b: b + b[SEG_AT[1] : SEG_AT[2]],
    "last-segment-appended-again": lambda b: b + b[SEG_AT[2] :],
    "segment-repeated": lambda b: b[: SEG_AT[2]] + b[SEG_AT[1] :],
    "byte-appended": lambda b: b + b"\x00",
    "tag-appended": lambda b: b + bytes(TAG),
    "bad-magic": lambda b: b"EMB2" + b[4:],
    "lowercase-magic": lambda b: b"emb1" + b[4:],
    "segment-size-zero": lambda b: _set_segment_size(b, 0),
    "segment-size-absurd": lambda b: _set_segment_size(b, 2**32 - 1),
    "segment-size-too-small": lambda b: _set_segment_size(b, MIN_SEGMENT_SIZE - 1),
    "segment-size-doubled": lambda b: _set_segment_size(b, 2 * SEG),
}


@pytest.fixture(scope="module")
def blob(dek: bytes) -> bytes:
    sealed = seal_bytes(dek, "letter-01", DATA, segment_size=SEG)
    assert len(sealed) == SEG_AT[2] + 500 + TAG
    return sealed


@pytest.mark.parametrize("tamper", TAMPERS.values(), ids=TAMPERS.keys())
def test_tampered_object_fails(dek: bytes, blob: bytes, tamper: Tamper) -> None:
    damaged = tamper(blob)
    assert damaged != blob
    with pytest.raises(SealError) as excinfo:
        open_bytes(dek, "letter-01", damaged)
    assert_opaque(excinfo)


def test_every_flipped_byte_fails(dek: bytes) -> None:
    small = seal_bytes(dek, "d", pattern(SEG + 300), segment_size=SEG)
    for index in range(len(small)):
        for bit in (0x01, 0x80):
            damaged = bytearray(small)
            damaged[index] ^= bit
            with pytest.raises(SealError) as excinfo:
                open_bytes(dek, "d", bytes(damaged))
            assert str(excinfo.value) == OPAQUE, index


def test_every_truncation_fails(dek: bytes) -> None:
    small = seal_bytes(dek, "d", pattern(2 * SEG + 300), segment_size=SEG)
    for length in range(len(small)):
        with pytest.raises(SealError) as excinfo:
            open_bytes(dek, "d", small[:length])
        assert str(excinfo.value) == OPAQUE, length


def test_wrong_dek_fails(blob: bytes) -> None:
    with pytest.raises(SealError) as excinfo:
        open_bytes(new_dek(), "letter-01", blob)
    assert_opaque(excinfo)


def test_swapped_documents_fail(dek: bytes, blob: bytes) -> None:
    other = seal_bytes(dek, "letter-02", DATA, segment_size=SEG)
    assert open_bytes(dek, "letter-02", other) == DATA
    for document_id, sealed in [("letter-02", blob), ("letter-01", other)]:
        with pytest.raises(SealError) as excinfo:
            open_bytes(dek, document_id, sealed)
        assert_opaque(excinfo)


def test_segments_from_another_document_fail(dek: bytes, blob: bytes) -> None:
    """Same DEK, same id, same header spliced onto another object's body."""
    other = seal_bytes(dek, "letter-01", DATA, segment_size=SEG)
    spliced = blob[:HEADER_SIZE] + other[HEADER_SIZE:]
    with pytest.raises(SealError) as excinfo:
        open_bytes(dek, "letter-01", spliced)
    assert_opaque(excinfo)


@pytest.mark.parametrize(
    ("tamper", "written"),
    [
        pytest.param(lambda b: _flip(b, SEG_AT[0]), b"", id="first-segment"),
        pytest.param(lambda b: _flip(b, SEG_AT[1]), DATA[:SEG], id="middle-segment"),
        pytest.param(lambda b: b[: SEG_AT[2]], DATA[:SEG], id="last-segment-dropped"),
    ],
)
def test_only_authenticated_segments_are_written(
    dek: bytes, blob: bytes, tamper: Tamper, written: bytes
) -> None:
    dst = io.BytesIO()
    with pytest.raises(SealError):
        open_stream(dek, "letter-01", io.BytesIO(tamper(blob)), dst)
    assert dst.getvalue() == written


# --- the threaded hash and batched I/O ---------------------------------------
#
# Past its first sealing._PARALLEL_AFTER bytes a document goes in batches of
# several segments, hashed on a second thread. None of that may show: the same
# bytes out, the same digest, no thread left behind whatever fails.

HASH_THREAD = "embargo-sha256"


def reference_seal_stream(
    dek: bytes, document_id: str, data: bytes, segment_size: int, salt: bytes, prefix: bytes
) -> bytes:
    """The object the one-segment-at-a-time sealer wrote for ``data`` with this
    salt and nonce prefix (straight from DESIGN.md)."""
    header = b"EMB1" + segment_size.to_bytes(4, "big") + salt + prefix
    aead = reference_key(dek, salt, document_id)
    count = max(1, -(-len(data) // segment_size))
    body = b"".join(
        aead.encrypt(
            prefix + i.to_bytes(4, "big") + (b"\x01" if i == count - 1 else b"\x00"),
            data[i * segment_size : (i + 1) * segment_size],
            header,
        )
        for i in range(count)
    )
    return header + body


def hash_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == HASH_THREAD]


@pytest.mark.parametrize(
    ("size", "segment_size"),
    [
        pytest.param(5 * MiB + 123, DEFAULT_SEGMENT_SIZE, id="5MiB+123"),
        pytest.param(4 * MiB, DEFAULT_SEGMENT_SIZE, id="4MiB-batch-boundary"),
        pytest.param(4 * MiB + 1, DEFAULT_SEGMENT_SIZE, id="4MiB+1"),
        pytest.param(sealing._PARALLEL_AFTER, DEFAULT_SEGMENT_SIZE, id="at-the-switch"),
        pytest.param(sealing._PARALLEL_AFTER + 1, DEFAULT_SEGMENT_SIZE, id="past-the-switch"),
        pytest.param(3 * MiB + 7, SEG, id="1KiB-segments"),
        pytest.param(2 * MAX_SEGMENT_SIZE + 5, MAX_SEGMENT_SIZE, id="16MiB-segments"),
    ],
)
def test_output_identical_to_one_segment_at_a_time(
    dek: bytes, size: int, segment_size: int
) -> None:
    data = os.urandom(size)
    blob = seal_bytes(dek, "report", data, segment_size=segment_size)
    salt, prefix = blob[8:24], blob[24:HEADER_SIZE]
    assert blob == reference_seal_stream(dek, "report", data, segment_size, salt, prefix)


def test_recorded_sha256_is_hashlibs(dek: bytes) -> None:
    data = os.urandom(9 * MiB + 4321)  # several batches on the hash thread
    expected = hashlib.sha256(data).hexdigest()
    sealed = io.BytesIO()
    assert seal_stream(dek, "d", io.BytesIO(data), sealed).sha256 == expected
    opened = io.BytesIO()
    assert open_stream(dek, "d", io.BytesIO(sealed.getvalue()), opened).sha256 == expected
    assert opened.getvalue() == data


def test_large_document_is_hashed_on_a_thread(dek: bytes) -> None:
    """So that the tests of failures below do fail with the thread running."""
    seen: list[int] = []

    class Watching(io.BytesIO):
        def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
            seen.append(len(hash_threads()))
            return super().readinto(buf)

    seal_stream(dek, "d", cast(BinaryIO, Watching(os.urandom(3 * MiB))), io.BytesIO())
    assert seen[0] == 0 and max(seen) == 1  # a small start costs no thread
    assert hash_threads() == []


def test_progress_in_batches_reports_each_segment(dek: bytes) -> None:
    data = os.urandom(3 * MiB + 10)
    steps: list[int] = []
    sealed = io.BytesIO()
    seal_stream(dek, "d", io.BytesIO(data), sealed, on_progress=steps.append)
    assert steps == [DEFAULT_SEGMENT_SIZE] * 48 + [10]
    opened: list[int] = []
    open_stream(dek, "d", io.BytesIO(sealed.getvalue()), io.BytesIO(), on_progress=opened.append)
    assert opened == steps


@pytest.mark.parametrize("step", [7, 10007])
def test_short_reads_and_writes_in_batches(
    dek: bytes, monkeypatch: pytest.MonkeyPatch, step: int
) -> None:
    monkeypatch.setattr(sealing, "_PARALLEL_AFTER", 2 * DEFAULT_SEGMENT_SIZE)
    size = 600 * 1024 if step == 7 else 3 * MiB + 5
    data = os.urandom(size)
    dst = Trickle(step=step)
    seal_stream(dek, "d", cast(BinaryIO, Trickle(data, step)), cast(BinaryIO, dst))
    blob = bytes(dst.written)
    assert blob == reference_seal_stream(
        dek, "d", data, DEFAULT_SEGMENT_SIZE, blob[8:24], blob[24:HEADER_SIZE])
    out = Trickle(step=step)
    result = open_stream(dek, "d", cast(BinaryIO, Trickle(blob, step)), cast(BinaryIO, out))
    assert bytes(out.written) == data
    assert result.sha256 == hashlib.sha256(data).hexdigest()


class Failing(io.BytesIO):
    """Reads (or takes writes) normally until ``after`` bytes, then raises."""

    def __init__(self, data: bytes, after: int, error: BaseException) -> None:
        super().__init__(data)
        self.after = after
        self.error = error
        self.done = 0
        self.threads_at_failure = -1

    def _step(self, n: int) -> None:
        self.done += n
        if self.done > self.after:
            self.threads_at_failure = len(hash_threads())
            raise self.error

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        self._step(len(buf))
        return super().readinto(buf)

    def write(self, buf: memoryview) -> int:  # type: ignore[override]
        self._step(len(buf))
        return super().write(buf)


@pytest.mark.parametrize("error", [OSError("disk gone"), KeyboardInterrupt()],
                         ids=["OSError", "KeyboardInterrupt"])
def test_failing_reader_or_writer_leaves_no_thread(dek: bytes, error: BaseException) -> None:
    data = os.urandom(6 * MiB)
    blob = seal_bytes(dek, "d", data)
    before = threading.active_count()
    for run in ("seal-read", "seal-write", "open-read", "open-write"):
        source = blob if run.startswith("open") else data
        failing = Failing(source if run.endswith("read") else b"", 4 * MiB, error)
        src = failing if run.endswith("read") else io.BytesIO(source)
        dst = failing if run.endswith("write") else io.BytesIO()
        with pytest.raises(type(error)):
            if run.startswith("seal"):
                seal_stream(dek, "d", src, dst)
            else:
                open_stream(dek, "d", src, dst)
        assert failing.threads_at_failure == 1, run  # it failed mid-stream, threaded
        assert threading.active_count() <= before, run  # others' threads may end meanwhile
        assert hash_threads() == [], run


def test_tampering_mid_stream_leaves_no_thread(dek: bytes) -> None:
    data = os.urandom(5 * MiB)
    blob = bytearray(seal_bytes(dek, "d", data))
    blob[3 * MiB] ^= 1
    before = threading.active_count()
    dst = io.BytesIO()
    with pytest.raises(SealError) as excinfo:
        open_stream(dek, "d", io.BytesIO(bytes(blob)), dst)
    assert_opaque(excinfo)
    assert threading.active_count() <= before and hash_threads() == []
    # Every segment before the damaged one was written, none after.
    damaged = (3 * MiB - HEADER_SIZE) // (DEFAULT_SEGMENT_SIZE + TAG)
    assert dst.getvalue() == data[: damaged * DEFAULT_SEGMENT_SIZE]


class BrokenSha:
    """A SHA-256 whose ``update`` raises from its ``fail_at``-th call on."""

    def __init__(self, fail_at: int, calls: list[str]) -> None:
        self._real = hashlib.sha256()
        self._fail_at = fail_at
        self._calls = calls

    def update(self, data: memoryview) -> None:
        self._calls.append(threading.current_thread().name)
        if len(self._calls) >= self._fail_at:
            raise MemoryError("hash broke")
        self._real.update(data)

    def hexdigest(self) -> str:
        return self._real.hexdigest()


@pytest.mark.parametrize("batches", [2, 10], ids=["early", "late"])
def test_hash_thread_failure_propagates(
    dek: bytes, monkeypatch: pytest.MonkeyPatch, batches: int
) -> None:
    fail_at = sealing._PARALLEL_AFTER // DEFAULT_SEGMENT_SIZE + batches  # updates inline, then
    calls: list[str] = []
    fake = types.SimpleNamespace(sha256=lambda: BrokenSha(fail_at, calls))
    monkeypatch.setattr(sealing, "hashlib", fake)
    data = os.urandom(12 * MiB)
    before = threading.active_count()
    with pytest.raises(MemoryError, match="hash broke"):
        seal_stream(dek, "d", io.BytesIO(data), io.BytesIO())
    assert calls[-1] == HASH_THREAD  # it did fail on the thread
    assert threading.active_count() <= before and hash_threads() == []

    monkeypatch.setattr(sealing, "hashlib", hashlib)
    blob = seal_bytes(dek, "d", data)
    monkeypatch.setattr(sealing, "hashlib", fake)
    calls.clear()
    with pytest.raises(MemoryError, match="hash broke"):
        open_stream(dek, "d", io.BytesIO(blob), io.BytesIO())
    assert calls[-1] == HASH_THREAD
    assert threading.active_count() <= before and hash_threads() == []


@pytest.fixture
def batched(monkeypatch: pytest.MonkeyPatch) -> None:
    """Threaded from the first byte, in batches of two 1 KiB segments: the
    tampering tests again, with failures on every side of a batch."""
    monkeypatch.setattr(sealing, "_PARALLEL_AFTER", 0)
    monkeypatch.setattr(sealing, "_BATCH_BYTES", 2 * SEG)
    monkeypatch.setattr(sealing, "_POOL_BYTES", 4 * SEG)


@pytest.mark.usefixtures("batched")
@pytest.mark.parametrize("size", [0, 1, SEG, 2 * SEG, 2 * SEG + 1, 5 * SEG, 7 * SEG + 3])
def test_batched_round_trip(dek: bytes, size: int) -> None:
    data = pattern(size)
    blob = seal_bytes(dek, "d", data, segment_size=SEG)
    assert blob == reference_seal_stream(dek, "d", data, SEG, blob[8:24], blob[24:HEADER_SIZE])
    out = io.BytesIO()
    result = open_stream(dek, "d", io.BytesIO(blob), out)
    assert out.getvalue() == data
    assert result == StreamResult(size=size, sha256=hashlib.sha256(data).hexdigest())


@pytest.mark.usefixtures("batched")
@pytest.mark.parametrize("tamper", TAMPERS.values(), ids=TAMPERS.keys())
def test_batched_tampered_object_fails(dek: bytes, blob: bytes, tamper: Tamper) -> None:
    with pytest.raises(SealError) as excinfo:
        open_bytes(dek, "letter-01", tamper(blob))
    assert_opaque(excinfo)
    assert hash_threads() == []


@pytest.mark.usefixtures("batched")
def test_batched_every_truncation_and_segment_flip_fails(dek: bytes) -> None:
    data = pattern(5 * SEG + 300)
    small = seal_bytes(dek, "d", data, segment_size=SEG)
    for length in range(len(small)):
        with pytest.raises(SealError):
            open_bytes(dek, "d", small[:length])
    for segment in range(6):
        damaged = bytearray(small)
        damaged[HEADER_SIZE + segment * CHUNK + 5] ^= 1
        dst = io.BytesIO()
        with pytest.raises(SealError):
            open_stream(dek, "d", io.BytesIO(bytes(damaged)), dst)
        assert dst.getvalue() == data[: segment * SEG]  # what authenticated, in order
    assert hash_threads() == []


@pytest.mark.parametrize(("batches", "limit"), [(False, 2), (True, 3)],
                         ids=["one-segment-at-a-time", "batched"])
def test_counter_limit(dek: bytes, monkeypatch: pytest.MonkeyPatch,
                       request: pytest.FixtureRequest, batches: bool, limit: int) -> None:
    if batches:
        request.getfixturevalue("batched")
    monkeypatch.setattr(sealing, "_MAX_SEGMENTS", limit)
    exactly = pattern(limit * SEG)
    blob = seal_bytes(dek, "d", exactly, segment_size=SEG)
    assert open_bytes(dek, "d", blob) == exactly
    with pytest.raises(ValueError, match="2\\*\\*32"):
        seal_bytes(dek, "d", exactly + b"!", segment_size=SEG)
    monkeypatch.setattr(sealing, "_MAX_SEGMENTS", limit + 1)
    longer = seal_bytes(dek, "d", exactly + b"!", segment_size=SEG)
    monkeypatch.setattr(sealing, "_MAX_SEGMENTS", limit)
    with pytest.raises(SealError) as excinfo:
        open_bytes(dek, "d", longer)
    if not batches:
        assert_opaque(excinfo)
    assert hash_threads() == []
