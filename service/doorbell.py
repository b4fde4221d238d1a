"""A doorbell between the processes of one machine (the embedded setup): UNIX datagram sockets
in a folder. The embedded broker rings when it queues a message (`service.broker`), and the
embedded database when job events are committed (`service.notices`)."""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import select
import socket
from pathlib import Path

log = logging.getLogger(__name__)
MAX_PAYLOAD = 4096
MAX_SOCKET_PATH = 100
"""A little under the kernel's limit on a UNIX socket's path (108 bytes with the final NUL)."""


class Doorbell:
    """Wakes the processes on this machine that wait on a folder, as soon as another rings.

    Each waiting process listens on a UNIX datagram socket in the folder; a ring sends a short
    payload to each of them, and a listener that is gone has its socket removed. Whoever waits
    keeps a poll as the safety net: a ring that is lost (a folder path too long for a socket, a
    platform without UNIX sockets, a full socket buffer) costs one poll interval."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._sock: socket.socket | None = None
        self._path: Path | None = None
        self._owner = 0

    def ring(self, payload: bytes = b"!") -> None:
        """Send ``payload`` (a few hundred bytes at most) to every listener."""
        try:
            bells = [p for p in self.folder.iterdir() if p.suffix == ".sock"]
        except OSError:
            return
        if not bells or not hasattr(socket, "AF_UNIX"):
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as out:
            out.setblocking(False)
            for bell in bells:
                try:
                    out.sendto(payload, str(bell))
                except (ConnectionRefusedError, FileNotFoundError):  # its process is gone
                    bell.unlink(missing_ok=True)
                except OSError:  # BlockingIOError: rung already and not yet heard
                    pass

    def wait(self, timeout: float) -> list[bytes]:
        """Sleep up to ``timeout`` seconds, less when a sender rings; the payloads of the rings
        heard (all of them since the last wait)."""
        sock = self._listen()
        if sock is None:
            select.select([], [], [], timeout)
            return []
        heard: list[bytes] = []
        if select.select([sock], [], [], timeout)[0]:
            try:
                while True:
                    heard.append(sock.recv(MAX_PAYLOAD))
            except BlockingIOError:
                pass
        return heard

    def _listen(self) -> socket.socket | None:
        if self._owner == os.getpid():
            return self._sock
        self._owner, self._sock = os.getpid(), None  # (a forked child listens on its own socket)
        path = self.folder / f"{os.getpid()}-{secrets.token_hex(4)}.sock"
        if not hasattr(socket, "AF_UNIX") or len(str(path)) > MAX_SOCKET_PATH:
            log.warning("no doorbell in %s (path too long for a UNIX socket, or none on this "
                        "platform): waiting falls back to polling", self.folder)  # fmt: skip
            return None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(str(path))
        except OSError:
            return None
        sock.setblocking(False)
        self._sock, self._path = sock, path
        atexit.register(self.close)
        return sock

    def close(self) -> None:
        if self._sock is not None and self._owner == os.getpid():
            self._sock.close()
            if self._path is not None:
                self._path.unlink(missing_ok=True)
        self._sock = self._path = None




_BY_FILE: dict[str, Doorbell] = {}


def of_file(path: str) -> Doorbell:
    """The doorbell of a database file, in the folder ``<file>.wake`` (one per process and file)."""
    if path not in _BY_FILE:
        _BY_FILE[path] = Doorbell(Path(path + ".wake"))
    return _BY_FILE[path]
