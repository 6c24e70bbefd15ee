"""Throwaway PostgreSQL and RabbitMQ instances that fault tests may stop, crash and restart.

Each lives in a temporary directory of its own, listens on 127.0.0.1 only, on a
free port above the kernel's ephemeral range (so no outgoing connection can take
the port while the instance is down), and is removed with its directory when the
context manager exits, whatever state the test left it in.

- ``throwaway_postgres()``: ``initdb`` + ``pg_ctl`` as the ``postgres`` user (when
  run as root), trust authentication. ``.dsn`` names database ``dataspace``, created
  empty at start (a worker creates none unless asked); ``.admin_dsn`` the
  ``postgres`` database.
- ``throwaway_rabbitmq()``: a second RabbitMQ node beside the machine's own, with
  its own node name, ports, data, logs, config file and plugins file. Controlled
  with ``rabbitmqctl -n NODE``; ``kill9()`` kills its VM through its pid file.

Every wait is bounded; every process ended here is one started here, by its pid.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator

SBIN_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/lib/rabbitmq/bin"]
)


class InstanceError(RuntimeError):
    """A throwaway instance would not start or stop."""


class InstanceUnavailable(InstanceError):
    """This machine cannot run such an instance (tools missing, wrong user)."""


# -- ports ------------------------------------------------------------------------
def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
            return low, high
    except (OSError, ValueError):
        return 32768, 60999


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def free_port(exclude: tuple[int, ...] = ()) -> int:
    """A free TCP port on 127.0.0.1, outside the ephemeral range when possible."""
    low, high = _ephemeral_range()
    if high < 64000:
        candidates = (high + 1, 65000)
    else:  # no room above: go below the ephemeral range
        candidates = (max(20000, low - 10000), low - 1)
    for _ in range(200):
        port = random.randrange(*candidates)
        if port not in exclude and _port_free(port):
            return port
    raise InstanceError(f"no free port in {candidates}")


def port_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return True
        time.sleep(0.05)
    return not _pid_alive(pid)


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.readline().strip())
    except (OSError, ValueError):
        return None


def _owned_by(path: str, user: str) -> None:
    """Hand ``path`` (recursively) to ``user`` when we are root and the user exists."""
    if os.geteuid() != 0:
        return
    entry = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)


def _tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as exc:
        return f"(no log at {path}: {exc})"


# -- PostgreSQL -------------------------------------------------------------------
def _pg_bindir() -> str:
    candidates = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            candidates.append(out)
    candidates += ["/usr/lib/postgresql/15/bin"]
    for directory in candidates:
        if directory and os.path.exists(os.path.join(directory, "initdb")):
            return directory
    initdb = shutil.which("initdb")
    if initdb:
        return os.path.dirname(initdb)
    raise InstanceError("initdb not found (pg_config --bindir, /usr/lib/postgresql/15/bin, PATH)")


class ThrowawayPostgres:
    """One PostgreSQL cluster in a temporary directory; see ``throwaway_postgres``."""

    def __init__(self, base: str, port: int, bindir: str):
        self.base = base
        self.port = port
        self.bindir = bindir
        self.data = os.path.join(base, "data")
        self.logfile = os.path.join(base, "postgres.log")
        self.dsn = f"host=127.0.0.1 port={port} user=postgres dbname=dataspace"
        self.admin_dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"

    def _run(self, tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        argv = [os.path.join(self.bindir, tool), *args]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=self.base)

    def init(self) -> None:
        result = self._run(
            "initdb",
            "-D",
            self.data,
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        )
        if result.returncode != 0:
            raise InstanceError(f"initdb failed: {result.stdout}{result.stderr}")

    def create_database(self, name: str = "dataspace") -> None:
        """The database ``.dsn`` names: a worker creates none unless asked to."""
        import psycopg2
        from psycopg2 import sql

        conn = psycopg2.connect(self.admin_dsn, connect_timeout=10)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        finally:
            conn.close()

    def start(self, timeout: float = 30) -> None:
        options = (
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c max_connections=80"
        )
        result = self._run(
            "pg_ctl",
            "start",
            "-D",
            self.data,
            "-l",
            self.logfile,
            "-w",
            "-t",
            str(int(timeout)),
            "-o",
            options,
            timeout=timeout + 10,
        )
        if result.returncode != 0:
            raise InstanceError(
                f"pg_ctl start failed: {result.stdout}{result.stderr}\n{self.log_tail()}"
            )

    def stop(self, mode: str = "fast", timeout: float = 30) -> None:
        """Stop the server: ``fast`` (clean), ``immediate`` (a crash: recovery on start)."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"unknown pg_ctl stop mode {mode!r}")
        result = self._run(
            "pg_ctl",
            "stop",
            "-D",
            self.data,
            "-m",
            mode,
            "-w",
            "-t",
            str(int(timeout)),
            timeout=timeout + 10,
        )
        if result.returncode != 0 and self.running:
            raise InstanceError(f"pg_ctl stop -m {mode} failed: {result.stdout}{result.stderr}")

    @property
    def postmaster_pid(self) -> int | None:
        return _read_pid(os.path.join(self.data, "postmaster.pid"))

    @property
    def running(self) -> bool:
        pid = self.postmaster_pid
        return pid is not None and _pid_alive(pid)

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.logfile, lines)

    def _destroy(self) -> None:
        try:
            if self.running:
                self.stop("immediate", timeout=20)
        except (InstanceError, subprocess.SubprocessError, OSError):
            pass
        pid = self.postmaster_pid
        if pid is not None and _pid_alive(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)  # the postmaster we started; its children follow
            _wait_dead(pid, 10)

    def __repr__(self) -> str:
        return f"ThrowawayPostgres(port={self.port}, running={self.running})"


