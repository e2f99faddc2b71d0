"""Conversations in Redis: a hash of fields and the turn lock, a hash of items, and a list of their order."""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from storage.base import (
    ConversationMissing,
    ConversationRecord,
    CursorNotFound,
    ResponseAlreadyExists,
)
from storage.keys import KeySpace
from storage.redis_mux import LuaScript, RedisCommands
from storage.redis_support import item_pairs, load_lua, unavailable_on_connection_error


class RedisConversations:
    """The conversation half of RedisStore (a mixin: it shares the store's client, keys and retention)."""

    _client: aioredis.Redis | RedisCluster
    _mux: RedisCommands
    _keys: KeySpace
    _ttl_ms: int

    def _register_conversation_scripts(self) -> None:
        self._create_conversation_script = LuaScript.of(load_lua("create_conversation.lua"))
        self._conversation_script = LuaScript.of(load_lua("conversation.lua"))
        self._list_items_script = LuaScript.of(load_lua("list_conversation_items.lua"))

    @unavailable_on_connection_error
    async def create_conversation(
        self,
        conversation_id: str,
        *,
        created_at: int,
        metadata: bytes,
        items: Sequence[tuple[str, bytes]],
        tenant: str = "default",
    ) -> None:
        args: list[bytes | str | int] = [self._ttl_ms, created_at, metadata, tenant, *item_pairs(items)]
        keys = list(self._keys.conversation_keys(conversation_id))
        if await self._mux.script(self._create_conversation_script, keys, args) == b"EXISTS":
            raise ResponseAlreadyExists(conversation_id)

    @unavailable_on_connection_error
    async def get_conversation(self, conversation_id: str) -> ConversationRecord | None:
        key = self._keys.conversation_keys(conversation_id)[0]
        fields: dict[bytes, bytes] = await self._client.hgetall(key)  # type: ignore[assignment]
        if not fields:
            return None
        return ConversationRecord(
            conversation_id=conversation_id,
            created_at=int(fields[b"created_at"]),
            metadata=fields[b"metadata"],
            active_response_id=fields[b"active"].decode() or None,
            latest_completed_response_id=fields[b"latest"].decode() or None,
            tenant=fields.get(b"tenant", b"default").decode(),
        )

    async def _change_conversation(self, conversation_id: str, action: str, *args: bytes | str) -> bytes:
        keys = list(self._keys.conversation_keys(conversation_id))
        result: bytes = await self._mux.script(self._conversation_script, keys, [self._ttl_ms, action, *args])
        if result == b"MISSING":
            raise ConversationMissing(conversation_id)
        return result

    @unavailable_on_connection_error
    async def set_conversation_metadata(self, conversation_id: str, metadata: bytes) -> None:
        await self._change_conversation(conversation_id, "metadata", metadata)

    @unavailable_on_connection_error
    async def delete_conversation(self, conversation_id: str) -> bool:
        deleted: int = await self._client.delete(*self._keys.conversation_keys(conversation_id))
        return deleted > 0

    @unavailable_on_connection_error
    async def append_conversation_items(self, conversation_id: str, items: Sequence[tuple[str, bytes]]) -> str | None:
        result = await self._change_conversation(conversation_id, "append", "", *item_pairs(items))
        return None if result == b"OK" else result.decode()

    @unavailable_on_connection_error
    async def begin_conversation_turn(self, conversation_id: str, response_id: str) -> str | None:
        result = await self._change_conversation(conversation_id, "begin", response_id)
        return None if result == b"OK" else result.decode()

    @unavailable_on_connection_error
    async def end_conversation_turn(
        self, conversation_id: str, response_id: str, *, completed: bool, items: Sequence[tuple[str, bytes]]
    ) -> bool:
        result = await self._change_conversation(
            conversation_id, "end", response_id, "1" if completed else "0", *item_pairs(items)
        )
        return result == b"OK"

    @unavailable_on_connection_error
    async def clear_conversation_turn(self, conversation_id: str, response_id: str) -> bool:
        try:
            return await self._change_conversation(conversation_id, "clear", response_id) == b"OK"
        except ConversationMissing:
            return False

    @unavailable_on_connection_error
    async def list_conversation_items(
        self, conversation_id: str, *, after: str | None, limit: int, order: str
    ) -> tuple[list[bytes], bool]:
        _, items_key, order_key = self._keys.conversation_keys(conversation_id)
        reply: list[bytes] = await self._mux.script(
            self._list_items_script, [items_key, order_key], [after or "", limit, order]
        )
        if reply and reply[0] == b"NO_AFTER":
            raise CursorNotFound(after or "")
        return list(reply[1:]), reply[0] == b"1"

    @unavailable_on_connection_error
    async def get_conversation_item(self, conversation_id: str, item_id: str) -> bytes | None:
        value: bytes | None = await self._client.hget(  # type: ignore[assignment]
            self._keys.conversation_keys(conversation_id)[1], item_id
        )
        return value

    @unavailable_on_connection_error
    async def delete_conversation_item(self, conversation_id: str, item_id: str) -> bool:
        return await self._change_conversation(conversation_id, "delete_item", item_id) == b"OK"
