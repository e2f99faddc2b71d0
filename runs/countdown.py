"""A count of things still awaited, each arrival said once by a callback of its own."""

from __future__ import annotations

from collections.abc import Callable


class Countdown:
    """`add()` counts one more awaited thing and returns the callback that says it has come (only that callback's
    first call counts, so an arrival said twice, from a success and a `finally`, is counted once); `at_zero` runs
    whenever the count goes back to zero."""

    __slots__ = ("_at_zero", "count")

    def __init__(self, at_zero: Callable[[], None]) -> None:
        self._at_zero = at_zero
        self.count = 0

    def add(self) -> Callable[[], None]:
        self.count += 1
        counted = True

        def arrived() -> None:
            nonlocal counted
            if counted:
                counted = False
                self.count -= 1
                if self.count == 0:
                    self._at_zero()

        return arrived
