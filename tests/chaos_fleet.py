"""The chaos test's fleet: an AOF redis-server and gateway processes that can be killed, paused and restarted on
the same ports, and the seeded fault injector that does it."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import ROOT, free_port, stop_process, wait_for_port

UP, STARTING, STOPPED, DOWN = "up", "starting", "stopped", "down"
START_TIMEOUT_SECONDS = 20.0
SIGTERM_EXIT_SECONDS = 10.0


@dataclass
class Node:
    """One process of the fleet, restarted on the same port (and, for Redis, the same data directory)."""

    name: str
    port: int
    command: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    process: subprocess.Popen[bytes] | None = None
    state: str = DOWN
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.starts += 1
        with self.log_path.open("ab") as log_file:
            log_file.write(f"\n===== start {self.starts} of {self.name} =====\n".encode())
            log_file.flush()
            return subprocess.Popen(self.command, cwd=ROOT, env=self.env, stdout=log_file, stderr=subprocess.STDOUT)

    async def start(self) -> None:
        self.state = STARTING
        self.process = self._spawn()
        await asyncio.to_thread(wait_for_port, self.port, self.process, START_TIMEOUT_SECONDS)
        self.state = UP

    def signal(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait_exit(self, within: float) -> int | None:
        """The exit code, or None if it is still running after `within` seconds."""
        assert self.process is not None
        try:
            return await asyncio.to_thread(self.process.wait, within)
        except subprocess.TimeoutExpired:
            return None

    async def kill(self) -> None:
        self.state = DOWN
        self.signal(signal.SIGKILL)
        await self.wait_exit(10)

    def stop_for_good(self) -> None:
        if self.process is None:
            return
        if self.state == STOPPED:
            self.process.send_signal(signal.SIGCONT)
        stop_process(self.process)
        self.state = DOWN


@dataclass
class Fleet:
    """Redis with AOF on disk, and gateway processes on it."""

    redis: Node
    gateways: list[Node]
    faults: list[str] = field(default_factory=list)
    # SIGTERMs not followed by an exit within SIGTERM_EXIT_SECONDS, though the grace period is far shorter.
    hung_shutdowns: list[str] = field(default_factory=list)
    started_at: float = field(default_factory=time.monotonic)

    @classmethod
    def create(cls, directory: Path, size: int, gateway_env: dict[str, str]) -> Fleet:
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is not on PATH: `make test` installs it"
        redis_dir = directory / "redis"
        redis_dir.mkdir()
        port = free_port()
        options = f"--port {port} --bind 127.0.0.1 --dir {redis_dir} --appendonly yes --appendfsync everysec"
        redis = Node("redis", port, [binary, *options.split(), "--save", ""], directory / "redis.log")
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env = {**base_env, "GATEWAY_STORAGE__URL": f"redis://127.0.0.1:{port}/0", **gateway_env}
        gateways = []
        for n in range(size):
            gateway_port = free_port()
            command = [sys.executable, "-m", "gateway", "serve", "--port", str(gateway_port)]
            gateways.append(Node(f"gw{n}", gateway_port, command, directory / f"gw{n}.log", env=env))
        return cls(redis, gateways)

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis.port}/0"

    async def start(self) -> None:
        await self.redis.start()
        await asyncio.gather(*(gateway.start() for gateway in self.gateways))
        self.started_at = time.monotonic()  # notes count from here

    def live_urls(self) -> list[str]:
        return [gateway.url for gateway in self.gateways if gateway.state == UP]

    def note(self, text: str) -> None:
        line = f"t={time.monotonic() - self.started_at:6.1f}s {text}"
        self.faults.append(line)
        print(f"chaos: {line}", flush=True)

    async def heal(self) -> None:
        """Everything running again: the state the fleet must settle from."""
        if self.redis.state != UP:
            await self.redis.start()
        for gateway in self.gateways:
            if gateway.state == STOPPED:
                gateway.signal(signal.SIGCONT)
                gateway.state = UP
            elif gateway.state == DOWN:
                await gateway.start()

    def stop(self) -> None:
        for node in [*self.gateways, self.redis]:
            node.stop_for_good()

    def logs_mentioning(self, needle: str, limit: int = 6) -> list[str]:
        """Gateway log lines that name `needle` (a response id), for failure reports."""
        lines = []
        for gateway in self.gateways:
            for line in gateway.log_path.read_text(errors="replace").splitlines():
                if needle in line:
                    lines.append(f"{gateway.name}: {line.strip()[:300]}")
        return lines[:limit]


FAULT_KINDS = ("gateway_sigkill", "gateway_sigstop", "gateway_sigterm", "redis_sigkill")
FAULT_WEIGHTS = (3, 2, 2, 1)
FAULT_GAP_SECONDS = (1.0, 3.0)
RESTART_ALLOWANCE_SECONDS = 3.0  # a gateway process takes 1-2 s to listen on 2 busy cores


async def inject_faults(fleet: Fleet, rng: random.Random, *, until: float, lease_seconds: float) -> None:
    """One fault at a time, at random (from `rng`), each undone before the next; a fault starts only if it should
    be undone before `until`, so the fleet is whole again by then (the caller heals it in case one overran)."""
    while True:
        await asyncio.sleep(rng.uniform(*FAULT_GAP_SECONDS))
        kind = rng.choices(FAULT_KINDS, FAULT_WEIGHTS)[0]
        pause = {
            "gateway_sigkill": rng.uniform(0.2, 1.5),
            "gateway_sigstop": lease_seconds + rng.uniform(0.5, 2.0),
            "gateway_sigterm": 0.0,
            "redis_sigkill": rng.uniform(0.3, 2.0),
        }[kind]
        takes = pause + (lease_seconds + RESTART_ALLOWANCE_SECONDS if kind == "gateway_sigterm" else 0.0)
        if time.monotonic() + takes + RESTART_ALLOWANCE_SECONDS > until:
            if until - time.monotonic() < 5.0:
                return
            continue  # a shorter fault may still fit
        if kind == "redis_sigkill":
            fleet.note(f"redis SIGKILL, restart after {pause:.1f}s")
            await fleet.redis.kill()
            await asyncio.sleep(pause)
            await fleet.redis.start()
            fleet.note("redis back")
            continue
        target = rng.choice([gateway for gateway in fleet.gateways if gateway.state == UP])
        if kind == "gateway_sigkill":
            fleet.note(f"{target.name} SIGKILL, restart after {pause:.1f}s")
            await target.kill()
            await asyncio.sleep(pause)
            await target.start()
            fleet.note(f"{target.name} back")
        elif kind == "gateway_sigstop":
            fleet.note(f"{target.name} SIGSTOP for {pause:.1f}s")
            target.state = STOPPED
            target.signal(signal.SIGSTOP)
            await asyncio.sleep(pause)
            target.signal(signal.SIGCONT)
            target.state = UP
            fleet.note(f"{target.name} SIGCONT")
        else:
            fleet.note(f"{target.name} SIGTERM")
            target.state = DOWN
            target.signal(signal.SIGTERM)
            code = await target.wait_exit(SIGTERM_EXIT_SECONDS)
            if code is None:
                fleet.note(f"{target.name} still running {SIGTERM_EXIT_SECONDS:.0f}s after SIGTERM: SIGKILL")
                fleet.hung_shutdowns.append(f"{fleet.faults[-1]} (its log: {target.log_path})")
                await target.kill()
            await target.start()
            fleet.note(f"{target.name} back (exit code {code})")
