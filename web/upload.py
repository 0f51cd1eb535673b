"""Uploads sealed as they stream in.

The multipart body is parsed by python-multipart's callback parser, chunk by
chunk as it arrives; each file's bytes go through a small bounded pipe
straight into the sealing of :class:`release.drafts.DocumentSet`, running on
its own thread. No byte of a document is written anywhere but, sealed, to the
vault: no temporary file (Starlette's ``request.form()`` would spool files
over 1 MB to disk), nothing in the database. Memory stays flat: at most
:data:`PIPE_CHUNKS` chunks wait in the pipe. An upload that fails or is
interrupted deletes whatever it had sealed."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from python_multipart.multipart import MultipartParser, parse_options_header

from config.errors import InputError
from release.drafts import DocumentSet

PIPE_CHUNKS = 16
MAX_FIELD = 4096
_END = b""


class UploadRefused(Exception):
    """The form did not prove itself (CSRF) before its first file."""


class _Pipe:
    """A bounded, blocking byte pipe from the parser to the sealer."""

    def __init__(self) -> None:
        self.q: queue.Queue[bytes | BaseException] = queue.Queue(PIPE_CHUNKS)
        self.buffer = memoryview(b"")
        self.done = False

    def put(self, data: bytes) -> None:
        self.q.put(data)

    def close(self) -> None:
        self.q.put(_END)

    def fail(self) -> None:
        try:
            self.q.put_nowait(InputError("the upload was interrupted"))
        except queue.Full:  # the sealer is blocked on us: drain one slot, then say so
            try:
                self.q.get_nowait()
            except queue.Empty:
                pass
            self.q.put_nowait(InputError("the upload was interrupted"))

    def read(self, n: int = -1) -> bytes:
        if not self.buffer and not self.done:
            item = self.q.get()
            if isinstance(item, BaseException):
                raise item
            if item == _END:
                self.done = True
            self.buffer = memoryview(item)
        if n < 0 or n >= len(self.buffer):
            out, self.buffer = bytes(self.buffer), memoryview(b"")
        else:
            out, self.buffer = bytes(self.buffer[:n]), self.buffer[n:]
        return out

    def readinto(self, view: memoryview) -> int:
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)


class DocumentUpload:
    """Feed it the request body chunk by chunk (``write``), then ``finish``.

    Files: ``report`` (the national report), ``letter_N`` (a letter) whose
    organisation is the field ``letter_org_N`` sent before it. The field
    ``csrf`` must come before the first file and satisfy ``csrf_ok``."""

    def __init__(self, content_type: str, documents: DocumentSet,
                 csrf_ok: Callable[[str], bool]) -> None:
        kind, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise InputError("the documents must be sent as multipart/form-data")
        self.documents = documents
        self.csrf_ok = csrf_ok
        self.fields: dict[str, str] = {}
        self.proven = False
        self._headers: dict[bytes, bytes] = {}
        self._field = bytearray()
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._name = ""
        self._filename: str | None = None
        self._pipe: _Pipe | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._header_name.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        })

    # -- parser callbacks ---------------------------------------------------------
    def _part_begin(self) -> None:
        self._headers, self._field, self._filename = {}, bytearray(), None

    def _header_end(self) -> None:
        self._headers[bytes(self._header_name).lower()] = bytes(self._header_value)
        self._header_name, self._header_value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        self._filename = filename.decode("utf-8", "replace") if filename is not None else None
        if self._filename:  # an empty file input sends filename="": nothing to seal
            if not self.proven:
                raise UploadRefused()
            self._start_file()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._pipe is not None:
            self._pipe.put(bytes(data[start:end]))
        elif self._filename is None:
            self._field.extend(data[start:end])
            if len(self._field) > MAX_FIELD:
                raise InputError(f"form field {self._name!r} is too long")

    def _part_end(self) -> None:
        if self._pipe is not None:
            self._pipe.close()
            self._join()
            return
        if self._filename is None:
            value = self._field.decode("utf-8", "replace")
            self.fields[self._name] = value
            if self._name == "csrf":
                self.proven = self.csrf_ok(value)
                if not self.proven:
                    raise UploadRefused()

    # -- sealing thread -------------------------------------------------------------
    def _start_file(self) -> None:
        assert self._filename is not None
        if self._name == "report":
            kind, organisation = "report", None
        elif self._name.startswith("letter_"):
            kind = "letter"
            organisation = self.fields.get(f"letter_org_{self._name.removeprefix('letter_')}")
            if not (organisation or "").strip():
                raise InputError(f"letter {self._filename}: give its organisation")
        else:
            raise InputError(f"unexpected file field {self._name!r}")
        pipe = self._pipe = _Pipe()
        filename = self._filename

        def seal() -> None:
            try:
                self.documents.add(filename=filename, kind=kind, organisation=organisation,
                                   src=pipe)  # type: ignore[arg-type]
            except BaseException as exc:
                self._error = exc
                while not pipe.done:  # let the parser's puts through until it stops
                    item = pipe.q.get()
                    if isinstance(item, BaseException) or item == _END:
                        pipe.done = True

        self._thread = threading.Thread(target=seal, name="embargo-upload-seal", daemon=True)
        self._thread.start()

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
        self._thread, self._pipe = None, None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    # -- the caller's side ------------------------------------------------------------
    def write(self, chunk: bytes) -> None:
        if self._error is not None:
            self._join()
        self._parser.write(chunk)

    def finish(self) -> None:
        self._parser.finalize()
        if self._pipe is not None:
            raise InputError("the upload ended in the middle of a file")
        if not self.proven:
            raise UploadRefused()

    def abort(self) -> None:
        """Stop a sealing in progress, and delete everything sealed so far."""
        pipe, thread = self._pipe, self._thread
        if pipe is not None:
            pipe.fail()
        while thread is not None and thread.is_alive():
            if pipe is not None:  # unblock a sealer left draining the pipe
                try:
                    pipe.q.put_nowait(_END)
                except queue.Full:
                    pass
            thread.join(0.05)
        self._thread, self._pipe, self._error = None, None, None
        self.documents.abort()


__all__ = ["DocumentUpload", "UploadRefused"]
