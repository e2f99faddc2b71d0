"""Conversations in the embedded store: items in insertion order, the turn lock, expiry in last-write order."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from storage.base import ConversationMissing, ConversationRecord, CursorNotFound, ResponseAlreadyExists


@dataclass(slots=True)
class Conversation:
    created_at: int
    metadata: bytes
    items: dict[str, bytes]  # insertion order is the conversation's order
    expires_at: float
    active: str | None = None
    latest: str | None = None
    tenant: str = "default"


class MemoryConversations:
    """The conversation half of MemoryStore (a mixin: it shares the store's clock and retention)."""

    _clock: Callable[[], float]
    _retention: float
    # Least recently written first, as the store's responses: with one retention that is expiry order.
    _conversations: OrderedDict[str, Conversation]

    def _conversation(self, conversation_id: str) -> Conversation | None:
        now = self._clock()
        while self._conversations:
            oldest_id, oldest = next(iter(self._conversations.items()))
            if oldest.expires_at > now:
                break
            del self._conversations[oldest_id]
        return self._conversations.get(conversation_id)

    def _changed_conversation(self, conversation_id: str) -> Conversation:
        conversation = self._conversation(conversation_id)
        if conversation is None:
            raise ConversationMissing(conversation_id)
        conversation.expires_at = self._clock() + self._retention
        self._conversations.move_to_end(conversation_id)
        return conversation

    async def create_conversation(
        self,
        conversation_id: str,
        *,
        created_at: int,
        metadata: bytes,
        items: Sequence[tuple[str, bytes]],
        tenant: str = "default",
    ) -> None:
        if self._conversation(conversation_id) is not None:
            raise ResponseAlreadyExists(conversation_id)
        self._conversations[conversation_id] = Conversation(
            created_at, metadata, dict(items), self._clock() + self._retention, tenant=tenant
        )

    async def get_conversation(self, conversation_id: str) -> ConversationRecord | None:
        conversation = self._conversation(conversation_id)
        if conversation is None:
            return None
        return ConversationRecord(
            conversation_id,
            conversation.created_at,
            conversation.metadata,
            conversation.active,
            conversation.latest,
            conversation.tenant,
        )

    async def set_conversation_metadata(self, conversation_id: str, metadata: bytes) -> None:
        self._changed_conversation(conversation_id).metadata = metadata

    async def delete_conversation(self, conversation_id: str) -> bool:
        return self._conversations.pop(conversation_id, None) is not None

    async def append_conversation_items(self, conversation_id: str, items: Sequence[tuple[str, bytes]]) -> str | None:
        conversation = self._changed_conversation(conversation_id)
        if conversation.active is not None:
            return conversation.active
        conversation.items.update(items)
        return None

    async def begin_conversation_turn(self, conversation_id: str, response_id: str) -> str | None:
        conversation = self._changed_conversation(conversation_id)
        if conversation.active is not None and conversation.active != response_id:
            return conversation.active
        conversation.active = response_id
        return None

    async def end_conversation_turn(
        self, conversation_id: str, response_id: str, *, completed: bool, items: Sequence[tuple[str, bytes]]
    ) -> bool:
        conversation = self._changed_conversation(conversation_id)
        if conversation.active != response_id:
            return False
        conversation.active = None
        conversation.items.update(items)
        if completed:
            conversation.latest = response_id
        return True

    async def clear_conversation_turn(self, conversation_id: str, response_id: str) -> bool:
        conversation = self._conversation(conversation_id)
        if conversation is None or conversation.active != response_id:
            return False
        conversation.active = None
        return True

    async def list_conversation_items(
        self, conversation_id: str, *, after: str | None, limit: int, order: str
    ) -> tuple[list[bytes], bool]:
        conversation = self._conversation(conversation_id)
        if conversation is None:
            return [], False
        ids = list(conversation.items)
        if order != "asc":
            ids.reverse()
        start = 0
        if after is not None:
            if after not in ids:
                raise CursorNotFound(after)
            start = ids.index(after) + 1
        page = ids[start : start + limit]
        return [conversation.items[item_id] for item_id in page], start + limit < len(ids)

    async def get_conversation_item(self, conversation_id: str, item_id: str) -> bytes | None:
        conversation = self._conversation(conversation_id)
        return None if conversation is None else conversation.items.get(item_id)

    async def delete_conversation_item(self, conversation_id: str, item_id: str) -> bool:
        return self._changed_conversation(conversation_id).items.pop(item_id, None) is not None
