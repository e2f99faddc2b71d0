"""The container files, as far as they can be checked without a registry to build from: the Dockerfile's paths,
command and healthcheck, and compose.yaml's services and the config file they share."""

from __future__ import annotations

import fnmatch
import json
import shlex
import subprocess
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.cli import _parser
from gateway.config import load_settings
from tests.conftest import ROOT, GatewayProcess, free_port

CONTAINER_PORT = 8080


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions, (INSTRUCTION, arguments), continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip().removesuffix("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            keyword, _, arguments = pending.strip().partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
            pending = ""
    return instructions


def instruction(name: str) -> list[str]:
    return [arguments for keyword, arguments in dockerfile() if keyword == name]


def exec_form(arguments: str) -> list[str]:
    parsed = json.loads(arguments)
    assert isinstance(parsed, list), f"not the exec form (a JSON array): {arguments}"
    return [str(part) for part in parsed]


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return loaded


def gateway_services() -> dict[str, dict[str, Any]]:
    return {name: service for name, service in compose()["services"].items() if name.startswith("gateway")}


def the_command() -> list[str]:
    (entrypoint,) = instruction("ENTRYPOINT")
    (command,) = instruction("CMD")
    return exec_form(entrypoint) + exec_form(command)


def test_the_image_is_slim_python_run_by_a_user_who_is_not_root() -> None:
    assert instruction("FROM") == ["python:3.11-slim"]
    (user,) = instruction("USER")
    assert user not in ("root", "0")
    assert instruction("EXPOSE") == [str(CONTAINER_PORT)]


def test_every_path_the_dockerfile_copies_exists_and_is_in_the_build_context() -> None:
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copies = instruction("COPY")
    assert copies
    for arguments in copies:
        *sources, _destination = shlex.split(arguments)
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such path"
            assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), f"{source} is .dockerignored"
    assert {".git", ".venv"} <= set(ignored)


def test_the_command_is_one_the_cli_accepts_and_its_config_is_the_one_copied_in() -> None:
    executable, *arguments = the_command()
    assert executable == "responses-gateway"
    parsed = _parser().parse_args(arguments)  # exits (SystemExit) on anything it does not accept
    assert parsed.command == "serve"
    copied = {shlex.split(arguments)[-1]: shlex.split(arguments)[0] for arguments in instruction("COPY")}
    baked = load_settings(str(ROOT / copied[parsed.config]))
    assert (baked.server.host, baked.server.port) == ("0.0.0.0", CONTAINER_PORT)
    assert baked.storage.url == "memory://"


def test_compose_runs_two_gateways_on_its_redis_sharing_one_read_only_config() -> None:
    services = gateway_services()
    assert len(services) == 2
    assert "redis" in compose()["services"]
    command = the_command()
    config_path = command[command.index("--config") + 1]
    mounts = set()
    for service in services.values():
        (mount,) = service["volumes"]
        source, target, mode = mount.split(":")
        assert (target, mode) == (config_path, "ro")
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        mounts.add(source)
    (source,) = mounts
    settings = load_settings(str(ROOT / source))
    redis = urlsplit(settings.storage.url)
    assert (redis.scheme, redis.hostname, redis.port) == ("redis", "redis", 6379)
    assert (settings.server.host, settings.server.port) == ("0.0.0.0", CONTAINER_PORT)
    published = sorted(service["ports"][0] for service in services.values())
    assert all(port.endswith(f":{CONTAINER_PORT}") for port in published)
    assert len({port.rsplit(":", 1)[0] for port in published}) == 2  # each instance on a host port of its own


def test_compose_gives_runs_their_grace_period_before_killing_a_gateway() -> None:
    for service in gateway_services().values():
        settings = load_settings(str(ROOT / service["volumes"][0].split(":")[0]))
        stop_grace = int(service["stop_grace_period"].removesuffix("s"))
        assert stop_grace > settings.shutdown.grace_seconds


def healthcheck_snippet(port: int) -> str:
    (arguments,) = instruction("HEALTHCHECK")
    command = exec_form(arguments.partition("CMD ")[2])
    assert command[:2] == ["python", "-c"]
    snippet = command[2]
    compile(snippet, "<HEALTHCHECK>", "exec")
    assert f"127.0.0.1:{CONTAINER_PORT}/healthz" in snippet
    return snippet.replace(f":{CONTAINER_PORT}/", f":{port}/")


def run_snippet(snippet: str) -> int:
    return subprocess.run([sys.executable, "-c", snippet], capture_output=True, timeout=10, check=False).returncode


@pytest.mark.parametrize("serving", [True, False], ids=["serving", "not-serving"])
def test_the_healthcheck_passes_only_when_the_gateway_serves(
    start_gateway_process: Callable[..., GatewayProcess], serving: bool
) -> None:
    port = start_gateway_process().port if serving else free_port()
    assert (run_snippet(healthcheck_snippet(port)) == 0) is serving
