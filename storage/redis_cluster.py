"""Redis Cluster: the storage URL, the hot path's commands through redis-py's cluster client, and the live feed
as one blocking reader per node.

Every script touches the keys of one response's shard, one hash slot (storage/keys.py), so redis-py routes each
command by its first key, follows MOVED and ASK, and refreshes its map of the slots after a failover. What no
client can do is read many streams of many slots in one blocking call (a cluster refuses a command whose keys
are in different slots, even on one node): the feed here groups the watched responses by shard (one slot) and
reads each group on a connection of its own to the node that serves it (RedisEventFeed, as on a single node),
returning as soon as any group has events.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import AskError, ResponseError

from storage.base import StoreClosed, StoredEvent, StoreUnavailable
from storage.keys import KeySpace, shard_of
from storage.redis_feed import RedisEventFeed
from storage.redis_mux import LuaScript, run_script
from storage.redis_support import (
    COMMAND_TIMEOUT_SECONDS,
    CONNECT_TIMEOUT_SECONDS,
    PUBSUB_POLL_SECONDS,
    RESUBSCRIBE_DELAY_SECONDS,
    UNAVAILABLE_ERRORS,
    log,
    raise_if_cancelling,
)

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
# Commands the store reads raw replies of (as the single-node mux gives them): no redis-py parsing on top.
_RAW_COMMANDS = ("EVALSHA", "EVAL", "XADD", "XRANGE", "ZRANGE", "HGET")


@dataclass(frozen=True)
class ClusterAddress:
    """What `redis+cluster://[user:password@]host:port[,host:port…]` names: the seed nodes and the credentials."""

    seeds: list[tuple[str, int]]
    username: str | None
    password: str | None
    tls: bool

    @classmethod
    def parse(cls, url: str) -> ClusterAddress:
        scheme, _, rest = url.partition("://")
        if scheme not in CLUSTER_SCHEMES or not rest:
            raise ValueError(f"not a Redis Cluster URL: {scheme!r} (expected redis+cluster://host:port[,host:port…])")
        credentials, _, hosts = rest.rpartition("@")
        hosts = hosts.split("/", 1)[0]  # a cluster has only database 0
        seeds = []
        for part in filter(None, hosts.split(",")):
            split = urlsplit(f"//{part}")
            if split.hostname is None:
                raise ValueError(f"Redis Cluster URL: no host in {part!r}")
            seeds.append((split.hostname, split.port or 6379))
        if not seeds:
            raise ValueError("Redis Cluster URL: no host:port")
        username, _, password = credentials.partition(":") if credentials else ("", "", "")
        return cls(seeds, unquote(username) or None, unquote(password) or None, scheme == "rediss+cluster")

    def node_client(self, node: ClusterNode) -> aioredis.Redis:
        """A plain client of one node (for what redis-py's cluster client does not do: a blocking read of many
        streams, shard-channel subscriptions, a WAIT on the connection that wrote)."""
        return aioredis.Redis(host=node.host, port=int(node.port), **self.options())

    def options(self) -> dict[str, Any]:
        """Connection options every connection to a node of this cluster takes."""
        return {
            "username": self.username,
            "password": self.password,
            "ssl": self.tls,
            "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
            "socket_timeout": COMMAND_TIMEOUT_SECONDS,
        }


class _ReadyFirst(RedisCluster):
    """redis-py's cluster client, made ready (slots mapped) before a command starts rather than inside it: on a
    fresh client, commands started together before its first `initialize()` meet connections being set up under
    them (redis-py 8.1: AttributeError on a connection's writer; tests/test_storage_contract.py's concurrent
    claims on a new store). Once initialized, `initialize()` returns at once."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        await self.initialize()
        return await super().execute_command(*args, **kwargs)


def open_cluster_client(address: ClusterAddress, *, max_connections: int) -> RedisCluster:
    client = _ReadyFirst(
        startup_nodes=[ClusterNode(host, port) for host, port in address.seeds],
        max_connections=max_connections,
        **address.options(),
    )
    for command in _RAW_COMMANDS:
        client.set_response_callback(command, _raw)
    return client


def _raw(response: Any, **_: Any) -> Any:
    return response


