"""A real Redis Cluster for the tests: 3 masters and 3 replicas of `redis-server --cluster-enabled yes`, all on
loopback, joined with `redis-cli --cluster create`, each on a free port (and its bus port, port + 10000)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

MASTERS = 3
REPLICAS_PER_MASTER = 1
# How long a master may be unreachable before its replica is promoted: short, so a failover test is quick.
NODE_TIMEOUT_MS = 1500
BUS_PORT_OFFSET = 10_000


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_port(taken: set[int]) -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + BUS_PORT_OFFSET < 65_536 and port not in taken and _port_free(port + BUS_PORT_OFFSET):
            return port
    raise RuntimeError("no free port pair for a cluster node")


@dataclass
class ClusterNode:
    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self, binary: str) -> None:
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                str(NODE_TIMEOUT_MS),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def cli(self, *args: str, timeout: float = 10.0) -> str:
        """`redis-cli -p <port> <args>`'s output."""
        done = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        return done.stdout


@dataclass
class RedisCluster:
    nodes: list[ClusterNode] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The gateway's storage URL for this cluster: every node as a seed."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    @classmethod
    def start(cls, directory: Path) -> RedisCluster:
        binary = shutil.which("redis-server")
        if binary is None or shutil.which("redis-cli") is None:
            raise RuntimeError("redis-server and redis-cli are needed: `make test` installs them (apt-get)")
        cluster = cls()
        taken: set[int] = set()
        for index in range(MASTERS * (1 + REPLICAS_PER_MASTER)):
            port = free_cluster_port(taken)
            taken |= {port, port + BUS_PORT_OFFSET}
            node_directory = directory / f"node{index}"
            node_directory.mkdir()
            node = ClusterNode(port, node_directory)
            node.start(binary)
            cluster.nodes.append(node)
        try:
            for node in cluster.nodes:
                _wait_listening(node)
            addresses = [f"127.0.0.1:{node.port}" for node in cluster.nodes]
            subprocess.run(
                ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", str(REPLICAS_PER_MASTER)],
                input="yes\n",
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            cluster.wait_ok()
            cluster.wait_replicas()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node says `cluster_state:ok` and agrees on where every slot is."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = [node for node in self.nodes if node.process is not None and node.process.poll() is None]
            if all("cluster_state:ok" in node.cli("CLUSTER", "INFO") for node in live):
                return
            time.sleep(0.1)
        raise TimeoutError("the Redis Cluster did not become ok")

    def wait_replicas(self, timeout: float = 30.0) -> None:
        """Until every node sees MASTERS * REPLICAS_PER_MASTER replicas, each with its replication link up."""
        wanted = MASTERS * REPLICAS_PER_MASTER
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            views = [node.cli("CLUSTER", "NODES") for node in self.nodes]
            linked = [node.cli("INFO", "replication") for node in self.nodes]
            replicas_seen = all(view.count("slave") == wanted for view in views)
            links_up = sum("master_link_status:up" in info for info in linked) == wanted
            if replicas_seen and links_up:
                return
            time.sleep(0.1)
        raise TimeoutError("the Redis Cluster's replicas did not all attach")

    def owner_of(self, slot: int) -> ClusterNode:
        """The master that serves `slot` now."""
        for line in self.nodes[0].cli("CLUSTER", "NODES").splitlines():
            fields = line.split()
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            for served in fields[8:]:
                first, _, last = served.partition("-")
                if first.isdigit() and int(first) <= slot <= int(last or first):
                    port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                    return next(node for node in self.nodes if node.port == port)
        raise LookupError(f"no master serves slot {slot}")

    def migrate_slot(self, slot: int, *, keys_per_step: int = 1, pause: float = 0.05) -> ClusterNode:
        """Move `slot` to another master the way `redis-cli --cluster reshard` does (IMPORTING / MIGRATING, its
        keys a few at a time, then the new owner announced), slowly, so clients meet ASK and TRYAGAIN meanwhile;
        returns the new owner."""
        source = self.owner_of(slot)
        masters = {node.port: node for node in (self.owner_of(first) for first in (0, 8000, 16000))}
        target = next(node for port, node in masters.items() if port != source.port)
        source_id, target_id = source.cli("CLUSTER", "MYID").strip(), target.cli("CLUSTER", "MYID").strip()
        target.cli("CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id)
        source.cli("CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id)
        while keys := source.cli("CLUSTER", "GETKEYSINSLOT", str(slot), str(keys_per_step)).split():
            source.cli("MIGRATE", "127.0.0.1", str(target.port), "", "0", "5000", "KEYS", *keys)
            time.sleep(pause)
        for node in (target, source, *(node for node in masters.values() if node not in (target, source))):
            node.cli("CLUSTER", "SETSLOT", str(slot), "NODE", target_id)
        return target

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.terminate()
        for node in self.nodes:
            if node.process is not None:
                try:
                    node.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait()


def _wait_listening(node: ClusterNode, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.process is not None and node.process.poll() is not None:
            raise RuntimeError(f"redis-server on {node.port} exited with {node.process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", node.port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"redis-server on {node.port} is not listening")
