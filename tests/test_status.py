"""The status lifecycle, and that every copy of the terminal set (Python and Lua) agrees."""

from __future__ import annotations

from importlib import resources

import pytest

from runs.status import ACTIVE, TERMINAL, InvalidTransition, ResponseStatus, check_transition
from storage.base import TERMINAL_STATUSES


def test_storage_and_runs_agree_on_terminal_statuses() -> None:
    assert {status.value for status in TERMINAL} == set(TERMINAL_STATUSES)
    assert set(ResponseStatus) == TERMINAL | ACTIVE


@pytest.mark.parametrize("script", ["append_events.lua", "delete_response.lua", "request_cancel.lua"])
def test_lua_scripts_name_the_same_statuses(script: str) -> None:
    text = (resources.files("storage") / "lua" / script).read_text()
    named = {status.value for status in ResponseStatus if f"'{status.value}'" in text}
    assert named in ({s.value for s in TERMINAL}, {s.value for s in ACTIVE}), (script, named)


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
