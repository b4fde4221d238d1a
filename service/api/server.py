"""The API's HTTP server: uvicorn's, ending every event stream the moment a shutdown begins.

An open event stream would otherwise hold the graceful shutdown until its timeout and then be
cancelled with a traceback; ended at once, its client resumes it (``Last-Event-ID``) from the
next server, and the process stops within a second.
"""

from __future__ import annotations

from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from .http_limits import protocol_with

GRACEFUL_S = 3
"""What a request still in flight gets once a shutdown begins."""


class ApiServer(uvicorn.Server):
    def __init__(self, app: FastAPI, **config: Any) -> None:
        config.setdefault("timeout_graceful_shutdown", GRACEFUL_S)
        config.setdefault("http", protocol_with(app.state.ctx.settings.max_request_head_bytes))
        super().__init__(uvicorn.Config(app, log_config=None, **config))
        self.app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.app.state.ctx.notices.close_streams()
        super().handle_exit(sig, frame)
