"""Type and range checks for model sizes read from files (DiT metadata, Qwen3 ``config.json``).

A wrong value there (a string, 0, a negative layer count) would otherwise surface as a
``ZeroDivisionError`` or a shape error deep inside model construction. Each check raises
``ValueError`` with the key, the value and what was expected; the caller adds the file name.
"""

from __future__ import annotations

import json
import math


def positive_int(name: str, value: object) -> int:
    """``value`` if it is an integer >= 1 (``True`` is not a size)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def positive_number(name: str, value: object) -> float:
    """``value`` if it is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return value


def json_object(text: str, name: str) -> dict:
    """Parses ``text`` (called ``name`` in errors) as a JSON object, the only shape a config may have."""
    try:
        data = json.loads(text)
    except ValueError as err:
        raise ValueError(f"{name} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{name} must be a JSON object, got {type(data).__name__}")
    return data

