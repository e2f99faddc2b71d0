"""Webhooks: a background response that ends is announced to the configured endpoints, as OpenAI announces it
(`response.completed`, `.failed`, `.cancelled`, `.incomplete`), signed in the Standard Webhooks scheme that the
SDK's `client.webhooks.unwrap(...)` verifies.

The deliveries a response owes are written into the store's outbox by the same atomic append as its terminal event
(`Store.append_events(outbox=...)`): an instance that dies right after the end leaves them there, and any
instance's sender delivers them. A sender claims an entry for longer than one attempt can take, so two senders
never deliver it at the same time; a sender that dies with it leaves it due again when the claim lapses. That
makes delivery at least once; every attempt of one delivery carries the same `webhook-id`, so a receiver drops
repeats. A failed attempt (no answer, or not 2xx) is retried with growing pauses until `give_up_after_seconds`
after the end.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp
import orjson

from runs.items import Json
from runs.metrics import RunMetrics, WebhookResult
from storage.base import OutboxEntry, Store

log = logging.getLogger(__name__)

# The terminal statuses OpenAI sends webhooks for, and the event type each one sends.
EVENT_TYPES = {
    "completed": "response.completed",
    "failed": "response.failed",
    "cancelled": "response.cancelled",
    "incomplete": "response.incomplete",
}
# A claim outlasts an attempt (bounded by its timeout) twice over, plus this, for a slow loop and recording the
# outcome: no other sender takes the entry meanwhile, and one that died with it holds it up no longer than that.
CLAIM_MARGIN_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class WebhookEndpoint:
    """Where to deliver, with what secret, which event types and for which tenants (empty: all)."""

    name: str
    url: str
    secret: str  # `whsec_<base64>` as OpenAI issues them, or any other string (its UTF-8 bytes are the key)
    events: frozenset[str] = frozenset(EVENT_TYPES.values())
    tenants: frozenset[str] = frozenset()

    def wants(self, event_type: str, tenant: str) -> bool:
        return event_type in self.events and (not self.tenants or tenant in self.tenants)


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    endpoints: tuple[WebhookEndpoint, ...] = ()
    poll_seconds: float = 1.0
    timeout_seconds: float = 10.0
    first_retry_seconds: float = 5.0
    max_retry_seconds: float = 3600.0
    give_up_after_seconds: float = 72 * 3600.0
    max_in_flight: int = 16
    user_agent: str = "responses-gateway-webhooks"


@dataclass(frozen=True, slots=True)
class Delivery:
    """One delivery owed: the event (its id, type and time are fixed when the response ends) for one endpoint."""

    endpoint: str
    event_id: str
    event_type: str
    response_id: str
    created_at: int

    @property
    def webhook_id(self) -> str:
        """The same for every attempt of this delivery, and different for each endpoint."""
        digest = hashlib.sha256(f"{self.endpoint}\n{self.event_id}".encode()).hexdigest()
        return f"wh_{digest[:32]}"

    def body(self) -> bytes:
        """The event as OpenAI sends it (the SDK's `UnwrapWebhookEvent`)."""
        event = {
            "id": self.event_id,
            "object": "event",
            "created_at": self.created_at,
            "type": self.event_type,
            "data": {"id": self.response_id},
        }
        return orjson.dumps(event)

    def entry(self) -> OutboxEntry:
        payload = {"endpoint": self.endpoint, "id": self.event_id, "type": self.event_type, "at": self.created_at}
        return OutboxEntry(self.response_id, orjson.dumps(payload))

    @classmethod
    def of(cls, entry: OutboxEntry) -> Delivery:
        payload = orjson.loads(entry.payload)
        return cls(payload["endpoint"], payload["id"], payload["type"], entry.response_id, int(payload["at"]))


def event_id(response_id: str, event_type: str) -> str:
    """A response ends once, so its event's id follows from it: any instance that writes the end names it alike."""
    return "evt_" + hashlib.sha256(f"{response_id}\n{event_type}".encode()).hexdigest()[:32]


def signature_headers(webhook_id: str, timestamp: int, body: bytes, secret: str) -> dict[str, str]:
    """Standard Webhooks headers: HMAC-SHA256 over `<id>.<timestamp>.<body>`, keyed by the secret (base64 after
    `whsec_`, as the SDK decodes it), sent as `v1,<base64>`."""
    key = base64.b64decode(secret.removeprefix("whsec_")) if secret.startswith("whsec_") else secret.encode()
    signed = webhook_id.encode() + b"." + str(timestamp).encode() + b"." + body
    signature = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return {"webhook-id": webhook_id, "webhook-timestamp": str(timestamp), "webhook-signature": f"v1,{signature}"}


def retry_delay(age_seconds: float, settings: WebhookSettings) -> float:
    """The pause before the next attempt: as long as the delivery has been owed (so pauses double), within the
    bounds, give or take a fifth so that a receiver that was down is not hit by every retry at once."""
    delay = min(max(age_seconds, settings.first_retry_seconds), settings.max_retry_seconds)
    return delay * random.uniform(0.8, 1.2)


@dataclass
class WebhookSender:
    """This instance's sender: it answers which deliveries an ending response owes, and delivers what the outbox
    holds (its own and any other instance's)."""

    store: Store
    settings: WebhookSettings
    # Each attempt's outcome, and for a delivered one how long after the end (`gateway_webhook_deliveries_total`).
    metrics: RunMetrics | None = None
    _endpoints: dict[str, WebhookEndpoint] = field(init=False)
    _wake: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = field(init=False, default=None)
    _http: aiohttp.ClientSession | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._endpoints = {endpoint.name: endpoint for endpoint in self.settings.endpoints}

    def outbox_for(self, snapshot: Json, tenant: str) -> Callable[[str], Sequence[OutboxEntry]]:
        """The deliveries a response owes when it ends with a given status: for background responses only, as at
        OpenAI, to each endpoint that wants that event from that tenant."""
        background = bool(snapshot.get("background"))
        response_id = str(snapshot["id"])

        def owed(status: str) -> Sequence[OutboxEntry]:
            event_type = EVENT_TYPES.get(status)
            if not background or event_type is None:
                return ()
            event = event_id(response_id, event_type)
            now = int(time.time())
            return [
                Delivery(endpoint.name, event, event_type, response_id, now).entry()
                for endpoint in self.settings.endpoints
                if endpoint.wants(event_type, tenant)
            ]

        return owed

    def start(self) -> None:
        self._task = asyncio.create_task(self._deliver_forever(), name="webhook-sender")

    def nudge(self) -> None:
        """A response ended here: look at the outbox now rather than at the next poll."""
        self._wake.set()

    async def close(self) -> None:
        try:
            if self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        finally:
            if self._http is not None:
                await self._http.close()

    async def _deliver_forever(self) -> None:
        claim_ms = int((2 * self.settings.timeout_seconds + CLAIM_MARGIN_SECONDS) * 1000)
        while True:
            try:
                due = await self.store.due_webhooks(self.settings.max_in_flight, claim_ms=claim_ms)
            except Exception as error:
                # Unreachable, or answering with an error (a Redis still LOADING its AOF, READONLY after a
                # failover): the sender goes on, whatever the store said; what is owed stays in the outbox.
                log.warning("webhook outbox unreadable (%s); trying again", error)
                due = []
            if due:
                await asyncio.gather(*(self._deliver(entry) for entry in due))
                if len(due) == self.settings.max_in_flight:
                    continue  # there may be more due already
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_seconds)
            self._wake.clear()

    async def _deliver(self, entry: OutboxEntry) -> None:
        try:
            delivery = Delivery.of(entry)
        except (ValueError, KeyError, TypeError):
            log.error("webhook outbox entry of %s is unreadable; dropping it", entry.response_id)
            await self._settle(entry, done=True)
            return
        endpoint = self._endpoints.get(delivery.endpoint)
        age = max(time.time() - delivery.created_at, 0.0)
        if endpoint is None:
            # Another instance may know it (a rolling deploy that adds one): left for it, not deleted; given up
            # only as any delivery is, once it has been owed for give_up_after_seconds.
            if age >= self.settings.give_up_after_seconds:
                log.error(
                    "webhook %s for %s: endpoint %r unknown here; given up",
                    delivery.webhook_id,
                    delivery.response_id,
                    delivery.endpoint,
                )
                self._observed("given_up", age)
                await self._settle(entry, done=True)
            else:
                await self._settle(entry, done=False, delay_seconds=self.settings.max_retry_seconds)
            return
        outcome = await self._attempt(delivery, endpoint)
        if outcome is None:
            log.info(
                "webhook %s (%s of %s) delivered to %s after %.1fs",
                delivery.webhook_id,
                delivery.event_type,
                delivery.response_id,
                endpoint.name,
                age,
            )
            self._observed("delivered", age)
            await self._settle(entry, done=True)
        elif age >= self.settings.give_up_after_seconds:
            log.error(
                "webhook %s (%s of %s) to %s given up after %.0fs: %s",
                delivery.webhook_id,
                delivery.event_type,
                delivery.response_id,
                endpoint.name,
                age,
                outcome,
            )
            self._observed("given_up", age)
            await self._settle(entry, done=True)
        else:
            delay = retry_delay(age, self.settings)
            log.warning(
                "webhook %s (%s of %s) to %s failed (%s); retrying in %.1fs",
                delivery.webhook_id,
                delivery.event_type,
                delivery.response_id,
                endpoint.name,
                outcome,
                delay,
            )
            self._observed("retried", age)
            await self._settle(entry, done=False, delay_seconds=delay)

    async def _attempt(self, delivery: Delivery, endpoint: WebhookEndpoint) -> str | None:
        """One POST; None when the receiver took it (2xx), else why not."""
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.settings.timeout_seconds))
        body = delivery.body()
        headers = {
            "content-type": "application/json",
            "user-agent": self.settings.user_agent,
            **signature_headers(delivery.webhook_id, int(time.time()), body, endpoint.secret),
        }
        try:
            async with self._http.post(endpoint.url, data=body, headers=headers, allow_redirects=False) as reply:
                await reply.read()
                return None if 200 <= reply.status < 300 else f"HTTP {reply.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            # The kind only: an error's text can quote the endpoint's URL, credentials in its query included.
            return type(error).__name__

    async def _settle(self, entry: OutboxEntry, *, done: bool, delay_seconds: float = 0.0) -> None:
        """Record the attempt's outcome; a store that cannot take it leaves the entry claimed, due again later."""
        try:
            if done:
                await self.store.webhook_done(entry)
            else:
                await self.store.retry_webhook(entry, delay_ms=int(delay_seconds * 1000))
        except Exception as error:  # as in the loop: any store failure leaves the entry claimed, due again later
            log.warning(
                "webhook outbox unreachable (%s); the webhook of %s is due again when its claim lapses",
                error,
                entry.response_id,
            )

    def _observed(self, result: WebhookResult, age: float) -> None:
        if self.metrics is not None:
            self.metrics.webhook_delivery(result, age if result == "delivered" else None)
