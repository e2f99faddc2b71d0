"""Cursor pagination as the OpenAI list endpoints do it: `after`, `limit` (1-100), `order` (`asc` | `desc`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from runs.errors import InvalidRequest

DEFAULT_LIMIT = 20
MAX_LIMIT = 100


def list_object(data: Sequence[dict[str, Any]], *, has_more: bool) -> dict[str, Any]:
    """The OpenAI list object around one page of items that have ids."""
    return {
        "object": "list",
        "data": list(data),
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


@dataclass(frozen=True, slots=True)
class PageQuery:
    """A validated page request."""

    after: str | None
    limit: int
    order: str

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> PageQuery:
        """Parse and check the query string; a bad value is a 400 naming the parameter."""
        raw_limit = query.get("limit")
        limit = DEFAULT_LIMIT
        if raw_limit is not None:
            try:
                limit = int(raw_limit)
            except ValueError:
                raise InvalidRequest("Invalid value for 'limit': expected an integer.", param="limit") from None
            if not 1 <= limit <= MAX_LIMIT:
                raise InvalidRequest(f"Invalid value for 'limit': must be between 1 and {MAX_LIMIT}.", param="limit")
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise InvalidRequest("Invalid value for 'order': expected 'asc' or 'desc'.", param="order")
        after = query.get("after") or None
        return cls(after=after, limit=limit, order=order)

    def page(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The list object for `items` (stored oldest first), each of which has an `id`."""
        ordered = list(items) if self.order == "asc" else list(reversed(items))
        start = 0
        if self.after is not None:
            ids = [item.get("id") for item in ordered]
            if self.after not in ids:
                raise InvalidRequest(f"No item with id '{self.after}' in this list.", param="after")
            start = ids.index(self.after) + 1
        return list_object(ordered[start : start + self.limit], has_more=start + self.limit < len(ordered))
