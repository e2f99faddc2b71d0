"""Named boundaries between the lifecycle's store steps, where tests stop or kill a gateway to prove that no
interleaving leaves a response stuck."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Awaitable, Callable, Iterable

from storage.base import Store

log = logging.getLogger(__name__)

# Every boundary the lifecycle announces, in the order a run meets them. A test hook (in-process) or the
# environment variable below (a real process) can act at any of them.
BOUNDARIES = (
    "admit.key_claimed",  # the Idempotency-Key names the new response, which does not exist yet
    "admit.created",  # the response is stored and indexed or queued; its conversation turn is not taken yet
    "admit.turn_taken",  # the turn is taken; the run has not started
    "start.claimed",  # a queued or orphaned response is claimed; nothing written under the new lease yet
    "run.compacting",  # a compacting turn's compaction item is announced and stored; no summary asked for yet
    "run.compacted",  # the compaction item is stored whole; the compacted context not yet sent to the provider
    "run.output",  # the first output event is stored
    "finish.terminal_stored",  # the terminal event is stored; its follow-ups are not done
    "finish.turn_ended",  # the conversation turn is released; the index and idempotency key not yet settled
    "finish.steers_resolved",  # queued steering is resolved (its successor queued); the index not yet settled
    "cancel.flagged",  # the cancel request is stored; nobody has acted on it yet
)

# `GATEWAY_FAULT_KILL_AT=admit.created,finish.terminal_stored`: the process SIGKILLs itself on reaching one of
# them, exactly like a crash there. For the fault-injection tests only.
KILL_AT_ENV = "GATEWAY_FAULT_KILL_AT"

Hook = Callable[[str, str], Awaitable[None]]


class FaultPoints:
    """What happens at each boundary: nothing, unless a test installed a hook for it."""

    def __init__(
        self, hooks: dict[str, Hook] | None = None, wrap_store: Callable[[Store], Store] | None = None
    ) -> None:
        self.hooks: dict[str, Hook] = dict(hooks or {})
        # A test may put a store that fails chosen steps in front of the real one.
        self.wrap_store = wrap_store
        unknown = set(self.hooks) - set(BOUNDARIES)
        if unknown:
            raise ValueError(f"unknown fault boundaries: {sorted(unknown)}")

    @classmethod
    def from_environment(cls) -> FaultPoints:
        names = [name.strip() for name in os.environ.get(KILL_AT_ENV, "").split(",") if name.strip()]
        if names:
            log.warning("fault injection on: this process kills itself at %s", ", ".join(names))
        return cls(dict.fromkeys(names, _kill_self))

    def set(self, boundaries: Iterable[str], hook: Hook) -> None:
        for boundary in boundaries:
            if boundary not in BOUNDARIES:
                raise ValueError(f"unknown fault boundary: {boundary}")
            self.hooks[boundary] = hook

    async def reach(self, boundary: str, response_id: str) -> None:
        """Called by the lifecycle between two store steps."""
        hook = self.hooks.get(boundary)
        if hook is not None:
            await hook(boundary, response_id)


async def _kill_self(boundary: str, response_id: str) -> None:
    log.warning("fault injection: killing this process at %s (%s)", boundary, response_id)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)
