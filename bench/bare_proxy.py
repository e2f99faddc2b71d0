"""The floor the gateway is measured against: a minimal aiohttp proxy that does only what any Responses proxy that
renumbers events must. It forwards `POST /v1/responses` to the simulator, splits the streamed answer into events,
parses each, sets its `sequence_number`, and writes what arrived together to its client in one write.

It stores nothing and has no admission, lease, snapshot, subscribers, cancel or retries: whatever the gateway
costs beyond this column is the price of what it does beyond that, its store included. (A store in here would
make the floor depend on how lean its Redis client is; the gateway's Redis cost has lines of its own.) A
separate program of the bench's own, run like the others (`python -m bench.bare_proxy --port P --upstream URL`);
it imports nothing of the gateway.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import AsyncIterator

import aiohttp
import orjson
import uvloop
from aiohttp import web

UPSTREAM_KEEPALIVE_SECONDS = 60.0
_UPSTREAM = web.AppKey("upstream", aiohttp.ClientSession)
_UPSTREAM_URL = web.AppKey("upstream_url", str)


async def responses(request: web.Request) -> web.StreamResponse:
    body = orjson.loads(await request.read())
    session = request.app[_UPSTREAM]
    headers = {"Content-Type": "application/json", "Authorization": "Bearer bare"}
    async with session.post(request.app[_UPSTREAM_URL], data=orjson.dumps(body), headers=headers) as upstream:
        if upstream.status != 200:
            return web.Response(status=upstream.status, body=await upstream.read(), content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        pending, sequence_number = b"", 0
        async for chunk in upstream.content.iter_any():
            pending += chunk
            *frames, pending = pending.split(b"\n\n")
            events = [
                orjson.loads(line[5:])
                for frame in frames
                for line in frame.split(b"\n")
                if line.startswith(b"data:") and line[5:].strip() != b"[DONE]"
            ]
            if not events:
                continue
            out = []
            for event in events:
                event["sequence_number"] = sequence_number
                out.append(b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n")
                sequence_number += 1
            await response.write(b"".join(out))
        await response.write_eof()
        return response


def make_app(upstream_url: str) -> web.Application:
    app = web.Application()
    app[_UPSTREAM_URL] = f"{upstream_url.rstrip('/')}/responses"
    app.router.add_post("/v1/responses", responses)

    async def clients(app: web.Application) -> AsyncIterator[None]:
        # Idle connections kept as long as the gateway keeps its own (runs/upstream/client.py), so that neither
        # column pays for reconnecting where the other does not.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=UPSTREAM_KEEPALIVE_SECONDS)
        app[_UPSTREAM] = aiohttp.ClientSession(connector=connector)
        yield
        await app[_UPSTREAM].close()

    app.cleanup_ctx.append(clients)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the simulator's base URL, ending in /v1")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    uvloop.install()  # as the gateway runs by default
    web.run_app(make_app(args.upstream), host="127.0.0.1", port=args.port, access_log=None)


if __name__ == "__main__":
    main()
