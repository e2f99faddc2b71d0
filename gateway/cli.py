"""The `responses-gateway` command: `serve` the gateway, or `simulate` a model server for development."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import gc
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

from aiohttp import web

from gateway.app import create_app, drain
from gateway.config import ConfigError, Settings, load_settings
from gateway.logs import configure_logging
from gateway.protocol import GatewayRunner
from gateway.state import SETTINGS
from simulator import SimulatorSettings, run_simulator

log = logging.getLogger("gateway")

# After the first signal the process exits within grace + this, whatever is stuck: handing runs over, ending
# streams and closing connections take well under it. It once stopped listening and never exited.
SHUTDOWN_MARGIN_SECONDS = 5.0
# Connections still open once the drain is done (it ended or handed over their runs) get this long, not
# aiohttp's default minute, so the rest of the margin is left for closing the store and the upstreams.
OPEN_CONNECTIONS_SECONDS = 2.0
# The exit code when that deadline (or a third signal) cuts the shutdown short; a clean shutdown exits 0.
FORCED_EXIT_CODE = 70  # EX_SOFTWARE
# The collector's youngest generation is collected after this many more container objects made than freed
# (CPython's default, 700, suits small scripts). A request or an event makes hundreds, so the default collected
# several times per burst of requests, at ~0.2 ms each, and promoted every run's objects to older generations,
# whose collections cost ~1.5 ms; 20,000 cut the added TTFT p99 at 20 streams by ~1.5-2.5 ms (bench (a'),
# interleaved A/B). Garbage without cycles is freed at once either way; only cycles wait for a collection.
GC_YOUNG_THRESHOLD = 20_000
# The exit code when the gateway cannot start (bad config, port in use, …), with one line on stderr saying why.
STARTUP_FAILED_EXIT_CODE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="responses-gateway", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="YAML config file (default: $GATEWAY_CONFIG)")
    serve.add_argument("--host", help="address to bind (overrides server.host)")
    serve.add_argument("--port", type=int, help="port to bind (overrides server.port)")
    serve.add_argument("--log-level", type=str.upper, help="DEBUG, INFO, WARNING, ERROR (overrides logging.level)")
    serve.add_argument("--log-format", help="text or json: JSON lines for log collectors (overrides logging.format)")
    simulate = commands.add_parser("simulate", help="run the simulated OpenAI-compatible model server")
    simulate.add_argument("--host", default="127.0.0.1")
    simulate.add_argument("--port", type=int, required=True)
    defaults = SimulatorSettings()
    simulate.add_argument("--tokens", type=int, default=defaults.tokens, help="output tokens per response")
    simulate.add_argument("--token-delay-ms", type=float, default=defaults.token_delay_ms)
    simulate.add_argument("--ttft-ms", type=float, default=defaults.ttft_ms)
    simulate.add_argument(
        "--no-compact",
        dest="compact",
        action="store_false",
        help="answer /v1/responses/compact and /v1/responses/input_tokens with 404, like a provider without them",
    )
    simulate.add_argument(
        "--chat-dialect",
        choices=["openai", "llama-cpp-python", "vllm"],
        default=defaults.chat_dialect,
        help="imitate that server's Chat endpoint (structured output, usage); see simulator/plan.py",
    )
    simulate.add_argument(
        "--extra-models", default="", help="comma-separated models /v1/models lists besides the simulator's own"
    )
    return parser


class StartupError(Exception):
    """Why the gateway cannot start, worded as one line."""


def _flag_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The flags that override settings, as nested keys: the same validation (and one-line errors) as the file."""
    flags = {
        "server": {"host": args.host, "port": args.port},
        "logging": {"level": args.log_level, "format": args.log_format},
    }
    overrides = {section: {k: v for k, v in keys.items() if v is not None} for section, keys in flags.items()}
    return {section: keys for section, keys in overrides.items() if keys}


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config, **_flag_overrides(args))
        configure_logging(settings.logging.level, settings.logging.format)
        with asyncio.Runner(loop_factory=_loop_factory(settings.server.event_loop)) as runner:
            runner.run(_run_server(settings))
    except ConfigError as error:  # raised by load_settings, or by create_app (an API key's variable unset)
        return _cannot_start(f"config error: {error}")
    except StartupError as error:
        return _cannot_start(str(error))
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were installed: nothing was serving yet
        return 130
    return 0


