"""Shared fixtures: a real redis-server, the simulated model as a real process, gateways in-process and as processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

# Imported up front: otherwise the hypothesis plugin imports it at the session's end, and under CPython 3.11.7
# that import's AST parse failed ("AST constructor recursion depth mismatch") after test_cluster_failover.py
# had run on its own, failing a session whose tests had all passed.
import hypothesis  # noqa: F401
import openai
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.sdk.trace import TracerProvider
from redis.asyncio.cluster import RedisCluster as RedisClusterClient

from gateway.app import create_app
from gateway.config import Settings, load_settings
from gateway.state import FAULTS
from runs.faults import FaultPoints
from storage.redis_cluster import ClusterAddress, open_cluster_client
from tests.redis_cluster import RedisCluster
from tests.tcp_proxy import TcpProxy
from tests.websocket_support import settings_for
from tests.wire_check import WireCheck, recording

ROOT = Path(__file__).resolve().parent.parent
SIM_TOKEN_DELAY_MS = 5
SIM_TTFT_MS = 5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes] | None = None, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def wire_check() -> WireCheck:
    """What every in-process gateway of the session wrote, and the event types seen (one per session)."""
    return WireCheck()


@pytest.fixture(autouse=True)
def strict_wire(wire_check: WireCheck) -> Iterator[None]:
    """Every body and event an in-process gateway writes during a test must satisfy the SDK's models made strict
    (tests/strict_models.py): a test passes only if a strict client would have accepted all it was sent."""
    with recording(wire_check):
        yield
    problems = wire_check.problems()
    if problems:
        shown = "\n".join(problems[:10])
        pytest.fail(f"{len(problems)} bodies or events a strict client would refuse:\n{shown}", pytrace=False)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free port for the whole session; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not on PATH: `make test` installs it (apt-get install redis-server)")
    port = free_port()
    directory = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, process)
    yield f"redis://127.0.0.1:{port}/0"
    stop_process(process)


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis Cluster (3 masters, 3 replicas) on free loopback ports for the whole session; its URL
    (`redis+cluster://…`, every node a seed)."""
    cluster = RedisCluster.start(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield cluster.url
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def simulator_url() -> Iterator[str]:
    """The simulated model as a real process (`responses-gateway simulate`), shared by the session; its base URL."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "simulate",
            "--port",
            str(port),
            "--token-delay-ms",
            str(SIM_TOKEN_DELAY_MS),
            "--ttft-ms",
            str(SIM_TTFT_MS),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, process)
    yield f"http://127.0.0.1:{port}"
    stop_process(process)


@contextlib.contextmanager
def simulator_process(*flags: str) -> Iterator[str]:
    """A simulator process of its own, started with `flags` (a dialect, `--no-compact`, …); its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "gateway", "simulate", "--port", str(port), "--ttft-ms", "1", *flags]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(process)


@pytest.fixture(scope="session")
def simulator_without_compact() -> Iterator[str]:
    """A Responses provider with neither `/responses/compact` nor `/responses/input_tokens` (`--no-compact`)."""
    with simulator_process("--no-compact") as url:
        yield url


@pytest.fixture
async def redis_proxy(redis_server: str) -> AsyncIterator[TcpProxy]:
    """A TCP proxy in front of the session's redis-server."""
    target = urlsplit(redis_server)
    assert target.hostname is not None
    assert target.port is not None
    async with TcpProxy(target.hostname, target.port) as proxy:
        yield proxy


@pytest.fixture
async def shared_redis_client(shared_redis_url: str) -> AsyncIterator[aioredis.Redis | RedisClusterClient]:
    """A client of what `shared_redis_url` names, for tests that look at keys."""
    client: aioredis.Redis | RedisClusterClient
    if shared_redis_url.startswith("redis+cluster://"):
        client = open_cluster_client(ClusterAddress.parse(shared_redis_url), max_connections=16)
    else:
        client = aioredis.Redis.from_url(shared_redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def key_prefix() -> str:
    """A key prefix of this test's own, so tests sharing the Redis never see each other's keys."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def redis_client(redis_server: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server)
    yield client
    await client.aclose()


def gateway_settings(*, storage_url: str, simulator_url: str, key_prefix: str = "rgw", **extra: Any) -> Settings:
    return load_settings(
        storage={"url": storage_url, "key_prefix": key_prefix, "retention_seconds": extra.pop("retention", 600)},
        upstreams=[{"name": "sim", "kind": "responses", "base_url": f"{simulator_url}/v1", "max_retries": 0}],
        **extra,
    )


@dataclass
class Gateway:
    """A gateway under test and an SDK client pointed at it."""

    url: str
    client: openai.AsyncOpenAI
    http: aiohttp.ClientSession
    app: web.Application | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(params=["redis", "cluster", "memory"])
def storage_url(request: pytest.FixtureRequest) -> str:
    """Each end-to-end test runs against every backend: one Redis, a Redis Cluster, the embedded store."""
    if request.param == "memory":
        return "memory://"
    url: str = request.getfixturevalue("redis_cluster_url" if request.param == "cluster" else "redis_server")
    return url


@pytest.fixture(params=["redis", "cluster"])
def shared_redis_url(request: pytest.FixtureRequest) -> str:
    """What several gateway processes share: one Redis, or a Redis Cluster (the same tests run on both)."""
    url: str = request.getfixturevalue("redis_cluster_url" if request.param == "cluster" else "redis_server")
    return url


@contextlib.asynccontextmanager
async def serve_gateway(
    settings: Settings, faults: FaultPoints | None = None, tracer_provider: TracerProvider | None = None
) -> AsyncIterator[Gateway]:
    """An in-process gateway (a real aiohttp server on loopback) and clients for it; `faults` act at the run
    lifecycle's boundaries; `tracer_provider` takes its spans when its settings enable tracing."""
    app = create_app(settings, tracer_provider=tracer_provider)
    if faults is not None:
        app[FAULTS] = faults
    server = TestServer(app, host="127.0.0.1", handler_cancellation=True)
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="test-key", max_retries=0)
    http = aiohttp.ClientSession(base_url=url, timeout=aiohttp.ClientTimeout(total=30))
    try:
        yield Gateway(url=url, client=client, http=http, app=app)
    finally:
        await client.close()
        await http.close()
        await server.close()


