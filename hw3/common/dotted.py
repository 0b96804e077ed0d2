"""Nested dicts as flat ones with dotted keys: how numbers.json files are compared and how two training configs are
told apart, value by value."""
from typing import Any, Dict


def flatten(data: Any, prefix: str = "") -> Dict[str, Any]:
    """{"a": {"b": 1, "c": {}}, "d": 2} -> {"a.b": 1, "d": 2}: every value that is not a dict under the keys of its
    path, joined by dots (an empty dict leaves no key); `prefix` goes before every key."""
    if not isinstance(data, dict):
        return {prefix: data}
    flat: Dict[str, Any] = {}
    for key, value in data.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat
