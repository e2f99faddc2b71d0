"""Run slots: how many runs this instance may execute at once, in all and per API key."""

from __future__ import annotations

from collections import Counter


class RunSlots:
    """Run slots of this instance, per instance and per tenant. Taken synchronously, before the first await of an
    admission or a start, so concurrent requests can never overbook them; given back when the run ends or the
    admission does not start one."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.taken = 0
        self.by_tenant: Counter[str] = Counter()

    @property
    def free(self) -> int:
        return max(self.capacity - self.taken, 0)

    def take(self, tenant: str) -> None:
        self.taken += 1
        self.by_tenant[tenant] += 1

    def give_back(self, tenant: str) -> None:
        self.taken -= 1
        self.by_tenant[tenant] -= 1
        if not self.by_tenant[tenant]:
            del self.by_tenant[tenant]
