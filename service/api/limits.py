"""A cap on small request bodies (the JSON ones), answered as a 413 problem.

Uploads stream through `service.api.multipart` with their own, much larger cap; every other
body is read here first (at most ``max_bytes``, so memory stays bounded) and replayed to
the app. An oversize body is drained a little so the client can read the answer.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .problems import Problem, problem_response

DRAIN_BYTES = 16 << 20


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, streamed_paths: frozenset[str]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.streamed_paths = streamed_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS")
            or scope["path"] in self.streamed_paths
        ):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                if more:
                    await drain_body(receive, DRAIN_BYTES)
                problem = Problem(
                    title="Content Too Large",
                    status=413,
                    code="too_large",
                    detail=f"the request body is larger than {self.max_bytes} bytes",
                    instance=scope["path"],
                )
                await problem_response(problem)(scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


async def drain_body(receive: Receive, limit: int) -> None:
    """Read and drop up to ``limit`` more body bytes (until the body ends or the client goes)."""
    seen, more = 0, True
    while more and seen <= limit:
        message = await receive()
        seen += len(message.get("body", b""))
        more = message["type"] == "http.request" and message.get("more_body", False)
