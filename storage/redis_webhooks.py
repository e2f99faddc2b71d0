"""The webhook outbox in Redis: one sorted set per shard, filled by the append that stores a terminal event
(storage/lua/append_events.lua) and drained by the senders of every instance (storage/lua/webhook_outbox.lua)."""

from __future__ import annotations

import asyncio
import itertools

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from storage.base import OutboxEntry
from storage.keys import SHARDS, KeySpace, shard_of
from storage.redis_mux import LuaScript, RedisCommands
from storage.redis_support import load_lua, unavailable_on_connection_error


def outbox_member(entry: OutboxEntry) -> bytes:
    """The sorted-set member of an entry: its response id (which names the shard) and its payload."""
    return entry.response_id.encode() + b" " + entry.payload


def _entry(member: bytes) -> OutboxEntry:
    response_id, _, payload = member.partition(b" ")
    return OutboxEntry(response_id.decode(), payload)


class RedisWebhookOutbox:
    """The webhook-outbox part of RedisStore (a mixin: it shares the store's client and keys)."""

    _client: aioredis.Redis | RedisCluster
    _mux: RedisCommands
    _keys: KeySpace

    def _register_webhook_scripts(self) -> None:
        self._outbox_script = LuaScript.of(load_lua("webhook_outbox.lua"))
        self._outbox_rotation = itertools.count()

    @unavailable_on_connection_error
    async def due_webhooks(self, limit: int, *, claim_ms: int) -> list[OutboxEntry]:
        # Every shard's outbox in one pipeline (one round trip per node), as the sweep reads the run indexes.
        outboxes = [self._keys.webhook_outbox(shard) for shard in range(SHARDS)]
        script = self._outbox_script
        commands = [("EVALSHA", script.sha, 1, outbox, "claim", limit, claim_ms) for outbox in outboxes]
        replies = await self._mux.execute_many(commands)
        if any(isinstance(reply, NoScriptError) for reply in replies):  # not loaded on some node yet
            replies = await asyncio.gather(
                *(self._mux.script(script, [outbox], ["claim", limit, claim_ms]) for outbox in outboxes)
            )
        entries: list[OutboxEntry] = []
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
            entries += (_entry(member) for member in reply)
        # Each shard claimed up to `limit`; what is beyond it in all is handed back at once, due for anyone, rather
        # than held for a whole claim nobody works on. The shards' order rotates, so none always goes last.
        start = next(self._outbox_rotation) % SHARDS if entries else 0
        entries.sort(key=lambda entry: (shard_of(entry.response_id) - start) % SHARDS)
        taken, surplus = entries[:limit], entries[limit:]
        await asyncio.gather(*(self.retry_webhook(entry, delay_ms=0) for entry in surplus))
        return taken

    @unavailable_on_connection_error
    async def webhook_done(self, entry: OutboxEntry) -> None:
        outbox = self._keys.webhook_outbox(shard_of(entry.response_id))
        await self._mux.script(self._outbox_script, [outbox], ["done", outbox_member(entry)])

    @unavailable_on_connection_error
    async def retry_webhook(self, entry: OutboxEntry, *, delay_ms: int) -> None:
        outbox = self._keys.webhook_outbox(shard_of(entry.response_id))
        await self._mux.script(self._outbox_script, [outbox], ["retry", outbox_member(entry), delay_ms])
