"""Downloads of blobs kept in a remote store (S3): the answers FileResponse gives for local files.

A single byte range is a ranged GET passed through (206, ``Content-Range``); several ranges, or an
``If-Range`` that no longer matches, get the whole file (RFC 9110 lets a server ignore Range).
Artifacts at least ``s3_presign_min_bytes`` large are a 307 to a presigned URL instead (the
client's Range goes to S3 with it), so large files never pass through the API. The caller has
answered ``If-None-Match`` already, and checked the Range header.
"""

from __future__ import annotations

from typing import Any, Protocol
from urllib.parse import quote

from fastapi import Response
from fastapi.responses import RedirectResponse, StreamingResponse
from starlette.responses import FileResponse

from .problems import ProblemError


class RemoteBlobs(Protocol):
    def stream(self, sha256: str, start: int, end: int) -> Any: ...

    def presign(self, sha256: str, *, filename: str, media_type: str, disposition: str) -> str: ...

    def presigns(self, size: int) -> bool: ...


def content_disposition(disposition: str, filename: str) -> str:
    quoted = quote(filename)
    if quoted == filename:
        return f'{disposition}; filename="{filename}"'
    return f"{disposition}; filename*=utf-8''{quoted}"


def remote_response(store: RemoteBlobs, *, sha256: str, size: int, filename: str, media_type: str,
                    disposition: str, headers: dict[str, str], range_: str | None,
                    if_range: str | None) -> Response:  # fmt: skip
    if store.presigns(size):
        url = store.presign(sha256, filename=filename, media_type=media_type, disposition=disposition)
        return RedirectResponse(url, status_code=307, headers=headers)
    headers = {**headers, "Accept-Ranges": "bytes",
               "Content-Disposition": content_disposition(disposition, filename)}  # fmt: skip
    ranges: list[tuple[int, int]] = []
    if range_ is not None and range_.strip().lower().startswith("bytes="):
        if if_range is None or if_range.strip() == headers.get("ETag"):
            ranges = FileResponse._parse_range_header(range_, size)
    try:
        if len(ranges) == 1:
            start, end = ranges[0]
            body = store.stream(sha256, start, end)
        else:
            body = store.stream(sha256, 0, size) if size else iter([b""])
    except FileNotFoundError:
        raise ProblemError(410, f"the file of artifact {filename!r} is no longer stored", code="gone") from None
    if len(ranges) == 1:
        start, end = ranges[0]
        headers.update({"Content-Range": f"bytes {start}-{end - 1}/{size}", "Content-Length": str(end - start)})
        return StreamingResponse(body, status_code=206, media_type=media_type,
                                 headers=headers)  # fmt: skip
    headers["Content-Length"] = str(size)
    return StreamingResponse(body, media_type=media_type,
                             headers=headers)  # fmt: skip
