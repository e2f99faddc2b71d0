"""Idempotency-Key: validating the key, fingerprinting the request, and the claim that allows one run per key."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import orjson

from runs.errors import Conflict, InvalidRequest, UnprocessableEntity
from runs.request import CreateResponseRequest
from storage.base import IdempotencyClaim, Store

log = logging.getLogger(__name__)

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255
# The scope of keys until tenants exist: a key is unique per scope, never across scopes.
DEFAULT_SCOPE = "default"
# A claim whose response still does not exist after this long was abandoned (its admitter died or failed
# between claiming and creating): a retry may take it over. Longer than the slowest admission that can still
# succeed (a pool wait plus a command timeout, 10 s each), so a live admitter is never overtaken.
ABANDONED_CLAIM_MS = 60_000
# How long a concurrent retry waits for the winner to finish creating the response before answering 409.
CLAIM_WAIT_SECONDS = 5.0
CLAIM_POLL_SECONDS = 0.02

# Fields that only choose how the answer is delivered, not what is asked: a retry may switch them.
_DELIVERY_FIELDS = frozenset({"stream", "stream_options"})
# Values equal to the API's defaults are dropped, so `"store": true` and no `store` fingerprint alike.
_DEFAULTS: dict[str, Any] = {
    "store": True,
    "background": False,
    "parallel_tool_calls": True,
    "tool_choice": "auto",
    "truncation": "disabled",
    "service_tier": "auto",
}


def check_key(value: str) -> str:
    """The key if it is 1-255 printable ASCII characters (no CR/LF or other controls); else a 400."""
    if not 1 <= len(value) <= MAX_KEY_LENGTH or not all(" " <= char <= "~" for char in value):
        raise InvalidRequest(
            f"The {HEADER} header must be 1 to {MAX_KEY_LENGTH} printable ASCII characters.",
            param=HEADER,
            code="invalid_idempotency_key",
        )
    return value


def fingerprint(request: CreateResponseRequest) -> str:
    """SHA-256 of the canonical request: sorted keys, defaults and empty values dropped, delivery options left
    out. Nothing random or server-generated goes in, so the same request built twice gives the same value."""
    body = request.model_dump(mode="json", exclude=set(_DELIVERY_FIELDS))
    canonical = {
        name: value
        for name, value in body.items()
        if value is not None and value != {} and value != [] and _DEFAULTS.get(name, object()) != value
    }
    return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    """A validated key, where it is unique, and the fingerprint of the request that carries it."""

    scope: str
    key: str
    fingerprint: str
    ttl_seconds: int

    @classmethod
    def for_request(
        cls, header_value: str, request: CreateResponseRequest, *, ttl_seconds: int, scope: str = DEFAULT_SCOPE
    ) -> IdempotencyKey:
        if not request.is_stored:
            raise InvalidRequest(
                f"{HEADER} needs store=true: a response that is not stored cannot be replayed.",
                param=HEADER,
                code="idempotency_requires_store",
            )
        return cls(scope, check_key(header_value), fingerprint(request), ttl_seconds)


async def holder_response_id(store: Store, idempotency: IdempotencyKey, existing: IdempotencyClaim) -> str | None:
    """The response of the request that holds the key, once it exists. None when the claim was abandoned and may
    be taken over. Raises 422 for a different request under the same key, 409 while the holder is still being
    admitted after CLAIM_WAIT_SECONDS."""
    if existing.fingerprint != idempotency.fingerprint:
        raise UnprocessableEntity(
            f"This {HEADER} was already used with a different request body.",
            param=HEADER,
            code="idempotency_key_reused",
            headers={"x-should-retry": "false"},
        )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CLAIM_WAIT_SECONDS
    while True:
        if await store.get_response(existing.response_id) is not None:
            return existing.response_id
        if time.time() * 1000 - existing.claimed_at_ms > ABANDONED_CLAIM_MS:
            return None
        if loop.time() > deadline:
            raise Conflict(
                f"A request with this {HEADER} is still being started; retry shortly.",
                param=HEADER,
                code="idempotency_key_in_use",
                headers={"retry-after-ms": "500"},
            )
        await asyncio.sleep(CLAIM_POLL_SECONDS)


async def claim_key(store: Store, idempotency: IdempotencyKey, response_id: str) -> str | None:
    """Claim the key for `response_id`: None when this request may go on and create it; else the response an
    earlier request with the same key created, to replay. An abandoned claim (its response never appeared) is
    taken over; when another retry takes it over first, the claim is tried again."""
    while True:
        existing = await store.claim_idempotency_key(
            idempotency.scope,
            idempotency.key,
            fingerprint=idempotency.fingerprint,
            response_id=response_id,
            ttl_seconds=idempotency.ttl_seconds,
        )
        if existing is None:
            return None
        holder = await holder_response_id(store, idempotency, existing)
        if holder is not None:
            return holder
        claim = IdempotencyClaim(idempotency.fingerprint, response_id, int(time.time() * 1000))
        if await store.replace_idempotency_claim(
            idempotency.scope,
            idempotency.key,
            expected_response_id=existing.response_id,
            claim=claim,
            ttl_seconds=idempotency.ttl_seconds,
        ):
            log.warning("took over an abandoned idempotency claim for %s", existing.response_id)
            return None


async def release_after_refusal(store: Store, idempotency: IdempotencyKey, response_id: str) -> None:
    """Free the key of a response the provider refused before any output: the caller gets the provider's error,
    and its retry (the SDK retries 429 and 5xx by itself) must start afresh rather than be handed this failed
    response with a 200."""
    await store.release_idempotency_key(idempotency.scope, idempotency.key, response_id=response_id)
