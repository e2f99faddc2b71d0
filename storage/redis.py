"""The Redis backend: a Stream per response for events, a hash for its snapshot, Lua for every read-then-write."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from storage.base import (
    DeleteOutcome,
    IdempotencyClaim,
    Lease,
    LogRewound,
    NewResponse,
    OutboxEntry,
    ResponseAlreadyExists,
    ResponseRecord,
    SteerQueueOutcome,
    SteersTaken,
    SteerState,
    StoredEvent,
)
from storage.fold import fold_events
from storage.keys import KeySpace, after_entry_id, shard_of
from storage.redis_appends import PlainAppends, append_refusal
from storage.redis_cluster import (
    CLUSTER_SCHEMES,
    ClusterAddress,
    ClusterCommands,
    ClusterEventFeed,
    open_cluster_client,
)
from storage.redis_conversations import RedisConversations
from storage.redis_feed import RedisEventFeed
from storage.redis_mux import LuaScript, RedisCommands, RedisMux
from storage.redis_replicas import ReplicaAcks
from storage.redis_runs import RedisRunQueue
from storage.redis_support import (
    COMMAND_TIMEOUT_SECONDS,
    CONNECT_TIMEOUT_SECONDS,
    POOL_WAIT_SECONDS,
    claim_json,
    event_args,
    load_lua,
    now_ms,
    parse_claim,
    parse_entries,
    unavailable_on_connection_error,
)
from storage.redis_webhooks import RedisWebhookOutbox, outbox_member
from storage.status import TERMINAL_STATUSES


class RedisStore(RedisConversations, RedisRunQueue, RedisWebhookOutbox):
    """Store backed by Redis (or any server speaking its protocol, ≥ 6.2 for exclusive XRANGE)."""

    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        *,
        key_prefix: str,
        retention_seconds: int,
        cluster: ClusterAddress | None = None,
        replica_acks: int = 0,
        replica_ack_timeout_ms: int = 1000,
    ) -> None:
        self._client = client
        self._keys = KeySpace(key_prefix)
        self._ttl_ms = retention_seconds * 1000
        self._cluster = cluster
        # Every script runs through one of these. On one node, the auto-pipelined connection
        # (storage/redis_mux.py); on a cluster, redis-py's client routing each to its slot's node.
        self._mux: RedisCommands
        if isinstance(client, RedisCluster):
            assert cluster is not None, "a cluster client comes with its address"
            self._mux = ClusterCommands(client)
        else:
            self._mux = RedisMux(client)
        self._create_script = LuaScript.of(load_lua("create_response.lua"))
        self._append_script = LuaScript.of(load_lua("append_events.lua"))
        self._delete_script = LuaScript.of(load_lua("delete_response.lua"))
        self._claim_script = LuaScript.of(load_lua("claim_idempotency_key.lua"))
        self._release_script = LuaScript.of(load_lua("release_idempotency_key.lua"))
        self._register_conversation_scripts()
        self._register_run_queue_scripts()
        self._register_webhook_scripts()
        self._abandon_script = LuaScript.of(load_lua("abandon_admission.lua"))
        self._read_events_script = LuaScript.of(load_lua("read_events.lua"))
        self._read_response_script = LuaScript.of(load_lua("read_response.lua"))
        self._queue_steer_script = LuaScript.of(load_lua("queue_steer.lua"))
        self._steer_state_script = LuaScript.of(load_lua("steer_state.lua"))
        self._plain_appends = PlainAppends(self._mux, self._keys)
        self.begins_appends = self._plain_appends.begins
        self._replica_acks = ReplicaAcks(
            client, replicas=replica_acks, timeout_ms=replica_ack_timeout_ms, ttl_ms=self._ttl_ms, cluster=cluster
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        key_prefix: str,
        retention_seconds: int,
        max_connections: int = 512,
        replica_acks: int = 0,
        replica_ack_timeout_ms: int = 1000,
    ) -> RedisStore:
        """A store on the Redis at `url`: one node (`redis://…`, `rediss://…`, `unix://…`), or a Redis Cluster
        (`redis+cluster://[user:password@]host:port[,host:port…]`, `rediss+cluster://` for TLS; any of its nodes
        will do as seeds, the rest is discovered). Requests beyond `max_connections` in flight wait for a free
        connection instead of failing. With `replica_acks`, a terminal event is published only once that many
        replicas have it (or `replica_ack_timeout_ms` passed)."""
        client: aioredis.Redis | RedisCluster
        cluster = None
        if url.startswith(tuple(f"{scheme}://" for scheme in CLUSTER_SCHEMES)):
            cluster = ClusterAddress.parse(url)
            client = open_cluster_client(cluster, max_connections=max_connections)
        else:
            pool = aioredis.BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                timeout=POOL_WAIT_SECONDS,
                socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
                socket_timeout=COMMAND_TIMEOUT_SECONDS,
                health_check_interval=30,
            )
            client = aioredis.Redis(connection_pool=pool)
        return cls(
            client,
            key_prefix=key_prefix,
            retention_seconds=retention_seconds,
            cluster=cluster,
            replica_acks=replica_acks,
            replica_ack_timeout_ms=replica_ack_timeout_ms,
        )

    @property
    def replica_ack_shortfalls(self) -> int:
        """Terminal events published with fewer replica acknowledgements than `replica_acks` asked for."""
        return self._replica_acks.shortfalls

    @property
    def keys(self) -> KeySpace:
        """The key names this store writes (for tests and operators)."""
        return self._keys

    @unavailable_on_connection_error
    async def create_response(self, new: NewResponse) -> Lease | None:
        keys = [*self._keys.response_keys(new.response_id), *self._keys.response_index(new.response_id)]
        if new.takes_steers is not None:
            steered_id = new.takes_steers[0]
            keys += [self._keys.response_state(steered_id), self._keys.response_steers(steered_id)]
        idempotency_key = self._keys.idempotency(*new.idempotency) if new.idempotency is not None else ""
        args: list[bytes | str | int] = [
            self._ttl_ms,
            new.response_id,
            new.snapshot,
            new.status,
            int(new.background),
            int(new.stored),
            new.input_items,
            new.request,
            new.owner,
            new.lease_ms,
            new.tenant,
            idempotency_key,
            new.conversation_id or "",
            "" if new.takes_steers is None else new.takes_steers[1],
        ]
        args += event_args(new.events)
        result = await self._mux.script(self._create_script, keys, args)
        if result == b"EXISTS":
            raise ResponseAlreadyExists(new.response_id)
        if result == b"STEERS_TAKEN":
            raise SteersTaken(new.takes_steers[0] if new.takes_steers else new.response_id)
        _, epoch, until = result
        return Lease(new.owner, int(epoch), int(until)) if new.owner else None

    async def append_events(
        self,
        response_id: str,
        events: Sequence[StoredEvent],
        *,
        snapshot: bytes | None,
        status: str,
        lease: Lease,
        checked: bool = False,
        after_loss: bool = False,
        outbox: Sequence[OutboxEntry] = (),
    ) -> bool:
        if not events:
            return False
        if snapshot is None and not (checked or after_loss):
            await self._plain_appends.append(response_id, events, lease)
            return False
        cancel_requested = await self._checked_append(response_id, events, snapshot, status, lease, after_loss, outbox)
        if self._replica_acks.replicas and status in TERMINAL_STATUSES:
            await self._wait_for_replicas(response_id)
        return cancel_requested and snapshot is not None

    def start_append(
        self,
        response_id: str,
        events: Sequence[StoredEvent],
        *,
        lease: Lease,
        done: Callable[[Exception | None], None],
    ) -> bool:
        if not events:
            return False
        return self._plain_appends.start(response_id, events, lease, done)

    @unavailable_on_connection_error
    async def _wait_for_replicas(self, response_id: str) -> None:
        await self._replica_acks.wait(self._keys.response_state(response_id))

    @unavailable_on_connection_error
    async def _checked_append(
        self,
        response_id: str,
        events: Sequence[StoredEvent],
        snapshot: bytes | None,
        status: str,
        lease: Lease,
        after_loss: bool,
        outbox: Sequence[OutboxEntry],
    ) -> bool:
        keys = [*self._keys.response_keys(response_id), self._keys.webhook_outbox(shard_of(response_id))]
        args: list[bytes | str | int] = [
            self._ttl_ms,
            snapshot or b"",
            status,
            events[0].sequence_number,
            lease.owner,
            lease.epoch,
            int(after_loss),
            len(outbox),
        ]
        args += [outbox_member(entry) for entry in outbox]
        args += event_args(events, lease.epoch)
        result = await self._mux.script(self._append_script, keys, args)
        if result in (b"OK", b"CANCEL"):
            return bool(result == b"CANCEL")
        if isinstance(result, list) and result[0] == b"REWOUND":
            raise LogRewound(response_id, int(result[1]))
        raise append_refusal(result, response_id, events[0].sequence_number)

    @unavailable_on_connection_error
    async def abandon_admission(
        self, response_id: str, *, idempotency: tuple[str, str] | None, conversation_id: str | None
    ) -> None:
        keys = [*self._keys.response_keys(response_id), *self._keys.response_index(response_id)]
        if idempotency is not None:
            keys.append(self._keys.idempotency(*idempotency))
        result = await self._mux.script(self._abandon_script, keys, [response_id, int(idempotency is not None)])
        if result == b"OK" and conversation_id is not None:
            # The turn lives in the conversation's own slot, so it is released in a step of its own. Lost between
            # the two, it is held by a response that no longer exists, and the next turn clears it
            # (Lifecycle.take_turn); a retry of this undo releases it too.
            await self.clear_conversation_turn(conversation_id, response_id)

    @unavailable_on_connection_error
    async def get_response(self, response_id: str, *, tenant: str | None = None) -> ResponseRecord | None:
        keys = [self._keys.response_state(response_id), self._keys.response_events(response_id)]
        reply: list[Any] = await self._mux.script(self._read_response_script, keys, [tenant or ""])
        if not reply:
            return None
        flat, after_snapshot = reply
        fields: dict[bytes, bytes] = dict(zip(flat[::2], flat[1::2], strict=True))
        snapshot = fields[b"snapshot"]
        last_sequence_number = int(fields[b"snap_seq"])
        last_epoch = int(fields.get(b"snap_id", b"1-0").partition(b"-")[0])
        if after_snapshot:
            events = parse_entries(after_snapshot)
            snapshot = fold_events(snapshot, (event.data for event in events))
            last_sequence_number, last_epoch = events[-1].sequence_number, events[-1].epoch
        return ResponseRecord(
            response_id=response_id,
            snapshot=snapshot,
            status=fields[b"status"].decode(),
            last_sequence_number=last_sequence_number,
            background=fields[b"background"] == b"1",
            stored=fields[b"stored"] == b"1",
            request=fields.get(b"request", b"{}"),
            owner=fields.get(b"owner", b"").decode(),
            lease_until_ms=int(fields.get(b"lease_until", b"0")),
            recovery_count=int(fields.get(b"recovery_count", b"0")),
            tenant=fields.get(b"tenant", b"default").decode(),
            cancel_requested=fields.get(b"cancel_requested") == b"1",
            conversation_id=fields.get(b"conv", b"").decode() or None,
            keyed=bool(fields.get(b"idem")),
            last_epoch=last_epoch,
        )

    @unavailable_on_connection_error
    async def get_input_items(self, response_id: str) -> bytes | None:
        value: bytes | None = await self._client.get(self._keys.response_input(response_id))  # type: ignore[assignment]
        return value

    @unavailable_on_connection_error
    async def read_events(
        self, response_id: str, after: int, *, limit: int = 512, after_epoch: int | None = None
    ) -> list[StoredEvent]:
        # `<epoch>-<after>` is exactly the entry to start after. Most responses are written under one epoch, so
        # without a known epoch the reader tries epoch 1: one plain XRANGE (a script's reply costs Redis several
        # times as much to build). After a takeover, entries of a later epoch sort after it whatever their number;
        # seeing one at or before `after` means the claim record must be read to find the right entry (the
        # script). A reader that knows its epoch wants exactly those: events a later owner wrote in place of lost
        # ones come back numbered `after` or less, for it to notice.
        key = self._keys.response_events(response_id)
        start = "-" if after < 0 else f"({after_entry_id(after, 1 if after_epoch is None else after_epoch)}"
        entries = await self._mux.execute("XRANGE", key, start, "+", "COUNT", limit)
        if isinstance(entries, Exception):
            raise entries
        events = parse_entries(entries)
        if after_epoch is None and events and events[0].sequence_number <= after:
            keys = [self._keys.response_state(response_id), key]
            events = parse_entries(await self._mux.script(self._read_events_script, keys, [after, limit]))
        return events

    @unavailable_on_connection_error
    async def queue_steer(self, response_id: str, steer: bytes, *, max_pending: int) -> SteerQueueOutcome:
        channel, publish = self.notice_channel(response_id)
        keys = [self._keys.response_state(response_id), self._keys.response_steers(response_id)]
        args = [steer, max_pending, self._ttl_ms, channel, f"steer {response_id}", publish]
        result = await self._mux.script(self._queue_steer_script, keys, args)
        return SteerQueueOutcome(result.decode().lower())

    async def steer_state(self, response_id: str) -> SteerState:
        return await self._steer_state(response_id, "read", "")

    async def resolve_steers(self, response_id: str, outcome: str) -> None:
        await self._steer_state(response_id, "resolve", outcome)

    @unavailable_on_connection_error
    async def _steer_state(self, response_id: str, action: str, outcome: str) -> SteerState:
        keys = [self._keys.response_state(response_id), self._keys.response_steers(response_id)]
        args = [action, outcome, self._ttl_ms]
        queued, successor, resolved = await self._mux.script(self._steer_state_script, keys, args)
        return SteerState(tuple(queued), successor.decode() or None, resolved.decode() or None)

    @unavailable_on_connection_error
    async def delete_response(self, response_id: str, *, only_if_finished: bool = True) -> DeleteOutcome:
        keys = [
            *self._keys.response_keys(response_id),
            *self._keys.response_index(response_id),
            self._keys.response_steers(response_id),
        ]
        result = await self._mux.script(self._delete_script, keys, [int(only_if_finished), response_id])
        return DeleteOutcome(result.decode().lower())

    @unavailable_on_connection_error
    async def claim_idempotency_key(
        self, scope: str, key: str, *, fingerprint: str, response_id: str, ttl_seconds: int
    ) -> IdempotencyClaim | None:
        claim = claim_json(IdempotencyClaim(fingerprint, response_id, now_ms()))
        existing = await self._mux.script(
            self._claim_script, [self._keys.idempotency(scope, key)], [claim, ttl_seconds * 1000, ""]
        )
        return parse_claim(existing) if existing else None

    @unavailable_on_connection_error
    async def replace_idempotency_claim(
        self, scope: str, key: str, *, expected_response_id: str, claim: IdempotencyClaim, ttl_seconds: int
    ) -> bool:
        result = await self._mux.script(
            self._claim_script,
            [self._keys.idempotency(scope, key)],
            [claim_json(claim), ttl_seconds * 1000, expected_response_id],
        )
        return bool(result == b"REPLACED")

    @unavailable_on_connection_error
    async def release_idempotency_key(self, scope: str, key: str, *, response_id: str) -> None:
        await self._mux.script(self._release_script, [self._keys.idempotency(scope, key)], [response_id])

    def open_event_feed(self) -> RedisEventFeed | ClusterEventFeed:
        if isinstance(self._client, RedisCluster):
            assert self._cluster is not None
            return ClusterEventFeed(self._client, self._keys, self._cluster)
        return RedisEventFeed(self._client, self._keys)

    @unavailable_on_connection_error
    async def ping(self) -> None:
        await self._client.ping()

    async def close(self) -> None:
        await self._mux.close()
        await self._replica_acks.close()
        if isinstance(self._client, RedisCluster):
            await self._client.aclose()
        else:
            await self._client.aclose(close_connection_pool=True)
