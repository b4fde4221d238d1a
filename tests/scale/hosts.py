"""Worker hosts on one machine: network namespaces that share nothing with each other but the
services, reached through their own veth pair. Shared by tests/scale/test_hosts.py and
``bench/scale.py``; needs root (``ip netns``).

Addresses stay in the loopback range: the services listen on ``127.77.R.1`` (R random per run; on
the root namespace's loopback, where all of 127/8 is local), host ``i`` is ``127.77.R.(10+i)`` on
its end of a veth pair. Loopback addresses on a veth need ``route_localnet`` on both ends, a
host route to the service address in the namespace's ``local`` table (else its own ``lo`` would
answer for all of 127/8), and in the root namespace a host route back to each host in the
``local`` table (else replies to ``127.77.R.x`` would be delivered to the root's own ``lo``). The
routes go with their veth when the namespace is deleted. A namespace has no other route: its
worker reaches PostgreSQL, Redis and S3 at the service address and nothing else.

Each host gets its own data and work folders (``<root>/host-N``); nothing on disk is shared
unless a test says so (the local-store comparison in ``bench/scale.py`` shares ``KDQ_STORAGE_DIR``).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.faults.stack import PrivatePostgres, PrivateRedis
from tests.service.conftest import REPO, free_port, kdq

from .s3 import MotoServer


def sh(*argv: str, ns: str | None = None) -> None:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30)


@dataclass
class Host:
    index: int
    ns: str
    address: str
    root: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def work_dir(self) -> Path:
        return self.root / "work"

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True, check=False)
        return [int(p) for p in out.stdout.split()]

    def kill(self) -> list[int]:
        """SIGKILL every process in the namespace (the host "loses power")."""
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        return pids


class Hosts:
    """The namespaces of one test run (see the module doc)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.run = secrets.randbelow(200) + 20
        self.service_ip = f"127.77.{self.run}.1"
        self.hosts: list[Host] = []

    def add(self) -> Host:
        i = len(self.hosts) + 1
        ns, outer, inner = f"kdq{self.run}h{i}", f"kq{self.run}h{i}r", f"kq{self.run}h{i}n"
        address = f"127.77.{self.run}.{10 + i}"
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        sh("ip", "link", "set", inner, "netns", ns)
        sh("sysctl", "-qw", f"net.ipv4.conf.{outer}.route_localnet=1")
        sh("ip", "addr", "add", f"127.77.{self.run}.{100 + i}/32", "dev", outer)
        sh("ip", "link", "set", outer, "up")
        sh("ip", "route", "add", f"{address}/32", "dev", outer, "table", "local")
        sh("ip", "link", "set", "lo", "up", ns=ns)
        sh("sysctl", "-qw", f"net.ipv4.conf.{inner}.route_localnet=1", ns=ns)
        sh("ip", "addr", "add", f"{address}/32", "dev", inner, ns=ns)
        sh("ip", "link", "set", inner, "up", ns=ns)
        sh("ip", "route", "add", f"{self.service_ip}/32", "dev", inner, "src", address, "table", "local", ns=ns)
        host = Host(i, ns, address, self.root / f"host-{i}")
        (host.root / "data").mkdir(parents=True, exist_ok=True)
        self.hosts.append(host)
        return host

    def spawn(self, host: Host, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        env = {**env, "KDQ_DATA_DIR": str(host.root / "data"), "KDQ_WORK_DIR": str(host.work_dir)}
        with open(host.root / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(["ip", "netns", "exec", host.ns, *argv], cwd=REPO, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        host.procs.append(proc)
        return proc

    def start_worker(self, host: Host, env: dict[str, str], queues: str = "cpu") -> subprocess.Popen[bytes]:
        return self.spawn(host, "worker", kdq("worker", "--queues", queues, "--name", f"host{host.index}"), env)

    def wait_workers(self, timeout: float = 90) -> None:
        self.wait_workers_of(self.hosts, timeout)

    def wait_workers_of(self, hosts: list[Host], timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        for host in hosts:
            log = host.root / "worker.log"
            while " ready: queues " not in (log.read_text(errors="replace") if log.exists() else ""):
                if time.monotonic() > deadline or any(p.poll() is not None for p in host.procs):
                    raise RuntimeError(f"host {host.index}'s worker did not start:\n{self.log_tail(host)}")
                time.sleep(0.2)

    def host_of(self, pid: int) -> Host | None:
        for host in self.hosts:
            if pid in host.pids():
                return host
        return None

    def log_tail(self, host: Host, lines: int = 30) -> str:
        log = host.root / "worker.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""

    def stop_workers_of(self, hosts: list[Host], procs: list[subprocess.Popen[bytes]]) -> None:
        """Stop these worker processes (a warm shutdown), and forget their logs."""
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        for host in hosts:
            host.procs = [p for p in host.procs if p not in procs]
            (host.root / "worker.log").unlink(missing_ok=True)

    def stop_workers(self) -> None:
        for host in self.hosts:
            for p in host.procs:
                if p.poll() is None:
                    try:
                        os.killpg(p.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + 15
            for p in host.procs:
                try:
                    p.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            host.kill()
            host.procs.clear()

    def close(self) -> None:
        self.stop_workers()
        for host in self.hosts:
            subprocess.run(["ip", "netns", "del", host.ns], capture_output=True, check=False)
        self.hosts.clear()


class ServicePostgres(PrivatePostgres):
    """The fault stack's private PostgreSQL, listening on the service address too."""

    listen = "127.0.0.1"

    def start(self) -> None:
        hba = self.data / "pg_hba.conf"
        if "127.77.0.0/16" not in hba.read_text():
            with open(hba, "a") as f:  # the hosts' loopback-range addresses
                f.write("host all all 127.77.0.0/16 trust\n")
        options = f"-p {self.port} -k {self.root} -c listen_addresses={self.listen} -c fsync=off -c max_connections=300"
        self._ctl("-l", str(self.log), "-o", options, "start")


class ServiceRedis(PrivateRedis):
    bind = "127.0.0.1"

    def start(self) -> None:
        argv = [*_redis_argv(self), "--bind", *self.bind.split()]
        self.proc = subprocess.Popen(argv, start_new_session=True)
        import redis

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=1).ping():
                    return
            except Exception:
                time.sleep(0.05)
        raise TimeoutError("redis-server did not start")


def _redis_argv(r: PrivateRedis) -> list[str]:
    from service.embedded.redis import SERVER

    return [SERVER, "--port", str(r.port), "--save", "", "--appendonly", "no", "--dir", str(r.root),
            "--logfile", str(r.root / "redis.log")]  # fmt: skip


@dataclass
class Services:
    """PostgreSQL, Redis and S3 on the service address (and 127.0.0.1, for the test and the API)."""

    pg: PrivatePostgres
    redis: PrivateRedis
    s3: MotoServer
    ip: str

    @classmethod
    def start(cls, ip: str, root: Path) -> Services:
        ServicePostgres.listen = f"127.0.0.1,{ip}"
        ServiceRedis.bind = f"127.0.0.1 {ip}"
        root.mkdir(parents=True, exist_ok=True)
        pg = ServicePostgres()
        redis_server = ServiceRedis(root)
        s3 = MotoServer(host=ip, port=free_port(), log=root / "moto.log")
        return cls(pg, redis_server, s3, ip)

    def env(self) -> dict[str, str]:
        """Where a process (in any namespace) finds the services."""
        return {
            "KDQ_DATABASE_URL": f"postgresql+psycopg://postgres@{self.ip}:{self.pg.port}/kdq",
            "KDQ_BROKER_URL": f"redis://{self.ip}:{self.redis.port}/0",
        }

    def close(self) -> None:
        self.s3.close()
        self.redis.close()
        self.pg.close()
