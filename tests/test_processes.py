"""Real gateway processes: two instances on one Redis, the zero-config `serve`, start-up failures, log formats."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

from openai.types.responses import Response

from tests.conftest import ROOT, GatewayProcess, eventually, redis_gateway_env, stop_process
from tests.helpers import expected_text, sdk_for


async def test_background_response_created_on_one_instance_is_retrievable_on_another(
    start_gateway_process: Callable[..., GatewayProcess], shared_redis_url: str, simulator_url: str, key_prefix: str
) -> None:
    env = redis_gateway_env(shared_redis_url, simulator_url, key_prefix)
    first, second = start_gateway_process(env), start_gateway_process(env)
    client_a, client_b = sdk_for(first.url), sdk_for(second.url)
    try:
        created = await client_a.responses.create(
            model="sim-1", input="cross instance", background=True, metadata={"sim_token_delay_ms": "60"}
        )

        async def in_progress_with_output() -> Response | None:
            seen = await client_b.responses.retrieve(created.id)
            return seen if seen.status == "in_progress" and seen.output else None

        midway = await eventually(in_progress_with_output)
        assert midway.id == created.id
        assert expected_text("cross instance").startswith(midway.output_text)

        async def completed() -> Response | None:
            seen = await client_b.responses.retrieve(created.id)
            return seen if seen.status == "completed" else None

        done = await eventually(completed)
        assert done.output_text == expected_text("cross instance")
        assert (await client_a.responses.retrieve(created.id)).model_dump() == done.model_dump()
    finally:
        await client_a.close()
        await client_b.close()


async def test_zero_config_serve_uses_the_embedded_store_and_the_built_in_model(
    start_gateway_process: Callable[..., GatewayProcess],
) -> None:
    gateway = start_gateway_process()
    client = sdk_for(gateway.url)
    try:
        response = await client.responses.create(model="any-model", input="hello")
        assert response.status == "completed"
        assert response.output_text
        async with client.responses.stream(model="any-model", input="hello") as stream:
            final = await stream.get_final_response()
        assert final.output_text == response.output_text  # the simulated text depends on the input only
    finally:
        await client.close()
    await asyncio.sleep(0.1)
    log = gateway.log()
    assert "embedded in-process store" in log
    assert "built-in simulated model" in log


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_bad_config_exits_non_zero_with_one_line_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("server:\n  port: 99999\n")
    result = run_cli("serve", "--config", str(config))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "server.port" in lines[0]


def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    result = run_cli("serve", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "does not exist" in result.stderr


def assert_one_line_exit_2(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    """The start-up failure a newcomer trusts: exit 2 and one line saying why, on stderr, with no traceback."""
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("responses-gateway: ")
    for words in expected:
        assert words in line


def test_a_port_in_use_is_one_line() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_cli("serve", "--port", str(port))
    assert_one_line_exit_2(result, f"cannot listen on 127.0.0.1:{port}", "Address already in use")


def test_an_unset_api_key_variable_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "auth.yaml"
    config.write_text("auth:\n  enabled: true\n  keys:\n    - {tenant: acme, key_env: RGW_TEST_UNSET_KEY}\n")
    result = run_cli("serve", "--config", str(config))
    assert_one_line_exit_2(result, "config error: auth.keys", "RGW_TEST_UNSET_KEY")


def test_a_storage_url_with_a_bad_port_is_one_line() -> None:
    result = run_cli("serve", env={**os.environ, "GATEWAY_STORAGE__URL": "redis://127.0.0.1:63a9/0"})
    assert_one_line_exit_2(result, "config error: storage.url", "63a9")


def test_log_flags_are_checked_like_the_config() -> None:
    assert_one_line_exit_2(run_cli("serve", "--log-format", "xml"), "logging.format")
    assert_one_line_exit_2(run_cli("serve", "--log-level", "loud"), "logging.level")


def test_json_log_format_writes_only_json_lines(start_gateway_process: Callable[..., GatewayProcess]) -> None:
    gateway = start_gateway_process(args=["--log-format", "json"])
    with urllib.request.urlopen(f"{gateway.url}/v1/models") as reply:
        request_id = reply.headers["x-request-id"]
    stop_process(gateway.process)
    entries = [json.loads(line) for line in gateway.log().splitlines()]
    assert {"timestamp", "level", "logger", "message"} <= entries[0].keys()
    (access,) = [entry for entry in entries if entry["logger"] == "gateway.access"]
    assert access["request_id"] == request_id
    assert (access["method"], access["path"], access["status"]) == ("GET", "/v1/models", 200)
