"""The processes under test: redis-server, the simulator, the gateways, LiteLLM; and what /proc and Redis's INFO
say about them.

Every process is started in a session of its own (so a child it forks is stopped with it) and registered with a
`ProcessGroup`, which stops them all, in reverse order, even when the benchmark fails half-way.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
# LiteLLM (and py-spy) live in a venv of the bench's own, not the project's: `make bench-setup` creates it.
LITELLM_VENV = ROOT / "bench" / ".venv-litellm"
LOOPBACK = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1
# "2026-01-01 12:00:00,123 WARNING gateway.errors: message" (the gateway's logging format).
_LOG_LINE = re.compile(r"^\S+ \S+ (?P<level>[A-Z]+) (?P<message>.*)$")
_IDS = re.compile(r"\b(resp_|conv_|msg_|gw_|Task-)[0-9a-f]+\b")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Timeout)\b.*")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@dataclass
class Proc:
    """One started process, its log file and how to reach it."""

    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def problems(self, limit: int = 10) -> list[tuple[int, str]]:
        """The distinct WARNING/ERROR log messages and exception lines of its log, most frequent first."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        found: Counter[str] = Counter()
        for line in lines:
            line = _IDS.sub(lambda m: m.group(1) + "…", line)  # one entry per kind of message, not per response
            match = _LOG_LINE.match(line)
            if match and match.group("level") in ("WARNING", "ERROR", "CRITICAL"):
                found[f"{match.group('level')} {match.group('message')}"[:200]] += 1
            elif _EXCEPTION_LINE.match(line):
                found[line.strip()[:200]] += 1
        return [(count, text) for text, count in found.most_common(limit)]

    def wait_listening(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.popen.returncode} before listening on {self.port}:\n"
                    + self.log_tail()
                )
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"{self.name}: nothing listening on port {self.port} after {timeout:.0f}s")

    def wait_http_ok(self, path: str, timeout: float) -> None:
        """Poll `GET path` until it answers 200 (LiteLLM listens well before it can serve)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n" + self.log_tail())
            try:
                with urllib.request.urlopen(self.url + path, timeout=5) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name}: {path} did not answer 200 within {timeout:.0f}s")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to its session, then SIGKILL if it lingers."""
        if self.popen.poll() is None:
            _signal_group(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=5)
        # A child that outlived its parent (a LiteLLM worker) still belongs to the session we created.
        _signal_group(self.popen.pid, signal.SIGKILL)


