"""A throwaway RabbitMQ cluster of N nodes on this machine, for fault tests.

``throwaway_cluster(size=3)`` starts ``size`` nodes beside the machine's own
(each a ``ThrowawayRabbitMQ``: its own node name, AMQP and distribution ports,
data, logs, config and plugins file; no plugins unless ``plugins`` names some, e.g.
``rabbitmq_consistent_hash_exchange`` for the ordering lanes), joins nodes 2..N to node 1
with ``rabbitmqctl stop_app; join_cluster; start_app``, and waits until
``cluster_status`` shows every node running. It exposes ``.nodes`` (each with
``.port``, ``.url`` for vhost "/", ``kill9()``, ``start()``), ``.urls`` and
``running_nodes()``. On exit every node still alive is killed (by the pid in its
own pid file) and every directory removed, whatever state the test left.

The nodes share one name prefix with a random fragment (``dsclu-<hex>-<i>``), so
two runs on one machine never collide; every port comes from ``free_port``.
Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator

from .instances import (
    InstanceError,
    InstanceUnavailable,
    ThrowawayRabbitMQ,
    _owned_by,
    _pid_alive,
    _wait_dead,
    free_port,
)


class ClusterNode(ThrowawayRabbitMQ):
    """One node of a throwaway cluster: a ``ThrowawayRabbitMQ`` with a given name."""

    def __init__(
        self, base: str, port: int, dist_port: int, node: str, plugins: tuple[str, ...] = ()
    ):
        super().__init__(base, port, dist_port)
        self.node = node
        self.env["RABBITMQ_NODENAME"] = node
        self.plugins = tuple(plugins)
        if self.plugins:  # the node's own enabled-plugins file (read when it starts)
            with open(self.env["RABBITMQ_ENABLED_PLUGINS_FILE"], "w") as f:
                f.write(f"[{','.join(self.plugins)}].\n")

    def json(self, *args: str, timeout: float = 30) -> object:
        """``rabbitmqctl -n NODE ARGS --formatter json``, parsed; InstanceError on failure."""
        result = self.ctl(*args, "--formatter", "json", timeout=timeout)
        if result.returncode != 0:
            raise InstanceError(
                f"rabbitmqctl -n {self.node} {' '.join(args)}: {result.stdout}{result.stderr}"
            )
        return json.loads(result.stdout)

    def __repr__(self) -> str:
        return f"ClusterNode({self.node}, port={self.port}, running={self.running})"


class ThrowawayCluster:
    """N ``ClusterNode`` s joined into one cluster; see ``throwaway_cluster``."""

    def __init__(self, nodes: list[ClusterNode]):
        self.nodes = nodes

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def node_named(self, name: str) -> ClusterNode:
        for node in self.nodes:
            if node.node == name:
                return node
        raise KeyError(name)

    def _live(self, via: ClusterNode | None) -> list[ClusterNode]:
        if via is not None:
            return [via]
        return [node for node in self.nodes if node.running]

    def cluster_status(self, via: ClusterNode | None = None, timeout: float = 20) -> dict:
        """``cluster_status`` as JSON, asked of ``via`` or else of the first node that answers."""
        errors = []
        for node in self._live(via):
            try:
                status = node.json("cluster_status", timeout=timeout)
            except (InstanceError, subprocess.SubprocessError, ValueError) as exc:
                errors.append(str(exc)[:300])
                continue
            assert isinstance(status, dict)
            return status
        raise InstanceError(f"no node answered cluster_status: {errors}")

    def running_nodes(self, via: ClusterNode | None = None) -> list[str]:
        """The node names ``cluster_status`` reports running."""
        return sorted(self.cluster_status(via).get("running_nodes", []))

    def wait_running(self, count: int, timeout: float, via: ClusterNode | None = None) -> float:
        """Wait until ``count`` nodes report running; the seconds it took."""
        started = time.monotonic()
        deadline = started + timeout
        last: object = None
        while True:
            try:
                last = self.running_nodes(via)
                if len(last) >= count:
                    return time.monotonic() - started
            except InstanceError as exc:
                last = exc
            if time.monotonic() > deadline:
                raise InstanceError(f"{count} running nodes not reached in {timeout:g} s: {last}")
            time.sleep(0.3)

    def queue(self, name: str, vhost: str = "/", via: ClusterNode | None = None) -> dict | None:
        """One queue's ``name type members online leader`` as reported by a live node."""
        return self.queues(vhost, via).get(name)

    def queues(self, vhost: str = "/", via: ClusterNode | None = None) -> dict[str, dict]:
        """Every queue's ``name type members online leader``, by name, as reported by a
        live node."""
        errors = []
        for node in self._live(via):
            try:
                rows = node.json(
                    "list_queues", "-p", vhost, "name", "type", "members", "online", "leader"
                )
            except (InstanceError, subprocess.SubprocessError, ValueError) as exc:
                errors.append(str(exc)[:300])
                continue
            assert isinstance(rows, list)
            return {row["name"]: row for row in rows}
        raise InstanceError(f"no node answered list_queues: {errors}")

    def connections(self, vhost: str = "/") -> dict[str, int]:
        """Client connections per node, by node name. ``list_connections`` lists the
        whole cluster's from any node; the server-side ``port`` tells the node."""
        by_port = {node.port: node.node for node in self.nodes}
        counts = {node.node: 0 for node in self.nodes}
        for node in self._live(None):
            try:
                rows = node.json("list_connections", "vhost", "port", timeout=20)
            except (InstanceError, subprocess.SubprocessError, ValueError):
                continue
            assert isinstance(rows, list)
            for row in rows:
                if row.get("vhost") == vhost and row.get("port") in by_port:
                    counts[by_port[row["port"]]] += 1
            return counts
        raise InstanceError("no node answered list_connections")

    def form(self, timeout: float = 60) -> None:
        """Join nodes 2..N to node 1 and wait until all N run as one cluster."""
        first = self.nodes[0]
        for node in self.nodes[1:]:
            for args in (("stop_app",), ("join_cluster", first.node), ("start_app",)):
                result = node.ctl(*args, timeout=timeout)
                if result.returncode != 0:
                    raise InstanceError(
                        f"rabbitmqctl -n {node.node} {' '.join(args)} failed: "
                        f"{result.stdout}{result.stderr}\n{node.log_tail(20)}"
                    )
        self.wait_running(len(self.nodes), timeout, via=first)

    def destroy(self) -> None:
        """Kill every node still alive (by its own pid) and wait, boundedly, for it to go."""
        pids = [node.pid for node in self.nodes]
        for pid in pids:
            if pid is not None and _pid_alive(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)  # a VM this cluster started
        for pid in pids:
            if pid is not None:
                _wait_dead(pid, 10)

    def __repr__(self) -> str:
        return f"ThrowawayCluster({self.nodes})"


