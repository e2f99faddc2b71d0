"""Token usage as the SDK's `ResponseUsage` has it: made complete, and added up."""

from __future__ import annotations

from typing import Any

Json = dict[str, Any]


def complete_usage(usage: Any) -> Json | None:
    """An upstream's `usage` with every count the SDK's model requires: providers (and older OpenAI versions)
    leave out details such as `cache_write_tokens`; a missing count is 0, a usage that is not an object is none."""
    if not isinstance(usage, dict):
        return None
    input_details = _object(usage.get("input_tokens_details"))
    output_details = _object(usage.get("output_tokens_details"))
    input_tokens = _count(usage.get("input_tokens"))
    output_tokens = _count(usage.get("output_tokens"))
    return {
        **usage,
        "input_tokens": input_tokens,
        "input_tokens_details": {
            **input_details,
            "cached_tokens": _count(input_details.get("cached_tokens")),
            "cache_write_tokens": _count(input_details.get("cache_write_tokens")),
        },
        "output_tokens": output_tokens,
        "output_tokens_details": {
            **output_details,
            "reasoning_tokens": _count(output_details.get("reasoning_tokens")),
        },
        "total_tokens": _count(usage.get("total_tokens")) or input_tokens + output_tokens,
    }


def _object(value: Any) -> Json:
    return value if isinstance(value, dict) else {}


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def add_usage(first: Json | None, second: Json | None) -> Json | None:
    """Two usages as one: a turn that compacted reports both model calls."""
    if first is None or second is None:
        return first or second
    total = complete_usage(first) or {}
    other = complete_usage(second) or {}
    return {
        **total,
        "input_tokens": total["input_tokens"] + other["input_tokens"],
        "input_tokens_details": {
            **total["input_tokens_details"],
            "cached_tokens": total["input_tokens_details"]["cached_tokens"]
            + other["input_tokens_details"]["cached_tokens"],
            "cache_write_tokens": total["input_tokens_details"]["cache_write_tokens"]
            + other["input_tokens_details"]["cache_write_tokens"],
        },
        "output_tokens": total["output_tokens"] + other["output_tokens"],
        "output_tokens_details": {
            **total["output_tokens_details"],
            "reasoning_tokens": total["output_tokens_details"]["reasoning_tokens"]
            + other["output_tokens_details"]["reasoning_tokens"],
        },
        "total_tokens": total["total_tokens"] + other["total_tokens"],
    }
