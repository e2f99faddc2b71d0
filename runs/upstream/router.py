"""Pick the upstream for a request's model by the configured glob patterns; own the adapters' lifetimes."""

from __future__ import annotations

from fnmatch import fnmatchcase

from runs.errors import NotFound
from runs.upstream.base import Upstream, UpstreamSpec
from runs.upstream.chat import ChatUpstream
from runs.upstream.responses import ResponsesUpstream


def build_upstream(spec: UpstreamSpec) -> Upstream:
    """The adapter for one configured provider."""
    if spec.kind == "responses":
        return ResponsesUpstream(spec)
    return ChatUpstream(spec)


class UpstreamRouter:
    """Upstreams in configuration order; the first whose patterns match the model serves it."""

    def __init__(self, upstreams: list[Upstream]) -> None:
        self._upstreams = upstreams

    @classmethod
    def from_specs(cls, specs: list[UpstreamSpec]) -> UpstreamRouter:
        return cls([build_upstream(spec) for spec in specs])

    @property
    def upstreams(self) -> list[Upstream]:
        return list(self._upstreams)

    def route(self, model: str) -> Upstream:
        """The upstream for `model`, or 404 `model_not_found`."""
        for upstream in self._upstreams:
            if model in upstream.spec.model_map or any(fnmatchcase(model, pattern) for pattern in upstream.spec.models):
                return upstream
        raise NotFound(
            f"The model '{model}' does not exist or is not served by this gateway.",
            param="model",
            code="model_not_found",
        )

    async def close(self) -> None:
        for upstream in self._upstreams:
            await upstream.close()
