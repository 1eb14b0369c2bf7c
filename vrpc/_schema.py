"""JSON Schema of each method's arguments and result, for reflection and ``vrpc describe``.

The schemas describe the JSON that the command line reads and prints (vrpc.jsonio): the same as
msgspec's JSON form, except bytes, written ``{"$b64": "<standard base64>"}``. On the wire the
values travel as msgpack, where bytes are native.
"""

from __future__ import annotations

from typing import Any

import msgspec

from vrpc.jsonio import to_json
from vrpc.service import MethodSpec

__all__ = ["method_schema"]

_REF = "#/$defs/{name}"
_BASE64 = {"type": "string", "contentEncoding": "base64"}
_B64_OBJECT = {
    "type": "object",
    "properties": {"$b64": {"type": "string", "contentEncoding": "base64"}},
    "required": ["$b64"],
    "additionalProperties": False,
}


def _json_form(node: Any) -> Any:
    if isinstance(node, dict):
        if node == _BASE64:
            return dict(_B64_OBJECT)
        return {k: _json_form(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_json_form(v) for v in node]
    return node


def _schemas(types: list[Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    try:
        found, defs = msgspec.json.schema_components(types, ref_template=_REF)
    except Exception:  # a type that has no JSON Schema (the codec still carries it)
        return [{} for _ in types], {}
    return [_json_form(s) for s in found], _json_form(defs)


def method_schema(spec: MethodSpec) -> dict[str, Any]:
    """``{"arguments": ..., "result": ..., "$defs": ...}`` (plus ``"request_items"`` for a
    method that streams its request). ``arguments`` is an object schema with one property per
    parameter, in declaration order; ``result`` describes one item of a streamed result."""
    types = [p.annotation for p in spec.params] + [spec.result_type]
    if spec.stream_param is not None:
        types.append(spec.request_item_type)
    found, defs = _schemas(types)
    properties: dict[str, Any] = {}
    for param, schema in zip(spec.params, found, strict=False):
        if param.has_default:
            try:
                schema = {**schema, "default": to_json(param.default)}
            except Exception:  # a default with no JSON form: describe the type only
                pass
        properties[param.name] = schema
    arguments: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "required": [p.name for p in spec.params if not p.has_default],
        "additionalProperties": False,
    }
    keyword_only = [p.name for p in spec.params if p.keyword_only]
    if keyword_only:
        arguments["x-keyword-only"] = keyword_only
    out: dict[str, Any] = {"arguments": arguments, "result": found[len(spec.params)]}
    if spec.stream_param is not None:
        out["request_items"] = found[-1]
    if defs:
        out["$defs"] = defs
    return out
