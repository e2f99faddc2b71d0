"""Bounded chaos with a history check: three gateways on one AOF Redis, a mixed workload, seeded random faults
(SIGKILL, SIGSTOP past the lease, SIGTERM, Redis SIGKILL), then every response is checked against what clients saw.

After the faults stop and the fleet settles (lease + sweep + the longest run + margin): (a) no stored response is
left queued or in progress; (b) every event a client saw is the stored event with its sequence number, byte for
byte, and each stored log is 0..n with exactly one terminal event, last; (c) no unkeyed synchronous request ran
upstream twice; (d) one response per Idempotency-Key; (e) every SIGTERM ended its gateway.

`CHAOS_SECONDS` (default 45) is the length of workload plus settling; `make test-chaos` runs 150. `CHAOS_SEED`
replays a fault schedule (the timing of the workload around it still varies); `CHAOS_FAULTS=0` runs the workload
without faults. Gateway logs and every request's notes (`requests.jsonl`) stay in the test's tmp_path."""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.chaos_clients import LONGEST_RUN_SECONDS, Workload
from tests.chaos_fleet import Fleet, inject_faults
from tests.chaos_history import TERMINAL_STATUSES, Reader, Unreadable, check_history, stored_response_ids

CHAOS_SECONDS = float(os.environ.get("CHAOS_SECONDS", "45"))
CHAOS_FAULTS = os.environ.get("CHAOS_FAULTS", "1") != "0"  # 0: the same workload without faults, as a baseline
CLIENTS = 40
GATEWAYS = 3
LEASE_SECONDS = 2.5
RENEW_SECONDS = 0.7
SWEEP_SECONDS = 0.5
# Lease expiry, a sweep, a restarted run from its start, and room for two busy cores.
SETTLE_SECONDS = LEASE_SECONDS + SWEEP_SECONDS + LONGEST_RUN_SECONDS + 4.0

GATEWAY_ENV = {
    "GATEWAY_RUNS__LEASE_SECONDS": str(LEASE_SECONDS),
    "GATEWAY_RUNS__RENEW_SECONDS": str(RENEW_SECONDS),
    "GATEWAY_RUNS__SWEEP_SECONDS": str(SWEEP_SECONDS),
    # Fewer slots than clients once an instance is down: background runs queue, synchronous ones get 429.
    "GATEWAY_RUNS__MAX_CONCURRENT": "16",
    "GATEWAY_SHUTDOWN__GRACE_SECONDS": "1",
    "GATEWAY_SSE__HEARTBEAT_SECONDS": "1",
}


@pytest.mark.timeout(CHAOS_SECONDS + 90)
async def test_chaos(tmp_path: Path, simulator_url: str, key_prefix: str) -> None:
    seed = int(os.environ.get("CHAOS_SEED") or random.randrange(1_000_000))
    print(f"chaos: seed {seed} (CHAOS_SEED={seed} replays the fault schedule), logs in {tmp_path}", flush=True)
    upstreams = [{"name": "sim", "base_url": f"{simulator_url}/v1", "max_retries": 0}]
    env = {
        **GATEWAY_ENV,
        "GATEWAY_STORAGE__KEY_PREFIX": key_prefix,
        "GATEWAY_UPSTREAMS": orjson.dumps(upstreams).decode(),
    }
    fleet = Fleet.create(tmp_path, GATEWAYS, env)
    workload = Workload(fleet, random.Random(seed + 1), f"chaos{seed}")
    try:
        await fleet.start()
        stop_at = workload.stop_at = time.monotonic() + max(CHAOS_SECONDS - SETTLE_SECONDS, 10.0)
        workload.give_up_at = stop_at + SETTLE_SECONDS  # for clients; set again once the faults are over
        async with workload:
            clients = [asyncio.create_task(workload.client()) for _ in range(CLIENTS)]
            if CHAOS_FAULTS:
                await inject_faults(fleet, random.Random(seed), until=stop_at, lease_seconds=LEASE_SECONDS)
            else:
                await asyncio.sleep(stop_at - time.monotonic())
            await fleet.heal()
            # A fault that overran (a SIGTERM that did not end its gateway) does not shorten the settling.
            workload.give_up_at = max(stop_at, time.monotonic()) + SETTLE_SECONDS
            fleet.note("faults over; settling")
            await settle(fleet, key_prefix, clients, workload.give_up_at)
            fleet.note("settled, or out of time; checking")
            report = await check_history(fleet, key_prefix, workload.requests, simulator_url)
    finally:
        fleet.stop()
        with (tmp_path / "requests.jsonl").open("wb") as dump:
            dump.writelines(orjson.dumps(request.as_json()) + b"\n" for request in workload.requests)
    summary = [f"seed {seed}, logs in {tmp_path}", *report.summary, "faults:", *fleet.faults]
    print("\n".join(summary))
    assert not report.violations, "\n".join([*report.render(), "", *summary])


async def settle(fleet: Fleet, key_prefix: str, clients: list[asyncio.Task[None]], give_up_at: float) -> None:
    """Wait, no longer than `give_up_at`, for every client to finish and every stored response to be terminal;
    then stop the clients that still wait (the check reports what they were waiting for)."""
    finished: set[str] = set()  # terminal is for good: each response is asked about until it is
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            reader = Reader(http, fleet.live_urls())
            while time.monotonic() < give_up_at:
                if all(client.done() for client in clients) and await all_terminal(reader, fleet, key_prefix, finished):
                    return
                await asyncio.sleep(0.25)
    finally:
        for client in clients:
            client.cancel()
        await asyncio.gather(*clients, return_exceptions=True)


async def all_terminal(reader: Reader, fleet: Fleet, key_prefix: str, finished: set[str]) -> bool:
    for response_id in set(await stored_response_ids(fleet.redis_url, key_prefix)) - finished:
        try:
            snapshot = await reader.snapshot(response_id)
        except Unreadable:
            return False
        if snapshot is not None and snapshot.get("status") not in TERMINAL_STATUSES:
            return False
        finished.add(response_id)
    return True
