"""Worker "hosts" for fault tests: network namespaces with a link that can be cut.

``worker_host(prefix)`` makes one host: a network namespace with a unique name
(``<prefix>-<hex>``), a veth pair whose root-namespace end has 10.231.X.1/30 and
whose namespace end has 10.231.X.2/30 (X unique among the hosts alive on this
machine), and TCP forwarders (``socat``) in the root namespace, listening on
10.231.X.1 and forwarding to the machine's PostgreSQL and RabbitMQ on 127.0.0.1
(which listen on the loopback only). A process started with ``host.command(argv)``
runs inside the namespace and reaches the services only through that link.

``host.cut()`` takes the root end of the link down: packets in both directions
are dropped, nothing is reset, so every TCP connection across it stays open on
both sides (the forwarders keep their connections to the services open too,
as a real database or broker keeps a connection whose peer vanished). The
services notice only through their own timeouts (AMQP heartbeats; PostgreSQL
only through TCP keepalives, after hours by default). ``host.restore()`` brings
it back up.

On exit, whatever happened: every process left in the namespace is killed (by
the pids ``ip netns pids`` lists: only the test's own), the forwarders are
killed (each started as the leader of its own process group, with its forked
children), the veth pair and the namespace are deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit, urlunsplit

from psycopg2 import extensions

#: the /16 the hosts' /30 links come from (checked unused on this machine)
NETWORK = "10.231"
PG_PORT = 5432
AMQP_PORT = 5672
_LOCK = "/tmp/dataspace-netns.lock"  # noqa: S108  (serializes address choice between runs)


class NetnsUnavailable(RuntimeError):
    """Network namespaces, veth links or socat cannot be had here."""


def unavailable() -> str | None:
    """Why worker hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "socat"):
        if shutil.which(tool) is None:
            return f"no {tool!r} command"
    return None


def _ip(*args: str, check: bool = True, timeout: float = 15) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise NetnsUnavailable(f"ip {' '.join(args)}: {(result.stderr or result.stdout).strip()}")
    return result


def _used_octets() -> set[int]:
    """The X of every 10.231.X.* address or route on this machine (root namespace)."""
    text = (
        _ip("-4", "-o", "addr", "show").stdout + _ip("-4", "route", "show", "table", "all").stdout
    )
    return {int(x) for x in re.findall(rf"\b{re.escape(NETWORK)}\.(\d+)\.\d+", text)}