def _die_with_parent() -> None:
    """In the child before exec: be sent SIGTERM if the benchmark dies without stopping us (even by SIGKILL)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _signal_group(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)  # the process leads its own session (start_new_session), so pgid == pid


@dataclass
class ProcessGroup:
    """Everything the benchmark started, stopped in reverse order by `stop_all`."""

    workdir: Path
    procs: list[Proc] = field(default_factory=list)  # still running
    started: list[Proc] = field(default_factory=list)  # everything ever started, for their logs

    def start(self, name: str, argv: list[str], port: int, env: dict[str, str] | None = None) -> Proc:
        log_path = self.workdir / f"{name}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                argv,
                cwd=ROOT,
                env={**os.environ, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        proc = Proc(name=name, popen=popen, port=port, log_path=log_path)
        self.procs.append(proc)
        self.started.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        while self.procs:
            proc = self.procs.pop()
            try:
                proc.stop()
            except Exception as error:  # keep stopping the others
                print(f"bench: could not stop {proc.name} (pid {proc.pid}): {error}", file=sys.stderr)


def start_redis(group: ProcessGroup) -> Proc:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not on PATH (Debian: apt-get install redis-server)")
    port = free_port()
    directory = group.workdir / "redis"
    directory.mkdir(exist_ok=True)
    argv = [binary, "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"]
    argv += ["--dir", str(directory)]
    proc = group.start("redis", argv, port)
    proc.wait_listening()
    return proc


CLUSTER_MASTERS = 3  # each with one replica, as a production cluster would have
CLUSTER_BUS_OFFSET = 10_000


def _cluster_port(taken: set[int]) -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        port = free_port()
        if port in taken or port + CLUSTER_BUS_OFFSET >= 65_536:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((LOOPBACK, port + CLUSTER_BUS_OFFSET))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def start_redis_cluster(group: ProcessGroup) -> str:
    """A Redis Cluster of 3 masters and 3 replicas on loopback (persistence off, as the single node); its
    storage URL for the gateway."""
    binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if binary is None or cli is None:
        raise RuntimeError("redis-server and redis-cli are not on PATH (Debian: apt-get install redis-server)")
    nodes: list[Proc] = []
    taken: set[int] = set()
    for index in range(CLUSTER_MASTERS * 2):
        port = _cluster_port(taken)
        taken |= {port, port + CLUSTER_BUS_OFFSET}
        directory = group.workdir / f"redis-cluster-{index}"
        directory.mkdir(exist_ok=True)
        argv = [binary, "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"]
        argv += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--dir", str(directory)]
        nodes.append(group.start(f"redis-cluster-{index}", argv, port))
    for node in nodes:
        node.wait_listening()
    addresses = [f"{LOOPBACK}:{node.port}" for node in nodes]
    subprocess.run(
        [cli, "--cluster", "create", *addresses, "--cluster-replicas", "1", "--cluster-yes"],
        capture_output=True,
        timeout=60,
        check=True,
    )

    def ask(node: Proc, *command: str) -> str:
        return subprocess.run([cli, "-p", str(node.port), *command], capture_output=True, text=True).stdout

    # Ready once every slot is served and every replica's link is up (a replica still syncing would make the
    # first WAITs of (f) time out).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ok = all("cluster_state:ok" in ask(node, "CLUSTER", "INFO") for node in nodes)
        linked = sum("master_link_status:up" in ask(node, "INFO", "replication") for node in nodes)
        if ok and linked == CLUSTER_MASTERS:
            return "redis+cluster://" + ",".join(addresses)
        time.sleep(0.1)
    raise RuntimeError("the Redis Cluster did not become ok, its replicas attached, within 30 s")


def start_simulator(group: ProcessGroup, *, tokens: int, token_delay_ms: float, ttft_ms: float) -> Proc:
    port = free_port()
    argv = [sys.executable, "-m", "gateway", "simulate", "--port", str(port), "--tokens", str(tokens)]
    argv += ["--token-delay-ms", str(token_delay_ms), "--ttft-ms", str(ttft_ms)]
    proc = group.start("simulator", argv, port)
    proc.wait_listening()
    return proc


def start_gateway(
    group: ProcessGroup,
    *,
    name: str,
    storage_url: str,
    simulator_url: str,
    key_prefix: str = "rgw",
    extra_env: dict[str, str] | None = None,
) -> Proc:
    """A gateway with one `kind: responses` upstream at the simulator; `storage_url` is a redis:// URL or
    `memory://` (the embedded in-process store); `extra_env` more GATEWAY_* settings."""
    port = free_port()
    upstreams = [{"name": "sim", "kind": "responses", "base_url": f"{simulator_url}/v1", "max_retries": 0}]
    env = {
        "GATEWAY_STORAGE__URL": storage_url,
        "GATEWAY_STORAGE__KEY_PREFIX": key_prefix,
        "GATEWAY_STORAGE__RETENTION_SECONDS": "3600",
        "GATEWAY_UPSTREAMS": json.dumps(upstreams),
        "GATEWAY_RUNS__MAX_CONCURRENT": "2000",
        "GATEWAY_SERVER__MAX_BODY_BYTES": str(4 * 1024 * 1024),
        # Runs still in flight when the benchmark stops are not worth waiting for.
        "GATEWAY_SHUTDOWN__GRACE_SECONDS": "1",
        **(extra_env or {}),
    }
    if os.environ.get("BENCH_EVENT_LOOP"):  # else the gateway's default (uvloop)
        env["GATEWAY_SERVER__EVENT_LOOP"] = os.environ["BENCH_EVENT_LOOP"]
    argv = [sys.executable, "-m", "gateway", "serve", "--port", str(port)]
    proc = group.start(name, argv, port, env)
    proc.wait_listening()
    return proc


def start_bare_proxy(group: ProcessGroup, *, simulator_url: str) -> Proc:
    """The floor: `bench/bare_proxy.py`, a minimal renumbering proxy at the simulator."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.bare_proxy", "--port", str(port), "--upstream", f"{simulator_url}/v1"]
    proc = group.start("bare", argv, port)
    proc.wait_listening()
    return proc


def litellm_binary() -> Path | None:
    """The `litellm` proxy of the bench's own venv (made by `make bench-setup`), never the project's."""
    binary = LITELLM_VENV / "bin" / "litellm"
    return binary if binary.exists() else None


