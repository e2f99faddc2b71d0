"""Pick the upstream for a request's model by the configured glob patterns; own the adapters' lifetimes."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from fnmatch import fnmatchcase

from runs.errors import NotFound
from runs.upstream.base import Upstream, UpstreamSpec
from runs.upstream.chat import ChatUpstream
from runs.upstream.responses import ResponsesUpstream

log = logging.getLogger(__name__)

# Provider model lists are asked for at most this often, and waited for at most this long.
MODEL_LIST_TTL_SECONDS = 60.0
MODEL_LIST_TIMEOUT_SECONDS = 5.0
_GLOB_CHARACTERS = frozenset("*?[")


@dataclass(frozen=True, slots=True)
class RoutableModel:
    """A model a client may ask for, and the upstream that serves it."""

    id: str
    upstream: str


def build_upstream(spec: UpstreamSpec) -> Upstream:
    """The adapter for one configured provider."""
    if spec.kind == "responses":
        return ResponsesUpstream(spec)
    return ChatUpstream(spec)


class UpstreamRouter:
    """Upstreams in configuration order; the first whose patterns match the model serves it."""

    def __init__(self, upstreams: list[Upstream]) -> None:
        self._upstreams = upstreams
        self._listed: tuple[float, list[RoutableModel]] | None = None

    @classmethod
    def from_specs(cls, specs: list[UpstreamSpec]) -> UpstreamRouter:
        return cls([build_upstream(spec) for spec in specs])

    @property
    def upstreams(self) -> list[Upstream]:
        return list(self._upstreams)

    def route(self, model: str) -> Upstream:
        """The upstream for `model`, or 404 `model_not_found`."""
        upstream = self._serving(model)
        if upstream is not None:
            return upstream
        raise NotFound(
            f"The model '{model}' does not exist or is not served by this gateway.",
            param="model",
            code="model_not_found",
        )

    def _serving(self, model: str) -> Upstream | None:
        for upstream in self._upstreams:
            if model in upstream.spec.model_map or any(fnmatchcase(model, pattern) for pattern in upstream.spec.models):
                return upstream
        return None

    async def routable_models(self) -> list[RoutableModel]:
        """Every model id a request may name, in routing order: the exact names and `model_map` entries of each
        upstream, and what a provider lists that its glob patterns admit (cached for a minute; a provider that
        cannot be asked contributes its exact names only)."""
        now = time.monotonic()
        if self._listed is not None and now - self._listed[0] < MODEL_LIST_TTL_SECONDS:
            return self._listed[1]
        listings = await asyncio.gather(*(self._provider_listing(upstream) for upstream in self._upstreams))
        models: list[RoutableModel] = []
        seen: set[str] = set()
        for upstream, listed in zip(self._upstreams, listings, strict=True):
            spec = upstream.spec
            exact = [pattern for pattern in spec.models if not _GLOB_CHARACTERS & set(pattern)]
            # A listed model that no pattern of this upstream admits (or that an earlier upstream takes) is left
            # out: a request naming it would not reach this provider.
            for model in [*exact, *spec.model_map, *listed]:
                if model not in seen and self._serving(model) is upstream:
                    seen.add(model)
                    models.append(RoutableModel(model, spec.name))
        self._listed = (now, models)
        return models

    async def _provider_listing(self, upstream: Upstream) -> list[str]:
        if all(not _GLOB_CHARACTERS & set(pattern) for pattern in upstream.spec.models):
            return []
        try:
            return await asyncio.wait_for(upstream.list_models(), MODEL_LIST_TIMEOUT_SECONDS)
        except Exception as error:
            log.warning("could not list the models of upstream %s: %s", upstream.spec.name, error)
            return []

    async def close(self) -> None:
        for upstream in self._upstreams:
            await upstream.close()