@pytest.fixture
async def gateway(storage_url: str, simulator_url: str, key_prefix: str) -> AsyncIterator[Gateway]:
    """A gateway in front of the simulator process, once per backend."""
    settings = gateway_settings(storage_url=storage_url, simulator_url=simulator_url, key_prefix=key_prefix)
    async with serve_gateway(settings) as served:
        yield served


@pytest.fixture
async def redis_gateway(shared_redis_url: str, simulator_url: str, key_prefix: str) -> AsyncIterator[Gateway]:
    """A gateway on the Redis backend only (one node, and a cluster), for tests that look at the keys."""
    settings = gateway_settings(storage_url=shared_redis_url, simulator_url=simulator_url, key_prefix=key_prefix)
    async with serve_gateway(settings) as served:
        yield served


@pytest.fixture
async def single_node_gateway(redis_server: str, simulator_url: str, key_prefix: str) -> AsyncIterator[Gateway]:
    """A gateway on one Redis node, for tests that count what that node received."""
    settings = gateway_settings(storage_url=redis_server, simulator_url=simulator_url, key_prefix=key_prefix)
    async with serve_gateway(settings) as served:
        yield served


@dataclass
class GatewayProcess:
    """A gateway running as its own OS process."""

    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def redis_gateway_env(redis_url: str, simulator_url: str, key_prefix: str, **extra: str) -> dict[str, str]:
    """Environment for a gateway process on the shared Redis, in front of the simulator."""
    return {
        "GATEWAY_STORAGE__URL": redis_url,
        "GATEWAY_STORAGE__KEY_PREFIX": key_prefix,
        "GATEWAY_UPSTREAMS": orjson.dumps([{"name": "sim", "base_url": f"{simulator_url}/v1"}]).decode(),
        **extra,
    }


@pytest.fixture
def start_gateway_process(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """Start real `python -m gateway serve` processes configured through environment variables."""
    started: list[GatewayProcess] = []

    def start(env: dict[str, str] | None = None, args: list[str] | None = None) -> GatewayProcess:
        port = free_port()
        log_path = tmp_path / f"gateway-{port}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        full_env.update(env or {})
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--port", str(port), *(args or [])],
                cwd=ROOT,
                env=full_env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        started.append(GatewayProcess(port, process, log_path))
        wait_for_port(port, process)
        return started[-1]

    yield start
    for gateway_process in started:
        stop_process(gateway_process.process)


@pytest.fixture
def two_gateways(
    start_gateway_process: Callable[..., GatewayProcess], shared_redis_url: str, simulator_url: str, key_prefix: str
) -> tuple[GatewayProcess, GatewayProcess]:
    """Two gateway processes sharing one Redis, or one Redis Cluster."""
    env = redis_gateway_env(shared_redis_url, simulator_url, key_prefix)
    return start_gateway_process(env), start_gateway_process(env)


async def eventually(check: Callable[[], Any], *, within: float = 10.0, interval: float = 0.05) -> Any:
    """Poll an async check until it returns a truthy value."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s (last: {result!r})")
        await asyncio.sleep(interval)


# -- WebSocket mode and steering (tests/websocket_support.py) ------------------------------------------------


@pytest.fixture(params=["responses", "chat"])
def upstream_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
async def two_instances(
    redis_server: str, simulator_url: str, key_prefix: str, upstream_kind: str
) -> AsyncIterator[tuple[Gateway, Gateway]]:
    """Two gateway instances sharing one Redis, in front of the simulator (through either upstream kind)."""
    settings = settings_for(redis_server, simulator_url, key_prefix, upstream_kind)
    async with serve_gateway(settings) as first, serve_gateway(settings) as second:
        first.extra["tag"] = second.extra["tag"] = key_prefix
        yield first, second


@pytest.fixture
async def one_instance(redis_server: str, simulator_url: str, key_prefix: str) -> AsyncIterator[Gateway]:
    async with serve_gateway(settings_for(redis_server, simulator_url, key_prefix)) as served:
        served.extra["tag"] = key_prefix
        yield served
