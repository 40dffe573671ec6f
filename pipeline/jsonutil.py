"""The JSON conventions shared by every record this project writes (manifest, commits, reports).

Timestamps are UTC ISO 8601 to the second (``2024-05-01T12:00:00+00:00``); values are made plain
JSON before `json.dumps` sees them; a record read back must be a JSON object.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

__all__ = ["utc_now", "jsonable", "parse_object"]


def utc_now() -> str:
    """The current UTC time as ISO 8601, whole seconds."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def jsonable(value: Any, *, finite: bool = False) -> Any:
    """`value` as plain JSON values: mappings become dicts with string keys, tuples lists, and numpy
    (or other) scalars with an ``item()`` Python numbers.

    With `finite`, NaN and infinities become None: strict JSON has neither, and browsers and most
    JSON readers refuse the ``NaN`` that `json.dumps` writes for them.
    """
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, finite=finite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, finite=finite) for v in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if finite and isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def parse_object(text: str | bytes, what: str, error: type[Exception]) -> dict[str, Any]:
    """The JSON object in `text`; anything else raises `error` with a message naming `what`."""
    try:
        data = json.loads(text)
    except ValueError as e:
        raise error(f"{what} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise error(f"{what} is not a JSON object")
    return data
