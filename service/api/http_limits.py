"""A cap on the request line and headers, before they are parsed: uvicorn's httptools protocol
buffers a header of any size (one 50 MB header was answered 200; ten of 100 MB took the API from
115 to 438 MB). `LimitedHttpTools` counts the bytes of each request's head as they arrive and
answers ``431 Request Header Fields Too Large`` (and closes) once they pass the cap."""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

DEFAULT_MAX_HEAD_BYTES = 64 * 1024
BODY = b"request line and headers too large"


class LimitedHttpTools(HttpToolsProtocol):
    max_head_bytes = DEFAULT_MAX_HEAD_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head, self._head_bytes, self._tail = True, 0, b""

    def data_received(self, data: bytes) -> None:
        if self._in_head:  # count the head only: a chunk may carry the body's first bytes too
            end = (self._tail + data).find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else max(0, end + 4 - len(self._tail))
            self._tail = data[-3:]
            if self._head_bytes > self.max_head_bytes:
                self._refuse()
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        self._in_head, self._head_bytes, self._tail = True, 0, b""
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def _refuse(self) -> None:
        if self.transport.is_closing():
            return
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(BODY), BODY))  # fmt: skip
        self.transport.close()


def protocol_with(max_head_bytes: int) -> type[LimitedHttpTools]:
    return type("LimitedHttpTools", (LimitedHttpTools,), {"max_head_bytes": max_head_bytes})
