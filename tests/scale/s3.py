"""An S3 server for the tests (moto's standalone server, ``moto[server]``) and a TCP gate in front
of it that a test can cut (connections refused, open ones reset) and restore, to make the store
unreachable the way a network partition does. Shared by tests/scale and ``bench/scale.py``.

``.ci/run`` starts one moto server on 127.0.0.1 (``KDQ_TEST_S3_ENDPOINT``); tests that need their
own (bound to another address, or to break it) start a private one.
"""

from __future__ import annotations

import os
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.service.conftest import free_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
"""moto accepts any credentials; these keep boto3 from looking for real ones."""


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


class MotoServer:
    """``moto_server`` on ``host:port`` (a free port by default), in its own process group."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, log: Path | None = None) -> None:
        self.host, self.port = host, port or free_port()
        self.endpoint = f"http://{host}:{self.port}"
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 -- the child keeps it
        argv = [sys.executable, "-m", "moto.server", "-H", host, "-p", str(self.port)]
        self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(self.endpoint)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def s3_client(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"}),
                        aws_access_key_id="testing", aws_secret_access_key="testing",
                        region_name="us-east-1")  # fmt: skip


def new_bucket(endpoint: str) -> str:
    name = f"kdq-test-{secrets.token_hex(4)}"
    s3_client(endpoint).create_bucket(Bucket=name)
    return name


def s3_env(endpoint: str, bucket: str, prefix: str = "kdq", **extra: str) -> dict[str, str]:
    """What a service process needs to keep its blobs in ``s3://bucket/prefix`` at ``endpoint``."""
    return {
        **CREDENTIALS,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "KDQ_STORAGE_URL": f"s3://{bucket}/{prefix}",
        "KDQ_S3_ADDRESSING_STYLE": "path",
        "KDQ_S3_TIMEOUT_S": "3",
        **extra,
    }


def keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    client = s3_client(endpoint)
    out: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return out


def multipart_uploads(endpoint: str, bucket: str) -> list[str]:
    return [u["Key"] for u in s3_client(endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


class Gate:
    """A TCP forwarder ``listen_host:port`` → ``target``; `cut` refuses new connections and resets
    open ones (the store is unreachable), `restore` lets them through again."""

    def __init__(self, target: tuple[str, int], listen_host: str = "127.0.0.1") -> None:
        self.target, self.host, self.port = target, listen_host, free_port()
        self.endpoint = f"http://{listen_host}:{self.port}"
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        if self._listener is not None:
            return
        listener = socket.create_server((self.host, self.port), reuse_port=False)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for c in conns:
            try:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                c.close()
            except OSError:
                pass

    def close(self) -> None:
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns |= {client, upstream}
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b, selectors.EVENT_READ, a)
        try:
            while True:
                for key, _ in sel.select(timeout=1):
                    data = key.fileobj.recv(1 << 16)  # type: ignore[union-attr]
                    if not data:
                        return
                    key.data.sendall(data)
                with self._lock:
                    if a not in self._conns:
                        return
        except OSError:
            return
        finally:
            sel.close()
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass
            with self._lock:
                self._conns -= {a, b}