class ClusterCommands:
    """The single-node mux's interface (storage/redis_mux.py) over redis-py's cluster client: raw replies, an
    error reply returned rather than raised, a lost connection as StoreUnavailable."""

    def __init__(self, client: RedisCluster) -> None:
        self._client = client
        self._closed = False

    async def execute(self, *args: Any) -> Any:
        if self._closed:  # else redis-py would quietly connect again
            raise StoreClosed("redis cluster: the store is closed")
        try:
            return await self._client.execute_command(*args)
        except UNAVAILABLE_ERRORS as error:  # first: a cluster that is down answers with an error reply too
            raise StoreUnavailable(f"redis cluster: {error}") from error
        except ResponseError as error:
            return error

    async def execute_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """In order: one pipeline, which sends each node its commands in the order given. All or nothing, as on
        one node: a command that met a lost node, a cluster without a master for its slot, or a slot that moved
        makes the whole call StoreUnavailable (after the slot map is read again), so the caller sends the whole
        batch again. (redis-py would re-send redirected commands one by one, and an append could then store
        event n+1 without event n.)"""
        if self._closed:
            raise StoreClosed("redis cluster: the store is closed")
        pipe = self._client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        try:
            replies: list[Any] = await pipe.execute(raise_on_error=False, allow_redirections=False)
        except UNAVAILABLE_ERRORS as error:
            raise StoreUnavailable(f"redis cluster: {error}") from error
        lost = next((reply for reply in replies if isinstance(reply, (*UNAVAILABLE_ERRORS, AskError))), None)
        if lost is not None:
            await relearn_slots(self._client, lost)
            raise StoreUnavailable(f"redis cluster: {lost}")
        return replies

    async def script(self, script: LuaScript, keys: list[str], args: list[Any]) -> Any:
        return await run_script(self, script, keys, args)

    async def close(self) -> None:
        """Refuse every later command (the cluster client itself is closed by its store)."""
        self._closed = True


async def relearn_slots(client: RedisCluster, failure: BaseException) -> None:
    """Read the cluster's slot map again. redis-py does so when its own single commands meet MOVED or a dead node;
    pipelines sent without redirections and the connections of the feed and notices are not its own, so they ask."""
    log.warning("a Redis Cluster node failed or a slot moved (%s); reading the slot map again", failure)
    with contextlib.suppress(Exception):
        await client.nodes_manager.initialize()


class ClusterEventFeed:
    """The live feed over a cluster: a RedisEventFeed per shard that has watched responses, on the node that
    serves the shard's slot; a read returns once any of them has events (the others are woken and their answers
    merged in). A node that fails, or answers MOVED because a slot moved, makes the map of slots be read again,
    and the next read connects each shard to the node that serves it then."""

    def __init__(self, client: RedisCluster, keys: KeySpace, address: ClusterAddress) -> None:
        self._client = client
        self._keys = keys
        self._address = address
        # shard -> (the node it was read from, its feed on that node, the client the feed uses for control)
        self._feeds: dict[int, tuple[str, RedisEventFeed, aioredis.Redis]] = {}

    async def _feed(self, shard: int, node: ClusterNode) -> RedisEventFeed:
        known = self._feeds.get(shard)
        if known is not None and known[0] == node.name:
            return known[1]
        if known is not None:  # the slot moved: leave the old node
            await _close_feed(known[1], known[2])
        client = self._address.node_client(node)
        feed = RedisEventFeed(client, self._keys)
        self._feeds[shard] = (node.name, feed, client)
        return feed

    async def read(self, cursors: Mapping[str, int], *, wait_ms: int) -> dict[str, list[StoredEvent]]:
        if not cursors:
            return {}
        await self._client.initialize()
        groups: dict[int, dict[str, int]] = {}
        for response_id, after in cursors.items():
            groups.setdefault(shard_of(response_id), {})[response_id] = after
        feeds: dict[int, RedisEventFeed] = {}
        for shard, group in groups.items():
            node = self._client.get_node_from_key(self._keys.response_events(next(iter(group))))
            if node is None:
                raise StoreUnavailable(f"redis cluster: no node serves shard {shard}")
            feeds[shard] = await self._feed(shard, node)
        reads = [asyncio.ensure_future(feeds[shard].read(group, wait_ms=wait_ms)) for shard, group in groups.items()]
        try:
            await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)
            await asyncio.gather(*(feed.interrupt() for feed in feeds.values()), return_exceptions=True)
            results = await asyncio.gather(*reads, return_exceptions=True)
        finally:
            for pending in reads:
                pending.cancel()
            # Each shard's read drops its connection when it is cancelled: done before its feed is used again.
            await asyncio.gather(*reads, return_exceptions=True)
        found: dict[str, list[StoredEvent]] = {}
        failure: BaseException | None = None
        for result in results:
            if isinstance(result, BaseException):
                failure = failure or result
            else:
                found.update(result)
        if failure is not None:
            await relearn_slots(self._client, failure)
            if not found:
                if isinstance(failure, AskError):  # MOVED / ASK: the slot moved; nothing was lost
                    return {}
                raise failure
        return found

    async def interrupt(self) -> None:
        await asyncio.gather(*(feed.interrupt() for _, feed, _ in self._feeds.values()), return_exceptions=True)

    async def close(self) -> None:
        for _, feed, client in self._feeds.values():
            await _close_feed(feed, client)
        self._feeds.clear()


