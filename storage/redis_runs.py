"""The run queue in Redis: leases with fencing epochs, the run index and queue of every shard, the sweep's view
of them, the follow-ups of a durable end, and run notices (pub/sub on one node, sharded pub/sub on a cluster)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from storage.base import Lease, LeaseLost, LogRewound, NoticeKind, Renewal, RunNotice
from storage.keys import SHARDS, KeySpace, shard_of
from storage.redis_cluster import ClusterAddress, sharded_notices
from storage.redis_mux import LuaScript, RedisCommands
from storage.redis_support import (
    PUBSUB_POLL_SECONDS,
    RESUBSCRIBE_DELAY_SECONDS,
    load_lua,
    log,
    raise_if_cancelling,
    unavailable_on_connection_error,
)

# The word before a notice's response id; a bare id is a cancel.
_NOTICE_KINDS = {"queued": NoticeKind.QUEUED, "steer": NoticeKind.STEER}


class RedisRunQueue:
    """The run-queue half of RedisStore (a mixin: it shares the store's client, keys and retention)."""

    _client: aioredis.Redis | RedisCluster
    _mux: RedisCommands
    _keys: KeySpace
    _ttl_ms: int
    _cluster: ClusterAddress | None

    def _register_run_queue_scripts(self) -> None:
        self._lease_script = LuaScript.of(load_lua("lease.lua"))
        self._due_script = LuaScript.of(load_lua("due_runs.lua"))
        self._settle_script = LuaScript.of(load_lua("settle_response.lua"))
        self._cancel_script = LuaScript.of(load_lua("request_cancel.lua"))

    async def _lease(
        self, response_id: str, action: str, owner: str, epoch: int | str, lease_ms: int, stored_through: int = -1
    ) -> list[Any]:
        keys = [
            self._keys.response_state(response_id),
            *self._keys.response_index(response_id),
            self._keys.response_events(response_id),
        ]
        args = [action, response_id, owner, epoch, lease_ms, self._ttl_ms, stored_through]
        reply: list[Any] = await self._mux.script(self._lease_script, keys, args)
        return reply

    @unavailable_on_connection_error
    async def renew_lease(self, response_id: str, lease: Lease, *, lease_ms: int, stored_through: int = -1) -> Renewal:
        reply = await self._lease(response_id, "renew", lease.owner, lease.epoch, lease_ms, stored_through)
        if reply[0] == b"REWOUND":
            raise LogRewound(response_id, int(reply[1]), renewed=Lease(lease.owner, lease.epoch, int(reply[2])))
        if reply[0] == b"GONE":
            return Renewal(lease, False)  # it ended (or expired away) meanwhile: nothing to renew, nothing lost
        if reply[0] != b"OK":
            raise LeaseLost(response_id)
        return Renewal(Lease(lease.owner, lease.epoch, int(reply[1])), reply[2] == b"1")

    @unavailable_on_connection_error
    async def release_lease(self, response_id: str, lease: Lease) -> None:
        await self._lease(response_id, "release", lease.owner, lease.epoch, 0)

    @unavailable_on_connection_error
    async def claim_response(self, response_id: str, owner: str, *, lease_ms: int) -> tuple[Lease, int] | None:
        reply = await self._lease(response_id, "claim", owner, "", lease_ms)
        if reply[0] != b"OK":
            return None
        return Lease(owner, int(reply[1]), int(reply[2])), int(reply[3])

    @unavailable_on_connection_error
    async def due_runs(self, limit: int) -> list[str]:
        # Every shard's index in one pipeline (one round trip per node), then the longest-expired first across them.
        indexes = [self._keys.run_index(shard) for shard in range(SHARDS)]
        script = self._due_script
        replies = await self._mux.execute_many([("EVALSHA", script.sha, 1, index, limit) for index in indexes])
        if any(isinstance(reply, NoScriptError) for reply in replies):  # not loaded on some node yet
            replies = await asyncio.gather(*(self._mux.script(script, [index], [limit]) for index in indexes))
        return _first_by_score(replies, limit)

    @unavailable_on_connection_error
    async def queued_runs(self, limit: int) -> list[str]:
        # The head of every shard's queue, merged by admission time: the fleet's queue order, as one queue had it.
        commands = [("ZRANGE", self._keys.run_queue(shard), 0, limit - 1, "WITHSCORES") for shard in range(SHARDS)]
        return _first_by_score(await self._mux.execute_many(commands), limit)

    @unavailable_on_connection_error
    async def settle_response(self, response_id: str, *, idempotency_ttl_seconds: int) -> bool:
        state = self._keys.response_state(response_id)
        keys = [state, *self._keys.response_index(response_id), self._keys.response_steers(response_id)]
        idempotency_key = await self._mux.execute("HGET", state, "idem")
        if idempotency_key:
            keys.append(idempotency_key.decode())
        result = await self._mux.script(self._settle_script, keys, [response_id, idempotency_ttl_seconds * 1000])
        return bool(result == b"OK")

    @unavailable_on_connection_error
    async def request_cancel(self, response_id: str) -> str | None:
        channel, publish = self.notice_channel(response_id)
        keys = [self._keys.response_state(response_id)]
        status = await self._mux.script(self._cancel_script, keys, [channel, response_id, publish])
        return status.decode() if status else None

    @unavailable_on_connection_error
    async def announce_queued(self, response_id: str) -> None:
        channel, publish = self.notice_channel(response_id)
        await self._mux.execute(publish, channel, f"queued {response_id}")

    def notice_channel(self, response_id: str) -> tuple[str, str]:
        """The channel a script publishes the response's notices on, and the command: sharded pub/sub on a cluster
        (only the nodes that serve the shard's slot pass it on, not the whole cluster)."""
        if self._cluster is None:
            return self._keys.notice_channel(), "PUBLISH"
        return self._keys.notice_channel(shard_of(response_id)), "SPUBLISH"

    async def run_notices(self) -> AsyncIterator[RunNotice]:
        async for message in self._notice_messages():
            kind, _, response_id = message.rpartition(" ")
            yield RunNotice(_NOTICE_KINDS.get(kind, NoticeKind.CANCEL), response_id)

    async def _notice_messages(self) -> AsyncIterator[str]:
        """`<response id>` for a cancel, `queued <response id>` for a queued response, `steer <response id>` for
        steering input queued."""
        if isinstance(self._client, RedisCluster):
            assert self._cluster is not None
            channels = [self._keys.notice_channel(shard) for shard in range(SHARDS)]
            async for message in sharded_notices(self._client, self._cluster, channels):
                yield message
            return
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._keys.notice_channel())
                while True:
                    raise_if_cancelling()
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=PUBSUB_POLL_SECONDS)
                    if message is not None and message.get("type") == "message":
                        yield message["data"].decode()
            except (ConnectionError, OSError, aioredis.RedisError) as error:
                raise_if_cancelling()
                log.warning("notice channel lost (%s); resubscribing", error)
                await asyncio.sleep(RESUBSCRIBE_DELAY_SECONDS)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]


def _first_by_score(replies: Sequence[list[Any] | Exception], limit: int) -> list[str]:
    """The `limit` members of lowest score over several WITHSCORES replies (one per shard): flat
    `[member, score, …]` in RESP2, `[[member, score], …]` in RESP3."""
    scored: list[tuple[float, bytes]] = []
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
        if reply and isinstance(reply[0], list):
            scored += [(float(score), member) for member, score in reply]
        else:
            scored += [(float(reply[i + 1]), reply[i]) for i in range(0, len(reply), 2)]
    return [member.decode() for _, member in sorted(scored)[:limit]]