def _cannot_start(reason: str) -> int:
    print(f"responses-gateway: {reason}", file=sys.stderr)
    return STARTUP_FAILED_EXIT_CODE


def _loop_factory(event_loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """`server.event_loop`: uvloop's loop (the default), or the standard one."""
    if event_loop != "uvloop":
        return None
    import uvloop

    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def _run_server(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully: keep listening (so /readyz can say 503) while
    the running responses finish or are handed over, and only then stop. A second signal skips the rest of the
    grace period (runs are handed over, or ended, at once); a third, or grace + SHUTDOWN_MARGIN_SECONDS after the
    first, exits at once with FORCED_EXIT_CODE."""
    grace = settings.shutdown.grace_seconds
    # Bound before anything is made: a port in use is one line, with no store or upstream to close again.
    sockets = _bind(settings.server.host, settings.server.port)
    try:
        app = create_app(settings)
        runner = await _set_up(app)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    stop, hurry = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        if not stop.is_set():
            stop.set()
            _exit_if_still_running_after(grace + SHUTDOWN_MARGIN_SECONDS)
        elif not hurry.is_set():
            log.info("second signal: ending the grace period now")
            hurry.set()
        else:
            _exit_now("third signal")

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    try:
        for sock in sockets:
            await web.SockSite(runner, sock).start()
        # Everything made so far (modules, schemas, the app) lives as long as the process: out of the collector's
        # sight, a full collection no longer scans it (it cost ~30 ms, a pause every stream in flight felt).
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        log.info("responses-gateway listening on http://%s:%d", settings.server.host, sockets[0].getsockname()[1])
        await stop.wait()
        log.info("shutting down: draining (grace %.0fs; signal again to skip it)", grace)
        await drain(app, hurry)
    finally:
        await runner.cleanup()
    log.info("stopped")


async def _set_up(app: web.Application) -> web.AppRunner:
    """The app started (store, upstreams, run manager opened); a failure is one line (its traceback at DEBUG)."""
    settings = app[SETTINGS]
    runner = GatewayRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=OPEN_CONNECTIONS_SECONDS,
        keepalive_timeout=settings.server.idle_timeout_seconds,
        max_connections_per_peer=settings.server.max_connections_per_ip,
    )
    try:
        await runner.setup()
    except Exception as error:
        log.debug("start-up failed", exc_info=True)
        await runner.cleanup()
        raise StartupError(f"start-up failed: {type(error).__name__}: {error}") from None
    return runner


def _bind(host: str, port: int) -> list[socket.socket]:
    """A socket bound to each address `host` resolves to (as asyncio's create_server would bind them); the server
    listens on them once the app has started, so a connection that gets through is served."""
    sockets: list[socket.socket] = []
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, _, _, _, address in dict.fromkeys(addresses):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as error:
        for sock in sockets:
            sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sockets


def _exit_if_still_running_after(seconds: float) -> None:
    # A thread, not a loop timer: it fires even if the loop is blocked, or after asyncio.run has returned and the
    # interpreter waits on a thread at exit.
    timer = threading.Timer(seconds, _exit_now, args=(f"still shutting down {seconds:.0f}s after the signal",))
    timer.daemon = True
    timer.start()


def _exit_now(reason: str) -> None:
    log.error("%s: exiting now, with code %d; the stacks follow", reason, FORCED_EXIT_CODE)
    faulthandler.dump_traceback(all_threads=True)  # what it was stuck on, for the next fix
    logging.shutdown()
    os._exit(FORCED_EXIT_CODE)


def _simulate(args: argparse.Namespace) -> int:
    configure_logging("INFO")
    settings = SimulatorSettings(
        tokens=args.tokens,
        token_delay_ms=args.token_delay_ms,
        ttft_ms=args.ttft_ms,
        compact=args.compact,
        chat_dialect=args.chat_dialect,
        extra_models=tuple(name.strip() for name in args.extra_models.split(",") if name.strip()),
    )
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
