"""JSON for the command line: how values that JSON lacks are written.

Bytes appear as ``{"$b64": "<standard base64>"}`` both ways (arguments in, results out), so binary
values survive a round trip through a shell. Dataclasses become objects, enums their values.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import msgspec

__all__ = ["dumps", "from_json", "loads", "to_json"]


def to_json(value: Any) -> Any:
    value = msgspec.to_builtins(value, builtin_types=(bytes, bytearray, memoryview))
    return _encode(value)


def _encode(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$b64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    return value


def from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$b64"} and isinstance(value["$b64"], str):
            try:
                return base64.b64decode(value["$b64"], validate=True)
            except binascii.Error as exc:
                raise ValueError(f"invalid base64 in $b64: {exc}") from None
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def dumps(value: Any) -> str:
    return json.dumps(to_json(value), sort_keys=True)


def loads(text: str) -> Any:
    return from_json(json.loads(text))