def _start_all(nodes: list[ClusterNode], timeout: float) -> None:
    """Start the nodes in parallel (each takes seconds, mostly waiting)."""
    errors: list[BaseException] = []

    def start(node: ClusterNode) -> None:
        try:
            node.start(timeout=timeout)
        except BaseException as exc:  # reported below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(n,), daemon=True) for n in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 30)
    if any(thread.is_alive() for thread in threads):
        raise InstanceError(f"nodes still starting after {timeout + 30:g} s")
    if errors:
        raise errors[0]


@contextlib.contextmanager
def throwaway_cluster(
    size: int = 3, timeout: float = 60, plugins: tuple[str, ...] = ()
) -> Iterator[ThrowawayCluster]:
    """``size`` fresh RabbitMQ nodes joined into one cluster, each with ``plugins``
    enabled; killed and removed on exit."""
    if size < 1:
        raise ValueError("a cluster has at least one node")
    if os.geteuid() != 0 and pwd.getpwuid(os.geteuid()).pw_name != "rabbitmq":
        raise InstanceUnavailable("a throwaway RabbitMQ node needs root or the rabbitmq user")
    prefix = f"dsclu-{uuid.uuid4().hex[:8]}"
    bases: list[str] = []
    cluster = ThrowawayCluster([])
    try:
        ports: list[int] = []
        for i in range(1, size + 1):
            base = tempfile.mkdtemp(prefix=f"{prefix}-{i}-")
            bases.append(base)
            os.chmod(base, 0o755)
            port = free_port(exclude=tuple(ports))
            ports.append(port)
            dist_port = free_port(exclude=tuple(ports))
            ports.append(dist_port)
            node = ClusterNode(base, port, dist_port, f"{prefix}-{i}@localhost", plugins)
            # The server script drops to the rabbitmq user: it must own everything.
            _owned_by(base, "rabbitmq")
            cluster.nodes.append(node)
        _start_all(cluster.nodes, timeout)
        cluster.form(timeout)
        yield cluster
    finally:
        cluster.destroy()
        keep = os.environ.get("DATASPACE_TEST_LOG_DIR")  # the nodes' logs, for a post-mortem
        for base in bases:
            if keep:
                target = os.path.join(keep, os.path.basename(base))
                shutil.copytree(os.path.join(base, "log"), target, dirs_exist_ok=True)
            shutil.rmtree(base, ignore_errors=True)
