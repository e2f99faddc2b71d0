"""The status lifecycle, and that every copy of the terminal set (Python and Lua) agrees."""

from __future__ import annotations

from importlib import resources

import pytest
import redis.asyncio as aioredis

from runs.status import ACTIVE, TERMINAL, InvalidTransition, ResponseStatus, check_transition
from storage.redis_support import load_lua
from storage.status import TERMINAL_STATUSES

LUA_SCRIPTS = sorted(path.name for path in (resources.files("storage") / "lua").iterdir() if path.name.endswith(".lua"))


def test_one_status_vocabulary() -> None:
    assert {status.value for status in TERMINAL} == set(TERMINAL_STATUSES)
    assert set(ResponseStatus) == TERMINAL | ACTIVE


@pytest.mark.parametrize("script", LUA_SCRIPTS)
def test_no_lua_script_spells_a_status(script: str) -> None:
    """The scripts receive the vocabulary (storage.status.lua_preamble); a status spelled in one could drift."""
    text = (resources.files("storage") / "lua" / script).read_text()
    assert {status.value for status in ResponseStatus if f"'{status.value}'" in text} == set(), script


@pytest.mark.parametrize("script", LUA_SCRIPTS)
async def test_every_lua_script_compiles_and_is_registered(script: str, redis_client: aioredis.Redis) -> None:
    """Each script, with its preamble, compiles on a real Redis, and the Redis store registers it (the contract
    suite then runs each through the store's own calls, on both backends)."""
    assert await redis_client.script_load(load_lua(script))
    sources = "".join(
        (resources.files("storage") / name).read_text()
        for name in ("redis.py", "redis_conversations.py", "redis_appends.py", "redis_runs.py", "redis_webhooks.py")
    )
    assert f'load_lua("{script}")' in sources


@pytest.mark.parametrize(
    ("current", "new", "allowed"),
    [
        (ResponseStatus.QUEUED, ResponseStatus.IN_PROGRESS, True),
        (ResponseStatus.QUEUED, ResponseStatus.CANCELLED, True),
        (ResponseStatus.IN_PROGRESS, ResponseStatus.COMPLETED, True),
        (ResponseStatus.IN_PROGRESS, ResponseStatus.QUEUED, False),
        (ResponseStatus.COMPLETED, ResponseStatus.FAILED, False),
        (ResponseStatus.CANCELLED, ResponseStatus.CANCELLED, False),
    ],
)
def test_transitions(current: ResponseStatus, new: ResponseStatus, allowed: bool) -> None:
    if allowed:
        check_transition(current, new)
    else:
        with pytest.raises(InvalidTransition):
            check_transition(current, new)
