"""Tool lists and the arguments JSON built from DSML parameters.

Arguments text format (DeepSeek's official decoder, which streaming reproduces fragment by fragment):
`{` + `", "`-joined `json.dumps(key): VALUE` + `}`, `{}` without parameters, all JSON with
`ensure_ascii=False` (non-ASCII kept as is; the official decoder escapes it, which is the same JSON value).

VALUE for a parameter with raw text `raw`, `string` attribute `flag` ("true", "false", or None when absent)
and schema types `types` (a set of JSON-schema type names from the tool's `parameters.properties[key]`, or
None when no tools were given / the key or its type is unknown):
- flag "true" and (types None or "string" in types): the JSON string of `raw` (streamed as it arrives);
- flag "true" but the schema says non-string: json.loads(raw); used if it fits one of the types, else the
  JSON string of `raw` (the model mislabelled a number as a string, or the value really is text);
- flag "false" / absent: json.loads(raw) (NaN/Infinity rejected); if that fails, or the schema allows only
  "string" and the parsed value is not a string, the JSON string of `raw` (never lost, never invalid JSON).
"""
from __future__ import annotations

import json
from typing import Any, Iterable, Mapping, Optional

ToolSchemas = dict[str, dict[str, Optional[frozenset]]]


def _as_dict(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return obj.model_dump()
    return obj


def _schema_types(schema: Any) -> Optional[frozenset]:
    """JSON-schema type names a property allows (from `type`, or its `anyOf`/`oneOf` members)."""
    schema = _as_dict(schema)
    if not isinstance(schema, Mapping):
        return None
    found: set[str] = set()
    t = schema.get("type")
    if isinstance(t, str):
        found.add(t)
    elif isinstance(t, list):
        found.update(x for x in t if isinstance(x, str))
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or ():
            sub_types = _schema_types(sub)
            if sub_types is None:
                return None  # an untyped alternative allows anything
            found.update(sub_types)
    return frozenset(found) if found else None


def tool_schemas(tools: Optional[Iterable[Any]]) -> Optional[ToolSchemas]:
    """`{function name: {parameter: types or None}}` from OpenAI-format tools
    (`{"type": "function", "function": {"name", "parameters"}}`; a bare `{"name", "parameters"}` is accepted).
    None when `tools` is None or empty (then every function name is accepted)."""
    if not tools:
        return None
    out: ToolSchemas = {}
    for tool in tools:
        tool = _as_dict(tool)
        fn = _as_dict(tool.get("function", tool)) if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise ValueError(f"tool without a function name: {tool!r}")
        params = _as_dict(fn.get("parameters")) or {}
        props = _as_dict(params.get("properties")) if isinstance(params, Mapping) else None
        out[fn["name"]] = {k: _schema_types(v) for k, v in (props or {}).items()}
    return out


def streams_as_string(flag: Optional[str], types: Optional[frozenset]) -> bool:
    """True when the value's JSON is the JSON string of its raw text, so it can be streamed as it arrives."""
    return flag == "true" and (types is None or "string" in types)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads(text: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return False, None


def _fits(value: Any, types: frozenset) -> bool:
    checks = {
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "array": lambda v: isinstance(v, list),
        "object": lambda v: isinstance(v, dict),
        "null": lambda v: v is None,
    }
    return any(checks.get(t, lambda v: False)(value) for t in types)


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def value_json(raw: str, flag: Optional[str], types: Optional[frozenset]) -> str:
    """The JSON text of one parameter value (rules in the module docstring)."""
    if streams_as_string(flag, types):
        return dumps(raw)
    ok, value = _loads(raw)
    if flag == "true":
        return dumps(value) if ok and types is not None and _fits(value, types) else dumps(raw)
    if not ok or (types is not None and types <= {"string"} and not isinstance(value, str)):
        return dumps(raw)
    return dumps(value)


def key_fragment(key: str, first: bool) -> str:
    """`{"key": ` for the first parameter, `, "key": ` after."""
    return ("{" if first else ", ") + dumps(key) + ": "


def escape_fragment(text: str) -> str:
    """JSON string escaping of a piece of a string value, without the quotes. JSON escapes character by
    character, so escaping the pieces and concatenating equals escaping the whole."""
    return dumps(text)[1:-1]


def object_json(text: str) -> Optional[str]:
    """Normalised JSON of `text` if it is a JSON object (an invoke body written as JSON), else None."""
    ok, value = _loads(text)
    return dumps(value) if ok and isinstance(value, dict) else None
