"""Deterministic JSON values valid for a JSON schema: simulated tool arguments and structured outputs.

Covers what function ``parameters`` and Structured Outputs use (and what pydantic emits): ``type`` (one or a
list), ``properties``/``required``/``additionalProperties``/``min``-``maxProperties``, ``items``/``prefixItems``/
``min``-``maxItems``/``uniqueItems``, ``enum``, ``const``, ``anyOf``/``oneOf`` (the first branch), ``allOf``
(merged), local ``$ref`` (``#/$defs/...``, ``#/definitions/...``), string ``format`` and lengths, and numeric
bounds with ``multipleOf``. ``pattern`` cannot be honoured in general and is ignored.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from simulator.text import VOCABULARY

# Recursive schemas (a tree of nodes) end here: optional branches are left out, arrays left empty.
MAX_DEPTH = 6
# Arrays hold this many items when the schema leaves it open, enough to show the shape.
DEFAULT_ARRAY_ITEMS = 2
# Numbers are picked from [minimum, minimum + this] when only one bound or none is given.
DEFAULT_NUMBER_SPAN = 100

_FORMATS: Mapping[str, str] = {
    "date-time": "2024-05-17T12:30:00Z",
    "date": "2024-05-17",
    "time": "12:30:00",
    "duration": "P1D",
    "email": "{word}@example.com",
    "idn-email": "{word}@example.com",
    "hostname": "{word}.example.com",
    "idn-hostname": "{word}.example.com",
    "ipv4": "192.0.2.7",
    "ipv6": "2001:db8::7",
    "uri": "https://example.com/{word}",
    "iri": "https://example.com/{word}",
    "uri-reference": "https://example.com/{word}",
    "url": "https://example.com/{word}",
}

Json = Any


def schema_value(schema: Any, seed: str) -> Json:
    """A JSON value valid for ``schema``, the same for the same schema and ``seed``."""
    root = schema if isinstance(schema, Mapping) else {}
    return _Generator(root, seed).value(schema, "$", 0)


@dataclass(frozen=True, slots=True)
class _Generator:
    root: Mapping[str, Any]
    seed: str

    def _pick(self, path: str, count: int) -> int:
        """A stable choice in ``range(count)`` for the value at ``path``."""
        digest = hashlib.sha256(f"{self.seed}\n{path}".encode()).digest()
        return int.from_bytes(digest[:8], "big") % max(count, 1)

    def _word(self, path: str) -> str:
        return VOCABULARY[self._pick(path, len(VOCABULARY))]

    def _resolve(self, schema: Any, depth: int) -> Mapping[str, Any]:
        """``schema`` with local ``$ref``s followed and ``allOf`` merged in; ``true``/missing is ``{}``."""
        if not isinstance(schema, Mapping):
            return {}
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#") and depth <= MAX_DEPTH * 4:
            target: Any = self.root
            for token in ref.removeprefix("#").strip("/").split("/") if ref != "#" else ():
                token = token.replace("~1", "/").replace("~0", "~")
                target = target.get(token) if isinstance(target, Mapping) else None
            # Keywords beside the $ref (a description, a default) refine it, as in JSON Schema 2019+.
            siblings = {key: value for key, value in schema.items() if key != "$ref"}
            return self._resolve({**self._resolve(target, depth + 1), **siblings}, depth + 1)
        parts = schema.get("allOf")
        if isinstance(parts, list) and parts:
            merged: dict[str, Any] = {key: value for key, value in schema.items() if key != "allOf"}
            for part in (self._resolve(part, depth + 1) for part in parts):
                for key, value in part.items():
                    if key == "properties" and isinstance(value, Mapping):
                        merged["properties"] = {**merged.get("properties", {}), **value}
                    elif key == "required" and isinstance(value, list):
                        merged["required"] = [*merged.get("required", []), *value]
                    else:
                        merged.setdefault(key, value)
            return merged
        return schema

    def value(self, raw_schema: Any, path: str, depth: int) -> Json:
        schema = self._resolve(raw_schema, depth)
        if "const" in schema:
            return schema["const"]
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return enum[self._pick(path, len(enum))]
        for key in ("anyOf", "oneOf"):
            branches = schema.get(key)
            if isinstance(branches, list) and branches:
                base = {name: value for name, value in schema.items() if name != key}
                # One level deeper, so a branch that refers back to this schema still ends at MAX_DEPTH.
                chosen = self._resolve(self._branch(branches, depth), depth)
                return self.value({**base, **chosen}, path, depth + 1)
        kind = self._type(schema)
        if kind == "object":
            return self._object(schema, path, depth)
        if kind == "array":
            return self._array(schema, path, depth)
        if kind == "string":
            return self._string(schema, path)
        if kind in ("integer", "number"):
            return self._number(schema, path, integer=kind == "integer")
        if kind == "boolean":
            return self._pick(path, 2) == 1
        if kind == "null":
            return None
        return self._word(path)  # an empty schema admits anything

    def _branch(self, branches: list[Any], depth: int) -> Any:
        """The first branch, except that deep in a recursive schema a ``null`` branch ends the recursion."""
        if depth >= MAX_DEPTH:
            for branch in branches:
                if self._type(self._resolve(branch, depth)) == "null":
                    return branch
        return branches[0]

    @staticmethod
    def _type(schema: Mapping[str, Any]) -> str | None:
        kind = schema.get("type")
        if isinstance(kind, list):
            # A nullable type (["string", "null"]) gets a real value; null only when it is all there is.
            kinds = [k for k in kind if k != "null"] or kind
            kind = kinds[0] if kinds else None
        if isinstance(kind, str):
            return kind
        if "properties" in schema or "additionalProperties" in schema or "required" in schema:
            return "object"
        if "items" in schema or "prefixItems" in schema:
            return "array"
        return None

    def _object(self, schema: Mapping[str, Any], path: str, depth: int) -> dict[str, Json]:
        properties = schema.get("properties")
        properties = properties if isinstance(properties, Mapping) else {}
        required = [name for name in schema.get("required") or [] if isinstance(name, str)]
        extra = schema.get("additionalProperties", True)
        # Required names first, then the optional ones (left out deep in a recursive schema).
        names = list(dict.fromkeys([*required, *(() if depth >= MAX_DEPTH else properties)]))
        max_properties = _whole(schema, "maxProperties")
        if max_properties is not None:
            names = [*required, *[name for name in names if name not in required]][: max(max_properties, len(required))]
        result: dict[str, Json] = {}
        for name in names:
            sub_schema = properties.get(name, extra if isinstance(extra, Mapping) else {})
            result[name] = self.value(sub_schema, f"{path}.{name}", depth + 1)
        wanted = _whole(schema, "minProperties") or 0
        # A map (no declared properties, a schema for the rest) gets one entry to show its value shape.
        if not properties and isinstance(extra, Mapping) and extra and depth < MAX_DEPTH:
            wanted = max(wanted, 1)
        if extra is not False:
            extra_schema = extra if isinstance(extra, Mapping) else {}
            index = 0
            while len(result) < wanted:
                key = f"{self._word(f'{path}#{index}')}_{index}"
                result.setdefault(key, self.value(extra_schema, f"{path}.{key}", depth + 1))
                index += 1
        return result

    def _array(self, schema: Mapping[str, Any], path: str, depth: int) -> list[Json]:
        prefix = schema.get("prefixItems")
        prefix = prefix if isinstance(prefix, list) else []
        items = schema.get("items", {})
        if isinstance(items, list):  # draft-07 tuple form
            prefix, items = items, schema.get("additionalItems", {})
        min_items = _whole(schema, "minItems") or 0
        max_items = _whole(schema, "maxItems")
        count = min_items if depth >= MAX_DEPTH else max(min_items, DEFAULT_ARRAY_ITEMS, len(prefix))
        if items is False:
            count = min(count, len(prefix))
        if max_items is not None:
            count = min(count, max_items)
        result: list[Json] = []
        unique = bool(schema.get("uniqueItems"))
        attempt = 0
        while len(result) < count and attempt < count * 4:
            index = len(result)
            item_schema = prefix[index] if index < len(prefix) else items
            item = self.value(item_schema, f"{path}[{index}]#{attempt}" if attempt else f"{path}[{index}]", depth + 1)
            attempt += 1
            if unique and item in result:
                continue  # try another seed; give up (fewer items) if the schema has too few distinct values
            result.append(item)
        return result

    def _string(self, schema: Mapping[str, Any], path: str) -> str:
        word = self._word(path)
        fmt = schema.get("format")
        if fmt == "uuid":
            text = str(uuid.UUID(bytes=hashlib.sha256(f"{self.seed}\n{path}".encode()).digest()[:16], version=4))
        elif isinstance(fmt, str) and fmt in _FORMATS:
            text = _FORMATS[fmt].format(word=word)
        else:
            text = word
        min_length = _whole(schema, "minLength")
        if min_length is not None and len(text) < min_length:
            text = (text + " " + word) * (min_length // (len(word) + 1) + 1)
            text = text[:min_length]
        max_length = _whole(schema, "maxLength")
        if max_length is not None:
            text = text[:max_length]
        return text

    def _number(self, schema: Mapping[str, Any], path: str, *, integer: bool) -> int | float:
        low, high = _bounds(schema, integer=integer)
        step = _real(schema, "multipleOf")
        if step is not None and step > 0:
            if isinstance(step, float) and not step.is_integer():
                # A float product (3 * 0.1) is rarely an exact multiple to a validator; zero always is.
                if low <= 0 <= high:
                    return 0 if integer else 0.0
                return math.ceil(low / step) * step
            first, last = math.ceil(low / step), math.floor(high / step)
            return (first + self._pick(path, max(min(last - first, DEFAULT_NUMBER_SPAN), 0) + 1)) * int(step)
        if integer:
            first_int, last_int = math.ceil(low), math.floor(high)
            return first_int + self._pick(path, max(last_int - first_int, 0) + 1)
        # A whole number plus a half shows a real fraction, when the bounds leave room for one.
        value = math.floor(low) + self._pick(path, max(math.floor(high - low), 0) + 1) + 0.5
        return value if low <= value <= high else (low + high) / 2


def _bounds(schema: Mapping[str, Any], *, integer: bool) -> tuple[float, float]:
    """The inclusive range a number must fall in (exclusive bounds narrowed by one unit or a little)."""
    nudge = 1.0 if integer else 0.001

    def bound(inclusive: str, exclusive: str, direction: float) -> float | None:
        found = _real(schema, inclusive)
        ex = _real(schema, exclusive)
        if ex is not None:
            candidate = ex + direction * nudge
            found = candidate if found is None else (max(found, candidate) if direction > 0 else min(found, candidate))
        elif schema.get(exclusive) is True and found is not None:  # draft-04 boolean form
            found += direction * nudge
        return found

    low = bound("minimum", "exclusiveMinimum", 1)
    high = bound("maximum", "exclusiveMaximum", -1)
    if low is None and high is None:
        return 0, DEFAULT_NUMBER_SPAN
    if low is None:
        assert high is not None
        return (high - DEFAULT_NUMBER_SPAN if high < 0 else 0.0), high
    if high is None:
        return low, low + DEFAULT_NUMBER_SPAN
    return low, max(low, high)


def _real(schema: Mapping[str, Any], key: str) -> float | None:
    """A numeric keyword, None when absent or not a number (JSON's true is no number)."""
    value = schema.get(key)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _whole(schema: Mapping[str, Any], key: str) -> int | None:
    value = schema.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None