@contextlib.contextmanager
def throwaway_postgres(port: int | None = None) -> Iterator[ThrowawayPostgres]:
    """A fresh PostgreSQL cluster, started; stopped and removed on exit."""
    bindir = _pg_bindir()
    base = tempfile.mkdtemp(prefix="dsfault-pg-")
    instance = None
    try:
        os.chmod(base, 0o700)
        try:
            _owned_by(base, "postgres")  # initdb refuses to run as root
        except KeyError:
            raise InstanceUnavailable("running as root, but there is no postgres user") from None
        instance = ThrowawayPostgres(base, port or free_port(), bindir)
        instance.init()
        instance.start()
        instance.create_database()
        yield instance
    finally:
        if instance is not None:
            instance._destroy()
        shutil.rmtree(base, ignore_errors=True)


# -- RabbitMQ ---------------------------------------------------------------------
def _rabbit_tool(name: str) -> str:
    path = shutil.which(name, path=SBIN_PATH)
    if path is None:
        raise InstanceUnavailable(f"{name} not found")
    return path


class ThrowawayRabbitMQ:
    """A second RabbitMQ node in a temporary directory; see ``throwaway_rabbitmq``."""

    def __init__(self, base: str, port: int, dist_port: int):
        self.base = base
        self.port = port
        self.dist_port = dist_port
        self.node = f"dsfault-{uuid.uuid4().hex[:10]}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{port}/%2F"
        self.pid_file = os.path.join(base, "rabbitmq.pid")
        self.log_dir = os.path.join(base, "log")
        mnesia = os.path.join(base, "mnesia")
        config = os.path.join(base, "rabbitmq.conf")
        plugins = os.path.join(base, "enabled_plugins")
        os.makedirs(mnesia)
        os.makedirs(self.log_dir)
        with open(plugins, "w") as f:
            f.write("[].\n")
        # Our own config file: the machine's (/etc/rabbitmq/rabbitmq.conf) pins the
        # listener to the real node's port 5672.
        with open(config, "w") as f:
            f.write(f"listeners.tcp.1 = 127.0.0.1:{port}\n")
        self.env = {
            **os.environ,
            "PATH": SBIN_PATH,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "RABBITMQ_MNESIA_BASE": mnesia,
            "RABBITMQ_LOG_BASE": self.log_dir,
            "RABBITMQ_CONFIG_FILE": config,
            "RABBITMQ_ENABLED_PLUGINS_FILE": plugins,
            "RABBITMQ_PID_FILE": self.pid_file,
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        self._server = _rabbit_tool("rabbitmq-server")
        self._ctl_path = _rabbit_tool("rabbitmqctl")

    def ctl(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self._ctl_path, "-n", self.node, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    @property
    def pid(self) -> int | None:
        return _read_pid(self.pid_file)

    @property
    def running(self) -> bool:
        pid = self.pid
        return pid is not None and _pid_alive(pid)

    def start(self, timeout: float = 60) -> None:
        """Start the node and wait until it accepts AMQP connections."""
        if self.running:
            raise InstanceError(f"{self.node} is already running")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.pid_file)  # stale after a kill -9
        started = time.monotonic()
        subprocess.run(
            [self._server, "-detached"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.base,
        )
        result = self.ctl(
            "wait", self.pid_file, "--timeout", str(int(timeout)), timeout=timeout + 15
        )
        if result.returncode != 0:
            raise InstanceError(
                f"{self.node} did not start: {result.stdout}{result.stderr}\n{self.log_tail()}"
            )
        deadline = started + timeout
        while not port_open(self.port):
            if time.monotonic() > deadline:
                raise InstanceError(f"{self.node} started but port {self.port} is closed")
            time.sleep(0.1)

    def stop(self, timeout: float = 60) -> None:
        """A clean shutdown (``rabbitmqctl stop``), waiting for the VM to exit."""
        pid = self.pid
        result = self.ctl("stop", self.pid_file, timeout=timeout)
        if pid is not None and not _wait_dead(pid, 15):
            raise InstanceError(f"{self.node} did not stop: {result.stdout}{result.stderr}")

    def kill9(self) -> None:
        """Kill the node's VM with SIGKILL (no shutdown at all)."""
        pid = self.pid
        if pid is None or not _pid_alive(pid):
            raise InstanceError(f"{self.node} is not running")
        os.kill(pid, signal.SIGKILL)
        if not _wait_dead(pid, 15):
            raise InstanceError(f"{self.node} (pid {pid}) survived SIGKILL")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.pid_file)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 40) -> str:
        return _tail(os.path.join(self.log_dir, f"{self.node}.log"), lines)

    def _destroy(self) -> None:
        pid = self.pid
        if pid is None or not _pid_alive(pid):
            return
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self.ctl("stop", self.pid_file, timeout=30)
        if not _wait_dead(pid, 10):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)  # the VM we started, by its pid
            _wait_dead(pid, 10)

    def __repr__(self) -> str:
        return f"ThrowawayRabbitMQ({self.node}, port={self.port}, running={self.running})"


@contextlib.contextmanager
def throwaway_rabbitmq() -> Iterator[ThrowawayRabbitMQ]:
    """A fresh RabbitMQ node, started; stopped and removed on exit."""
    if os.geteuid() != 0 and pwd.getpwuid(os.geteuid()).pw_name != "rabbitmq":
        raise InstanceUnavailable("a throwaway RabbitMQ node needs root or the rabbitmq user")
    base = tempfile.mkdtemp(prefix="dsfault-mq-")
    instance = None
    try:
        os.chmod(base, 0o755)
        port = free_port()
        instance = ThrowawayRabbitMQ(base, port, free_port(exclude=(port,)))
        # The server script drops to the rabbitmq user: it must own everything.
        _owned_by(base, "rabbitmq")
        instance.start()
        yield instance
    finally:
        if instance is not None:
            instance._destroy()
        shutil.rmtree(base, ignore_errors=True)