@dataclass
class Forwarder:
    """``socat`` in the root namespace: ``listen`` on the host's address -> 127.0.0.1."""

    address: str
    port: int
    target_port: int
    proc: subprocess.Popen

    def children(self) -> list[int]:
        """Pids of the forked socat processes, one per connection being forwarded."""
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                return [int(p) for p in f.read().split()]
        except OSError:
            return []

    def upstream_ports(self) -> set[int]:
        """Local ports of this forwarder's connections to 127.0.0.1:target_port (the
        ports the service sees as its clients' ports)."""
        pids = set(self.children())
        if not pids:
            return set()
        out = subprocess.run(
            ["ss", "-Htnp", "state", "established", "dst", f"127.0.0.1:{self.target_port}"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        ports = set()
        for line in out.splitlines():
            found = [int(p) for p in re.findall(r"pid=(\d+)", line)]
            if any(p in pids for p in found):
                fields = line.split()  # Recv-Q Send-Q Local Peer Process
                with contextlib.suppress(ValueError, IndexError):
                    ports.add(int(fields[2].rsplit(":", 1)[1]))
        return ports


@dataclass
class WorkerHost:
    """One namespace, its link, and the forwarders to the machine's services."""

    name: str  # the namespace
    octet: int  # X in 10.231.X.0/30
    host_if: str  # veth end in the root namespace
    ns_if: str  # veth end in the namespace
    forwarders: dict[int, Forwarder] = field(default_factory=dict)  # by target port
    cuts: int = 0

    @property
    def host_address(self) -> str:
        """The root-namespace end: where the forwarders listen."""
        return f"{NETWORK}.{self.octet}.1"

    @property
    def address(self) -> str:
        """The host's own address (the namespace end)."""
        return f"{NETWORK}.{self.octet}.2"

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def amqp_url(self, url: str, **query: object) -> str:
        """``url`` (a broker on 127.0.0.1) as reached from this host, with ``query``
        added (``heartbeat=2``, say)."""
        parts = urlsplit(url)
        userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        netloc = f"{userinfo}{self.host_address}:{AMQP_PORT}"
        extra = urlencode({k: str(v) for k, v in query.items()})
        joined = "&".join(q for q in (parts.query, extra) if q)
        return urlunsplit(parts._replace(netloc=netloc, query=joined))

    def pg_dsn(self, dsn: str) -> str:
        """``dsn`` (a database on 127.0.0.1) as reached from this host."""
        return extensions.make_dsn(dsn, host=self.host_address, port=PG_PORT)

    def cut(self) -> None:
        """Drop everything on the link, both ways; no connection is reset."""
        _ip("link", "set", "dev", self.host_if, "down")
        self.cuts += 1

    def restore(self) -> None:
        _ip("link", "set", "dev", self.host_if, "up")

    def pids(self) -> list[int]:
        """Processes running in the namespace."""
        out = _ip("netns", "pids", self.name, check=False).stdout
        return [int(p) for p in out.split() if p.isdigit()]

    def can_reach(self, port: int, timeout: float = 5.0) -> bool:
        """Whether a process in the namespace can open a TCP connection to the
        forwarder of ``port`` (a throwaway python, to check the link)."""
        probe = (
            "import socket,sys\n"
            f"socket.create_connection(({self.host_address!r}, {port}), timeout={timeout})"
            ".close()\n"
        )
        try:
            result = subprocess.run(
                self.command([sys.executable, "-c", probe]),
                capture_output=True,
                timeout=timeout + 10,
            )
        except subprocess.TimeoutExpired:
            return False
        return result.returncode == 0


def _start_forwarder(address: str, port: int, target_port: int) -> Forwarder:
    proc = subprocess.Popen(
        [
            "socat",
            # once one side closed, close the other within 0.1 s (default 0.5 s): a
            # connection the service dropped disappears from children() at once
            "-t",
            "0.1",
            f"TCP-LISTEN:{port},bind={address},reuseaddr,fork",
            f"TCP:127.0.0.1:{target_port}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: killed with its children
    )
    forwarder = Forwarder(address, port, target_port, proc)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise NetnsUnavailable(
                f"socat on {address}:{port} exited: {proc.stderr.read().decode()[:300]}"
            )
        with contextlib.suppress(OSError), socket.create_connection((address, port), timeout=1):
            return forwarder
        time.sleep(0.05)
    _stop_forwarder(forwarder)
    raise NetnsUnavailable(f"socat on {address}:{port} did not listen within 10 s")


def _stop_forwarder(forwarder: Forwarder) -> None:
    proc = forwarder.proc
    for sig in (signal.SIGTERM, signal.SIGKILL):
        # the group whose leader is our own socat: it and the children it forked
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(3)
            break
        except subprocess.TimeoutExpired:
            continue
    if proc.stderr is not None:
        proc.stderr.close()
    # children outlive a killed leader for a moment; wait for the group to empty
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.05)


def _kill_namespace_processes(host: WorkerHost) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = host.pids()
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while host.pids() and time.monotonic() < deadline:
            time.sleep(0.05)


@contextlib.contextmanager
def worker_host(
    name_prefix: str = "dsh", ports: tuple[int, ...] = (PG_PORT, AMQP_PORT)
) -> Iterator[WorkerHost]:
    """A network namespace linked to the root namespace, with forwarders for ``ports``.

    Raises NetnsUnavailable if it cannot be made here (nothing is left behind).
    """
    reason = unavailable()
    if reason:
        raise NetnsUnavailable(reason)
    tag = uuid.uuid4().hex[:8]
    name = f"{name_prefix}-{tag}"
    # interface names: at most 15 characters
    host = WorkerHost(name=name, octet=-1, host_if=f"dsh{tag}h", ns_if=f"dsh{tag}n")
    created_ns = created_link = False
    try:
        with open(_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # no two runs pick the same X at once
            free = sorted(set(range(1, 255)) - _used_octets())
            if not free:
                raise NetnsUnavailable(f"no free /30 left in {NETWORK}.0.0/16")
            host.octet = random.choice(free)
            _ip("netns", "add", name)
            created_ns = True
            _ip("link", "add", host.host_if, "type", "veth", "peer", "name", host.ns_if)
            created_link = True
            _ip("link", "set", "dev", host.ns_if, "netns", name)
            _ip("addr", "add", f"{host.host_address}/30", "dev", host.host_if)
            _ip("link", "set", "dev", host.host_if, "up")
        _ip("-n", name, "addr", "add", f"{host.address}/30", "dev", host.ns_if)
        _ip("-n", name, "link", "set", "dev", host.ns_if, "up")
        _ip("-n", name, "link", "set", "dev", "lo", "up")
        for port in ports:
            host.forwarders[port] = _start_forwarder(host.host_address, port, port)
        yield host
    finally:
        errors = []
        if created_ns:
            try:
                _kill_namespace_processes(host)
            except Exception as exc:  # go on with the rest of the teardown
                errors.append(f"processes: {exc}")
        for forwarder in host.forwarders.values():
            try:
                _stop_forwarder(forwarder)
            except Exception as exc:
                errors.append(f"socat {forwarder.port}: {exc}")
        if created_link:
            # deleting either end deletes the pair; the end may have gone with the namespace
            _ip("link", "del", "dev", host.host_if, check=False)
        if created_ns:
            result = _ip("netns", "del", name, check=False)
            if result.returncode != 0:
                errors.append(f"ip netns del {name}: {result.stderr.strip()}")
        if errors and sys.exc_info()[0] is None:  # never hide the test's own failure
            raise RuntimeError(f"worker host {name} not fully removed: {errors}")