async def _close_feed(feed: RedisEventFeed, client: aioredis.Redis) -> None:
    with contextlib.suppress(Exception):
        await feed.close()
    with contextlib.suppress(Exception):
        await client.aclose()


async def sharded_notices(client: RedisCluster, address: ClusterAddress, channels: list[str]) -> AsyncIterator[str]:
    """The messages published (SPUBLISH) on `channels`, each channel subscribed on the node that serves its slot,
    one connection per node. A lost connection, or a slot that moved away (the node then ends its subscriptions),
    subscribes everything anew on the nodes that serve the slots then. A message published meanwhile is missed:
    notices are only a quick path, whose receivers also learn what they carry from the store."""
    while True:
        listeners: list[asyncio.Task[None]] = []
        connections: list[aioredis.Redis] = []
        received: asyncio.Queue[str | BaseException] = asyncio.Queue()
        try:
            await client.initialize()
            by_node: dict[str, tuple[ClusterNode, list[str]]] = {}
            for channel in channels:
                node = client.get_node_from_key(channel)
                if node is None:
                    raise StoreUnavailable(f"redis cluster: no node serves {channel}")
                by_node.setdefault(node.name, (node, []))[1].append(channel)
            for node, node_channels in by_node.values():
                connection = address.node_client(node)
                connections.append(connection)
                pubsub = connection.pubsub(ignore_subscribe_messages=True)
                for channel in node_channels:  # a shard channel per call: SSUBSCRIBE takes channels of one slot
                    await pubsub.ssubscribe(channel)
                    raise_if_cancelling()  # redis-py can swallow a cancel that lands while it connects
                listeners.append(asyncio.create_task(_listen(pubsub, received)))
            while True:
                raise_if_cancelling()
                try:
                    item = await asyncio.wait_for(received.get(), PUBSUB_POLL_SECONDS)
                except TimeoutError:
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield item
        except (*UNAVAILABLE_ERRORS, aioredis.RedisError, StoreUnavailable) as error:
            raise_if_cancelling()
            log.warning("notice channels lost (%s); subscribing again", error)
            await relearn_slots(client, error)  # `initialize()` alone keeps a map it already has
            await asyncio.sleep(RESUBSCRIBE_DELAY_SECONDS)
        finally:
            for listener in listeners:
                listener.cancel()
            await asyncio.gather(*listeners, return_exceptions=True)
            for connection in connections:
                with contextlib.suppress(Exception):
                    await connection.aclose()


async def _listen(pubsub: PubSub, received: asyncio.Queue[str | BaseException]) -> None:
    try:
        while True:
            raise_if_cancelling()
            message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=PUBSUB_POLL_SECONDS)
            if message is None:
                continue
            kind = message.get("type")
            if kind == "smessage":
                received.put_nowait(message["data"].decode())
            elif kind == "sunsubscribe":  # the node gave the slot away: subscribe where it is now
                received.put_nowait(StoreUnavailable("redis cluster: a shard channel's slot moved"))
                return
    except (ConnectionError, OSError, aioredis.RedisError) as error:
        received.put_nowait(error)
    finally:
        with contextlib.suppress(Exception):
            await pubsub.aclose()  # type: ignore[no-untyped-call]
