"""API keys: who is calling (their tenant), checked by hash in constant time; raw keys are never kept."""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway.config import AuthConfig
from runs.errors import Unauthorized

log = logging.getLogger(__name__)

DEFAULT_TENANT = "default"
# Routes anyone may call: probes, for load balancers and orchestrators.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller: its tenant, its own limits, and (in memory only, for pass-through upstreams) its key."""

    tenant: str
    max_concurrent_runs: int | None = None
    api_key: str | None = None


@dataclass(frozen=True, slots=True)
class _KnownKey:
    key_hash: bytes
    tenant: str
    max_concurrent_runs: int | None


PRINCIPAL = web.RequestKey("principal", Principal)


class Authenticator:
    """Maps `Authorization: Bearer <key>` to a Principal. Every configured hash is compared, in constant time, so
    neither timing nor early exit tells which keys exist."""

    def __init__(self, config: AuthConfig) -> None:
        self.enabled = config.enabled
        self._keys = [
            _KnownKey(bytes.fromhex(key.key_hash()), key.tenant, key.max_concurrent_runs) for key in config.keys
        ]

    def authenticate(self, authorization: str | None) -> Principal:
        if not self.enabled:
            return Principal(DEFAULT_TENANT)
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise Unauthorized(
                "You didn't provide an API key. You need to provide your API key in an Authorization header using "
                "Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                code="missing_api_key",
            )
        # A header byte that is not UTF-8 reaches here as a lone surrogate: hashed as it is, it matches no key.
        digest = hashlib.sha256(presented.strip().encode("utf-8", "surrogatepass")).digest()
        match: _KnownKey | None = None
        for known in self._keys:
            if hmac.compare_digest(digest, known.key_hash):
                match = known
        if match is None:
            raise Unauthorized("Incorrect API key provided.")
        return Principal(match.tenant, match.max_concurrent_runs, presented.strip())


def auth_middleware(authenticator: Authenticator, public_paths: frozenset[str] = PUBLIC_PATHS) -> Middleware:
    """Sets request[PRINCIPAL] on every route but the public ones (the probes, and /metrics unless configured
    otherwise); 401 (in the error envelope) when auth fails."""

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in public_paths:
            request[PRINCIPAL] = authenticator.authenticate(request.headers.get("Authorization"))
        return await handler(request)

    return authenticate
