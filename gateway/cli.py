"""The `responses-gateway` command: `serve` the gateway, or `simulate` a model server for development."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from typing import Any

from aiohttp import web

from gateway.app import create_app, drain
from gateway.config import ConfigError, Settings, load_settings
from simulator import SimulatorSettings, run_simulator

log = logging.getLogger("gateway")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="responses-gateway", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="YAML config file (default: $GATEWAY_CONFIG)")
    serve.add_argument("--host", help="address to bind (overrides server.host)")
    serve.add_argument("--port", type=int, help="port to bind (overrides server.port)")
    serve.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    simulate = commands.add_parser("simulate", help="run the simulated OpenAI-compatible model server")
    simulate.add_argument("--host", default="127.0.0.1")
    simulate.add_argument("--port", type=int, required=True)
    defaults = SimulatorSettings()
    simulate.add_argument("--tokens", type=int, default=defaults.tokens, help="output tokens per response")
    simulate.add_argument("--token-delay-ms", type=float, default=defaults.token_delay_ms)
    simulate.add_argument("--ttft-ms", type=float, default=defaults.ttft_ms)
    return parser


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The HTTP client under the openai SDK logs every upstream request at INFO: one line per model call.
    for noisy in ("httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def _serve(args: argparse.Namespace) -> int:
    server: dict[str, Any] = {}
    if args.host is not None:
        server["host"] = args.host
    if args.port is not None:
        server["port"] = args.port
    try:
        settings = load_settings(args.config, **({"server": server} if server else {}))
    except ConfigError as error:
        print(f"responses-gateway: config error: {error}", file=sys.stderr)
        return 2
    _configure_logging(args.log_level)
    asyncio.run(_run_server(settings))
    return 0


async def _run_server(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully: keep listening (so /readyz can say 503) while
    the running responses finish or are handed over, and only then stop."""
    app = create_app(settings)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.server.host, settings.server.port)
    await site.start()
    log.info("responses-gateway listening on http://%s:%d", settings.server.host, settings.server.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
        log.info("shutting down: draining (grace %.0fs)", settings.shutdown.grace_seconds)
        await drain(app)
    finally:
        await runner.cleanup()
    log.info("stopped")


def _simulate(args: argparse.Namespace) -> int:
    _configure_logging("INFO")
    settings = SimulatorSettings(tokens=args.tokens, token_delay_ms=args.token_delay_ms, ttft_ms=args.ttft_ms)
    log.info("simulated model server on http://%s:%d/v1", args.host, args.port)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_simulator(args.host, args.port, settings))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script and of `python -m gateway`."""
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    return _simulate(args)
