"""Streaming multipart uploads: the file part goes straight into the blob store.

The body is parsed from ``request.stream()`` with python-multipart's push parser: the
file part is hashed and written to a temp file in the store's folder as it arrives
(one disk write, no spooling by Starlette), the size cap is checked on bytes received
(with or without Content-Length), and memory stays flat whatever the file size.
Nothing is visible in the store until the caller commits the blob.

Limits besides the size: the number of parts, the size of each form field, and the size of
each part's headers (python-multipart hands headers over as they arrive, unbounded).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
from python_multipart.multipart import (
    MultipartParseError,
    MultipartParser,
    parse_options_header,
)
from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive

from ..core.store import BlobStore, BlobWriter
from .limits import drain_body
from .problems import FieldError, ProblemError, unprocessable

BATCH = 1 << 20
"""Bytes gathered before one parser/disk step in the worker thread."""
QUEUE_DEPTH = 8
_UNSAFE_NAME = re.compile(r"[^\w.\- ]+")


class _FormError(Exception):
    def __init__(self, problem: ProblemError) -> None:
        self.problem = problem


@dataclass
class ReceivedUpload:
    """A parsed upload whose blob is written but not yet committed."""

    blob: BlobWriter
    filename: str | None
    fields: dict[str, str] = field(default_factory=dict)


def clean_filename(raw: str) -> str | None:
    name = raw.replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE_NAME.sub("_", name).strip(" .")[:200]
    return name or None


class _Receiver:
    """python-multipart callbacks that route the ``file`` part to the store and keep small fields."""

    def __init__(
        self, store: BlobStore, max_field_bytes: int, max_parts: int, max_header_bytes: int
    ) -> None:
        self.store = store
        self.max_field_bytes = max_field_bytes
        self.max_parts = max_parts
        self.max_header_bytes = max_header_bytes
        self.parts = 0
        self._header_bytes = 0
        self.blob: BlobWriter | None = None
        self.filename: str | None = None
        self.fields: dict[str, str] = {}
        self.complete = False
        self._headers: list[tuple[bytes, bytes]] = []
        self._hname = bytearray()
        self._hvalue = bytearray()
        self._field: str | None = None
        self._value = bytearray()
        self._is_file = False

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > self.max_parts:
            raise _FormError(
                ProblemError(
                    413, f"the form has more than {self.max_parts} parts (limit)", code="too_many_parts"
                )
            )
        self._header_bytes = 0
        self._headers.clear()
        self._field, self._is_file = None, False
        self._value.clear()

    def _count_header(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self.max_header_bytes:
            raise _FormError(
                ProblemError(
                    413,
                    f"a multipart part has more than {self.max_header_bytes} bytes of headers (limit)",
                    code="part_headers_too_large",
                )
            )

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._hname += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._hvalue += data[start:end]

    def _header_end(self) -> None:
        self._headers.append((bytes(self._hname).lower(), bytes(self._hvalue)))
        self._hname.clear()
        self._hvalue.clear()

    def _headers_finished(self) -> None:
        disposition = dict(self._headers).get(b"content-disposition")
        _, params = parse_options_header(disposition)
        name = params.get(b"name", b"").decode("utf-8", "replace")
        if not name:
            raise _FormError(
                ProblemError(400, "a multipart part has no Content-Disposition name", code="malformed_body")
            )
        if b"filename" in params or name == "file":
            if name != "file":
                raise _FormError(
                    unprocessable(
                        [
                            FieldError(
                                pointer=f"#/{name}", detail="only the part named 'file' may carry a file"
                            )
                        ]
                    )
                )
            if self.blob is not None:
                raise _FormError(
                    unprocessable([FieldError(pointer="#/file", detail="send exactly one file")])
                )
            self.filename = clean_filename(params.get(b"filename", b"").decode("utf-8", "replace"))
            self.blob = self.store.writer()
            self._is_file = True
            return
        if name in self.fields:
            raise _FormError(
                unprocessable([FieldError(pointer=f"#/{name}", detail="repeated field")])
            )
        self._field = name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            assert self.blob is not None
            self.blob.write(memoryview(data)[start:end])  # no copy: each batch is never changed
            return
        self._value += data[start:end]
        if len(self._value) > self.max_field_bytes:
            raise _FormError(
                ProblemError(
                    413,
                    f"form field {self._field!r} is larger than {self.max_field_bytes} bytes",
                    code="field_too_large",
                )
            )

    def _part_end(self) -> None:
        if self._field is None:
            return
        try:
            self.fields[self._field] = self._value.decode("utf-8")
        except UnicodeDecodeError:
            raise _FormError(
                unprocessable([FieldError(pointer=f"#/{self._field}", detail="not valid UTF-8")])
            ) from None

    def _end(self) -> None:
        self.complete = True

    def abort(self) -> None:
        if self.blob is not None:
            self.blob.abort()


def _boundary(request: Request) -> bytes:
    ctype, params = parse_options_header(request.headers.get("content-type"))
    if ctype != b"multipart/form-data":
        raise ProblemError(415, "send the upload as multipart/form-data", code="unsupported_media_type")
    boundary = params.get(b"boundary")
    if not boundary:
        raise ProblemError(400, "the multipart/form-data Content-Type has no boundary", code="malformed_body")
    return boundary


def too_large(max_bytes: int) -> ProblemError:
    return ProblemError(413, f"the upload is larger than the limit of {max_bytes} bytes", code="too_large")


class _Body:
    """The request body as it arrives, remembering whether it has ended (Starlette's
    ``request.stream()`` without the bookkeeping that forbids draining it later)."""

    def __init__(self, receive: Receive) -> None:
        self.receive = receive
        self.ended = False

    async def chunks(self) -> AsyncIterator[bytes]:
        while not self.ended:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            self.ended = not message.get("more_body", False)
            if body := message.get("body"):
                yield body

    async def drain(self, limit: int) -> None:
        """Read and drop up to ``limit`` more bytes, so a client still sending sees the answer."""
        if not self.ended:
            await drain_body(self.receive, limit)


async def _pump(chunks: AsyncIterator[bytes], parser: MultipartParser, max_bytes: int) -> None:
    """Receive on the event loop while one worker thread parses, hashes and writes, so the
    network and the disk overlap; at most ``QUEUE_DEPTH`` batches wait in memory."""
    send, receive = anyio.create_memory_object_stream[list[bytes]](QUEUE_DEPTH)

    def consume() -> None:
        while True:
            try:
                chunks = anyio.from_thread.run(receive.receive)
            except anyio.EndOfStream:
                return
            parser.write(b"".join(chunks))  # the copy happens here, off the event loop

    async def produce() -> None:
        async with send:
            received, pending, size = 0, [], 0
            async for chunk in chunks:
                received += len(chunk)
                if received > max_bytes:
                    raise _FormError(too_large(max_bytes))
                pending.append(chunk)
                size += len(chunk)
                if size >= BATCH:
                    await send.send(pending)
                    pending, size = [], 0
            if pending:
                await send.send(pending)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, consume)
            await produce()
    except BaseExceptionGroup as group:  # one side failed; the other was stopped because of it
        first: BaseException = group
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None


async def receive_upload(
    request: Request,
    store: BlobStore,
    *,
    max_bytes: int,
    max_field_bytes: int,
    drain_bytes: int,
    max_parts: int = 64,
    max_part_header_bytes: int = 16 * 1024,
) -> ReceivedUpload:
    """Parse a multipart upload from the request stream; the caller commits or aborts the blob."""
    boundary = _boundary(request)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        if int(declared) <= drain_bytes:  # small enough to swallow, so the client reads the answer
            await drain_body(request.receive, drain_bytes)
        raise too_large(max_bytes)

    receiver = _Receiver(store, max_field_bytes, max_parts, max_part_header_bytes)
    parser = MultipartParser(boundary, receiver.callbacks())
    body = _Body(request.receive)
    try:
        await _pump(body.chunks(), parser, max_bytes)
        parser.finalize()
    except (_FormError, MultipartParseError) as exc:
        receiver.abort()
        await body.drain(drain_bytes)
        if isinstance(exc, _FormError):
            raise exc.problem from None
        if str(exc).startswith("Maximum header"):  # python-multipart's own caps on one part's headers
            raise ProblemError(
                413, f"a multipart part's headers are too large: {exc}", code="part_headers_too_large"
            ) from None
        raise ProblemError(400, f"malformed multipart body: {exc}", code="malformed_body") from None
    except ClientDisconnect:
        receiver.abort()
        raise ProblemError(
            400, "the client disconnected before the body was complete", code="incomplete_body"
        ) from None
    except BaseException:
        receiver.abort()
        raise

    if not receiver.complete:
        receiver.abort()
        raise ProblemError(
            400,
            "the multipart body ends before its closing boundary (truncated upload)",
            code="incomplete_body",
        )
    if receiver.blob is None:
        raise unprocessable([FieldError(pointer="#/file", detail="a file part named 'file' is required")])
    if receiver.blob.size == 0:
        receiver.abort()
        raise unprocessable([FieldError(pointer="#/file", detail="the file is empty")])
    return ReceivedUpload(receiver.blob, receiver.filename, receiver.fields)
