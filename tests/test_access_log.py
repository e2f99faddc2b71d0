"""The access log: one line per request on `gateway.access`, streams logged when they end, no credential in it."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator

import openai
import pytest

from gateway.logs import JsonFormatter
from tests.conftest import Gateway, eventually, gateway_settings, serve_gateway
from tests.helpers import iter_frames

API_KEY = "sk-access-log-test-secret"
ACCESS_FIELDS = ("method", "path", "status", "duration_ms", "tenant", "response_id", "request_id", "client_closed")


@pytest.fixture
async def authed_gateway(redis_server: str, simulator_url: str, key_prefix: str) -> AsyncIterator[Gateway]:
    """A gateway with one API key, tenant `acme`, and an SDK client that sends it."""
    key_hash = hashlib.sha256(API_KEY.encode()).hexdigest()
    settings = gateway_settings(
        storage_url=redis_server,
        simulator_url=simulator_url,
        key_prefix=key_prefix,
        auth={"enabled": True, "keys": [{"tenant": "acme", "key_sha256": key_hash}]},
    )
    async with serve_gateway(settings) as served:
        served.client = served.client.with_options(api_key=API_KEY)
        yield served


@pytest.fixture
def access_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="gateway.access")
    return caplog


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "gateway.access"]


def fields(record: logging.LogRecord) -> dict[str, object]:
    return {name: getattr(record, name) for name in ACCESS_FIELDS}


async def test_a_request_is_one_line_with_its_tenant_response_and_request_id(
    authed_gateway: Gateway, access_log: pytest.LogCaptureFixture
) -> None:
    raw = await authed_gateway.client.responses.with_raw_response.create(model="sim-1", input="logged")
    created = raw.parse()
    retrieved = await authed_gateway.client.responses.retrieve(created.id)

    create_line, retrieve_line = access_records(access_log)
    assert fields(create_line) == {
        "method": "POST",
        "path": "/v1/responses",
        "status": 200,
        "duration_ms": create_line.duration_ms,
        "tenant": "acme",
        "response_id": created.id,
        "request_id": raw.request_id,
        "client_closed": False,
    }
    assert isinstance(create_line.duration_ms, float)
    assert create_line.duration_ms > 0
    assert create_line.getMessage().startswith(f"POST /v1/responses 200 {create_line.duration_ms:.1f}ms tenant=acme")
    assert (retrieve_line.method, retrieve_line.status, retrieve_line.response_id) == ("GET", 200, retrieved.id)
    assert retrieve_line.request_id == retrieved._request_id


async def test_nothing_from_the_authorization_header_is_logged(
    authed_gateway: Gateway, access_log: pytest.LogCaptureFixture
) -> None:
    await authed_gateway.client.responses.create(model="sim-1", input="secret")
    with pytest.raises(openai.AuthenticationError):
        await authed_gateway.client.with_options(api_key="sk-wrong-key").responses.create(model="sim-1", input="x")
    async with authed_gateway.http.get("/v1/models?api-key=sk-in-the-query&limit=5") as reply:
        assert reply.status == 401

    refused, by_query = access_records(access_log)[1:]
    assert (refused.status, refused.tenant) == (401, None)
    assert by_query.path == "/v1/models?api-key&limit=5"  # an unknown parameter's value is left out
    every_line = "\n".join(
        [record.getMessage() for record in access_log.records]
        + [JsonFormatter().format(record) for record in access_log.records]
    )
    for secret in (API_KEY, hashlib.sha256(API_KEY.encode()).hexdigest(), "sk-wrong-key", "sk-in-the-query"):
        assert secret not in every_line


async def test_a_stream_is_logged_when_it_ends(authed_gateway: Gateway, access_log: pytest.LogCaptureFixture) -> None:
    started = time.perf_counter()
    stream = await authed_gateway.client.responses.create(
        model="sim-1", input="streamed", stream=True, metadata={"sim_token_delay_ms": "20", "sim_tokens": "10"}
    )
    async for event in stream:
        if event.type == "response.created":
            response_id = event.response.id
            assert access_records(access_log) == []  # open streams are not logged yet
    elapsed_ms = (time.perf_counter() - started) * 1000

    (line,) = access_records(access_log)
    assert (line.status, line.response_id, line.client_closed) == (200, response_id, False)
    assert 150 < line.duration_ms <= elapsed_ms  # to the stream's end: ten tokens 20 ms apart


async def test_a_client_that_leaves_a_stream_is_logged_as_such(
    authed_gateway: Gateway, access_log: pytest.LogCaptureFixture
) -> None:
    body = {"model": "sim-1", "input": "left", "stream": True, "metadata": {"sim_token_delay_ms": "50"}}
    headers = {"Authorization": f"Bearer {API_KEY}", "x-request-id": "client-chosen-id"}
    async with authed_gateway.http.post("/v1/responses", json=body, headers=headers) as reply:
        async for _ in iter_frames(reply):
            break

    async def logged() -> list[logging.LogRecord]:
        return access_records(access_log)

    (line,) = await eventually(logged, within=5)
    assert (line.status, line.client_closed, line.request_id) == (200, True, "client-chosen-id")
    assert line.getMessage().endswith("(client closed)")


async def test_a_passing_probe_is_logged_at_debug(
    authed_gateway: Gateway, access_log: pytest.LogCaptureFixture
) -> None:
    async with authed_gateway.http.get("/healthz") as reply:
        assert reply.status == 200
    (line,) = access_records(access_log)
    assert (line.levelno, line.path, line.tenant) == (logging.DEBUG, "/healthz", None)


def test_json_lines_carry_the_access_fields_as_keys() -> None:
    record = logging.makeLogRecord(
        {"name": "gateway.access", "levelno": logging.INFO, "levelname": "INFO", "msg": "GET /x %d", "args": (200,)}
    )
    record.status = 200
    record.tenant = None
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "GET /x 200"
    assert (entry["level"], entry["logger"], entry["status"], entry["tenant"]) == ("INFO", "gateway.access", 200, None)
    assert entry["timestamp"].endswith("+00:00")
    assert "msg" not in entry
    assert "args" not in entry