def litellm_version() -> str | None:
    found = sorted(LITELLM_VENV.glob("lib/python*/site-packages/litellm-*.dist-info"))
    return found[-1].name.removeprefix("litellm-").removesuffix(".dist-info") if found else None


def py_spy_binary() -> Path | None:
    """py-spy from the bench venv (where `make bench-setup` puts it), else from PATH."""
    binary = LITELLM_VENV / "bin" / "py-spy"
    if binary.exists():
        return binary
    found = shutil.which("py-spy")
    return Path(found) if found else None


def litellm_config(simulator_url: str, redis_port: int) -> str:
    """LiteLLM proxy config: `sim-1` → the simulator as an OpenAI provider (the `openai/` prefix sends
    `/v1/responses` natively to `{api_base}/responses`), its router state in the same Redis, and `x-sim-*`
    client headers forwarded so the per-request simulator knobs reach the simulator even if `metadata` does not.
    The master key comes from the environment (LITELLM_MASTER_KEY); no database is configured, which LiteLLM
    accepts when the master key is the only key."""
    return "\n".join(
        [
            "model_list:",
            "  - model_name: sim-1",
            "    litellm_params:",
            "      model: openai/sim-1",
            f"      api_base: {simulator_url}/v1",
            "      api_key: dummy",
            "litellm_settings:",
            "  drop_params: true",
            "  num_retries: 0",
            "  request_timeout: 600",
            "general_settings:",
            "  master_key: os.environ/LITELLM_MASTER_KEY",
            "  forward_client_headers_to_llm_api: true",
            "router_settings:",
            f"  redis_host: {LOOPBACK}",
            f"  redis_port: {redis_port}",
            "",
        ]
    )


def start_litellm(group: ProcessGroup, *, simulator_url: str, redis_port: int, master_key: str) -> Proc:
    binary = litellm_binary()
    if binary is None:
        raise RuntimeError(f"no {LITELLM_VENV}/bin/litellm (make bench-setup creates it)")
    port = free_port()
    config = group.workdir / "litellm.yaml"
    config.write_text(litellm_config(simulator_url, redis_port))
    argv = [str(binary), "--host", LOOPBACK, "--port", str(port), "--config", str(config)]
    env = {"LITELLM_LOG": "ERROR", "LITELLM_MASTER_KEY": master_key}
    proc = group.start("litellm", argv, port, env)
    proc.wait_listening(timeout=180)
    proc.wait_http_ok("/health/readiness", timeout=120)
    return proc


class RedisProbe:
    """Counters of the benchmark's Redis, read over one connection kept open (so each reading adds exactly one
    command, its own INFO, which `commands_between` takes off)."""

    def __init__(self, port: int) -> None:
        self._client = redis.Redis(host=LOOPBACK, port=port)
        self.read()  # connect now: the client's handshake commands are not counted in any window

    def read(self) -> tuple[int, int]:
        """(commands executed, bytes received from clients) so far. `calls=` of INFO commandstats counts the
        commands run inside Lua scripts as well as EVALSHA itself."""
        info = self._client.info("commandstats", "stats")
        calls = sum(int(value["calls"]) for key, value in info.items() if key.startswith("cmdstat_"))
        return calls, int(info["total_net_input_bytes"])

    @staticmethod
    def commands_between(before: tuple[int, int], after: tuple[int, int]) -> tuple[int, int]:
        return after[0] - before[0] - 1, after[1] - before[1]

    def close(self) -> None:
        self._client.close()


# --- /proc -------------------------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # fields from the 3rd (state) on; comm may hold spaces


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if int(_stat_fields(int(entry))[1]) == pid:  # field 4: ppid
                found.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return found


def cpu_seconds(pid: int, *, with_children: bool = False) -> float:
    """utime + stime of the process (fields 14 and 15 of /proc/<pid>/stat), optionally plus its live
    descendants' (LiteLLM may run workers)."""
    try:
        fields = _stat_fields(pid)
    except OSError:
        return 0.0
    total = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    if with_children:
        total += sum(cpu_seconds(child, with_children=True) for child in _children(pid))
    return total


def machine_busy_seconds() -> float:
    """CPU seconds all processors have spent busy since boot (the `cpu` line of /proc/stat minus idle and
    iowait), to tell how much CPU processes outside the benchmark took."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(value) for value in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / CLOCK_TICKS


def loadavg_1m() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def rss_kib(pid: int) -> int:
    """VmRSS of the process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def self_cpu_seconds() -> float:
    return cpu_seconds(os.getpid())
