"""What a person sees while a job runs or a file uploads, on stderr.

On a terminal: one live bar (rich) with the stage, the job's overall percentage, elapsed time and
an ETA, log lines printed above it. Elsewhere (a CI log, a pipe): plain lines, one when the stage
changes and at most one every `LINE_EVERY_S` otherwise, plus the job's log lines. ``quiet``: only
the final state. ETA: from the overall fraction and the time elapsed since the job started.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Literal, TextIO

Mode = Literal["auto", "bar", "lines", "quiet"]
LINE_EVERY_S = 5.0


def _clock(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds) or seconds < 0:
        return "--:--"
    seconds = int(seconds + 0.5)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class JobView:
    """Fed the job's events (`event`), shows its progress; `close` when it ended."""

    def __init__(self, stream: TextIO | None = None, mode: Mode = "auto", job_id: str = "") -> None:
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.mode, self.job_id = mode, job_id
        self.started = time.monotonic()
        self.overall = 0.0
        self.stage: str | None = None
        self.last_line = 0.0
        self._bar: Any = None
        self._task: Any = None

    # --- derived numbers ---------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def eta(self) -> float | None:
        if self.overall < 0.02:
            return None
        return self.elapsed() * (1 - self.overall) / self.overall

    # --- output -------------------------------------------------------------------------------

    def say(self, line: str) -> None:
        if self._bar is not None:
            self._bar.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=self.stream, flush=True)

    def event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "state":
            state = data.get("state")
            if state == "RUNNING":
                self.started = time.monotonic()
            if self.mode != "quiet" and state not in ("SUCCEEDED", "FAILED", "CANCELLED"):
                self.say(f"job {self.job_id} {state}")
            return
        if kind == "log":
            if self.mode != "quiet":
                self.say(f"[{data.get('stage') or '-'}] {data.get('message')}")
            return
        if kind != "progress":
            return
        stage = data.get("stage")
        done = data.get("overall")
        if isinstance(done, (int, float)):
            self.overall = max(self.overall, min(1.0, float(done)))
        new_stage, self.stage = stage != self.stage, stage
        if self.mode == "bar":
            self._draw()
        elif self.mode == "lines" and (new_stage or time.monotonic() - self.last_line >= LINE_EVERY_S):
            self.last_line = time.monotonic()
            step = f" {data.get('step')}/{data.get('total')}" if data.get("total") else ""
            loss = f" loss {data['loss']:.4g}" if isinstance(data.get("loss"), (int, float)) else ""
            self.say(f"[{stage}]{step}{loss}  {self.overall:.0%} overall, elapsed {_clock(self.elapsed())}, "
                     f"eta {_clock(self.eta())}")  # fmt: skip

    def _draw(self) -> None:
        if self._bar is None:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

            console = Console(file=self.stream, stderr=self.stream is sys.stderr)
            self._bar = Progress(
                TextColumn("[bold]{task.fields[stage]:<12}"), BarColumn(), TaskProgressColumn(),
                TextColumn("elapsed {task.fields[elapsed]}  eta {task.fields[eta]}"),
                console=console, transient=False, refresh_per_second=8,
            )  # fmt: skip
            self._bar.start()
            self._task = self._bar.add_task("job", total=1000, stage="", elapsed="", eta="")
        self._bar.update(self._task, completed=int(self.overall * 1000), stage=self.stage or "",
                         elapsed=_clock(self.elapsed()), eta=_clock(self.eta()))  # fmt: skip

    def close(self, state: str | None = None, detail: str | None = None) -> None:
        if self._bar is not None:
            if state == "SUCCEEDED":
                self.overall = 1.0
                self._draw()
            self._bar.stop()
            self._bar = None
        if state and self.mode != "quiet":
            tail = f": {detail}" if detail else ""
            print(f"job {self.job_id} {state} after {_clock(self.elapsed())}{tail}", file=self.stream, flush=True)


class UploadView:
    """Bytes sent of one upload: a bar on a terminal, a line before and after elsewhere."""

    def __init__(self, name: str, size: int, stream: TextIO | None = None, mode: Mode = "auto") -> None:
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.mode, self.name, self.size, self.sent = mode, name, size, 0
        self._bar: Any = None
        if mode == "bar":
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

            self._bar = Progress(TextColumn(f"uploading {name}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), console=Console(file=self.stream))  # fmt: skip
            self._bar.start()
            self._task = self._bar.add_task("upload", total=size)
        elif mode == "lines":
            print(f"uploading {name} ({size} bytes)", file=self.stream, flush=True)

    def advance(self, n: int) -> None:
        self.sent += n
        if self._bar is not None:
            self._bar.update(self._task, completed=self.sent)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
