"""The store as the runs layer hands it to the HTTP layer: opened once, typed for app state, and its outage error."""

from __future__ import annotations

import asyncio

from storage.base import ResponseRecord, Store, StoredEvent, StoreUnavailable
from storage.factory import STORAGE_URL_PREFIXES, open_store

__all__ = [
    "STORAGE_URL_PREFIXES",
    "ResponseRecord",
    "Store",
    "StoreUnavailable",
    "StoredEvent",
    "check_reachable",
    "open_store",
]


async def check_reachable(store: Store, *, timeout_seconds: float) -> None:
    """Return once the store answers a ping; raise (TimeoutError, StoreUnavailable, …) when it does not in time."""
    await asyncio.wait_for(store.ping(), timeout_seconds)
