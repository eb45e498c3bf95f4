"""Shared pieces of the chat encoders: special-token strings and request-message validation.

Contract of :func:`normalize_messages`: it takes OpenAI-shaped chat messages (plain dicts, never mutated) and
returns a list of immutable :class:`Message` records in the same order, or raises :class:`MessageFormatError`
(a ``ValueError``) whose text starts with the offending field path, e.g.
``messages[2].tool_calls[0].function.name: must be a non-empty string``. Nothing here depends on a model
format; the encoders in ``dsv32.py`` / ``v31.py`` decide what each field means.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

# Structural markers: ASCII "<" + U+FF5C + name + U+FF5C + ASCII ">"; U+2581 inside names.
BOS = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
EOS = "<\uff5cend\u2581of\u2581sentence\uff5c>"
USER = "<\uff5cUser\uff5c>"
ASSISTANT = "<\uff5cAssistant\uff5c>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "\uff5cDSML\uff5c"
TOOL_CALLS_BEGIN = "<\uff5ctool\u2581calls\u2581begin\uff5c>"
TOOL_CALLS_END = "<\uff5ctool\u2581calls\u2581end\uff5c>"
TOOL_CALL_BEGIN = "<\uff5ctool\u2581call\u2581begin\uff5c>"
TOOL_CALL_END = "<\uff5ctool\u2581call\u2581end\uff5c>"
TOOL_SEP = "<\uff5ctool\u2581sep\uff5c>"
TOOL_OUTPUT_BEGIN = "<\uff5ctool\u2581output\u2581begin\uff5c>"
TOOL_OUTPUT_END = "<\uff5ctool\u2581output\u2581end\uff5c>"

ROLES = ("system", "developer", "user", "assistant", "tool")


class MessageFormatError(ValueError):
    """A request message (or tool definition) has a bad shape. ``path`` names the field, e.g.
    ``messages[2].tool_calls[0].function.arguments``; ``str(err)`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class ToolCall:
    """One assistant tool call. ``arguments`` is what the client sent: a JSON string or a dict (a missing or
    null ``arguments`` becomes ``"{}"``). ``path`` is the call's field path for error messages."""

    name: str
    arguments: str | dict
    id: str | None
    path: str

    def arguments_json(self) -> str:
        """The arguments as JSON text: a string verbatim, a dict through ``json.dumps(ensure_ascii=False)``."""
        if isinstance(self.arguments, str):
            return self.arguments
        return json.dumps(self.arguments, ensure_ascii=False)

    def arguments_object(self) -> dict:
        """The arguments as a dict (key order kept). Raises MessageFormatError if the string is not JSON or
        does not hold a JSON object."""
        if isinstance(self.arguments, dict):
            return self.arguments
        try:
            value = json.loads(self.arguments) if self.arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise MessageFormatError(f"{self.path}.function.arguments", f"not valid JSON ({e.msg})") from None
        if not isinstance(value, dict):
            raise MessageFormatError(f"{self.path}.function.arguments",
                                     f"must be a JSON object, got {type(value).__name__}")
        return value


@dataclass(frozen=True)
class Message:
    """A validated chat message. ``content`` / ``reasoning`` are text or None (list-of-parts content is
    already joined); ``tools`` holds bare function objects (the OpenAI ``{"type": "function", "function":
    ...}`` wrapper removed); ``index`` is the position in the request, used in error paths."""

    role: str
    index: int
    content: str | None = None
    reasoning: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tools: tuple[dict, ...] = ()
    response_format: Any = None
    tool_call_id: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return f"messages[{self.index}]"


def _content(value: Any, path: str) -> str | None:
    """Message content: a string, None, or a list of ``{"type": "text", "text": ...}`` parts (bare strings
    in the list are accepted too) joined with "\\n"."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        texts = []
        for j, part in enumerate(value):
            ppath = f"{path}[{j}]"
            if isinstance(part, str):
                texts.append(part)
                continue
            if not isinstance(part, Mapping):
                raise MessageFormatError(ppath, f"content part must be an object, got {type(part).__name__}")
            kind = part.get("type", "text")
            if kind != "text":
                raise MessageFormatError(f"{ppath}.type", f"unsupported content part type {kind!r} "
                                         "(only 'text' is supported)")
            text = part.get("text")
            if not isinstance(text, str):
                raise MessageFormatError(f"{ppath}.text", "must be a string")
            texts.append(text)
        return "\n".join(texts)
    raise MessageFormatError(path, f"must be a string, null or a list of text parts, got {type(value).__name__}")


def _optional_str(value: Any, path: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise MessageFormatError(path, f"must be a string or null, got {type(value).__name__}")


def normalize_tools(tools: Any, path: str) -> tuple[dict, ...]:
    """Validate a ``tools`` list and return the bare function objects (client dicts, key order kept).
    Accepts ``{"type": "function", "function": {...}}`` and bare ``{"name": ...}`` function objects."""
    if tools is None:
        return ()
    if not isinstance(tools, (list, tuple)):
        raise MessageFormatError(path, f"must be a list, got {type(tools).__name__}")
    out = []
    for i, tool in enumerate(tools):
        tpath = f"{path}[{i}]"
        if not isinstance(tool, Mapping):
            raise MessageFormatError(tpath, f"must be an object, got {type(tool).__name__}")
        if "function" in tool:
            kind = tool.get("type", "function")
            if kind != "function":
                raise MessageFormatError(f"{tpath}.type", f"unsupported tool type {kind!r} (only 'function')")
            fn, fpath = tool["function"], f"{tpath}.function"
            if not isinstance(fn, Mapping):
                raise MessageFormatError(fpath, f"must be an object, got {type(fn).__name__}")
        else:
            fn, fpath = tool, tpath
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise MessageFormatError(f"{fpath}.name", "must be a non-empty string")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise MessageFormatError(f"{fpath}.description", "must be a string")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], Mapping):
            raise MessageFormatError(f"{fpath}.parameters", "must be a JSON Schema object")
        out.append(dict(fn))
    return tuple(out)


def _tool_calls(value: Any, path: str) -> tuple[ToolCall, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise MessageFormatError(path, f"must be a list, got {type(value).__name__}")
    calls = []
    for j, call in enumerate(value):
        cpath = f"{path}[{j}]"
        if not isinstance(call, Mapping):
            raise MessageFormatError(cpath, f"must be an object, got {type(call).__name__}")
        kind = call.get("type", "function")
        if kind not in ("function", None):
            raise MessageFormatError(f"{cpath}.type", f"unsupported tool call type {kind!r} (only 'function')")
        fn = call.get("function")
        if not isinstance(fn, Mapping):
            raise MessageFormatError(f"{cpath}.function", "must be an object with 'name' and 'arguments'")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise MessageFormatError(f"{cpath}.function.name", "must be a non-empty string")
        args = fn.get("arguments")
        if args is None:
            args = "{}"
        elif isinstance(args, Mapping):
            args = dict(args)
        elif not isinstance(args, str):
            raise MessageFormatError(f"{cpath}.function.arguments",
                                     f"must be a JSON string or an object, got {type(args).__name__}")
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise MessageFormatError(f"{cpath}.id", f"must be a string or null, got {type(call_id).__name__}")
        calls.append(ToolCall(name=name, arguments=args, id=call_id, path=cpath))
    return tuple(calls)


def normalize_messages(messages: Any, *, allow_empty: bool = True) -> list[Message]:
    """Validate OpenAI-shaped ``messages`` and return :class:`Message` records (input left untouched).

    Rules: ``messages`` is a list of objects; ``role`` is one of system/developer/user/assistant/tool;
    ``content`` is a string, null, or a list of text parts; ``reasoning_content`` (alias ``reasoning``) is a
    string or null; an assistant's ``tool_calls`` is a list of ``{"type": "function", "function": {"name":
    str, "arguments": str | dict}}``; ``tools`` / ``response_format`` are kept only on system/developer
    messages; ``tool_call_id`` is a string or null (never required). Raises MessageFormatError.
    """
    if not isinstance(messages, (list, tuple)):
        raise MessageFormatError("messages", f"must be a list, got {type(messages).__name__}")
    if not messages and not allow_empty:
        raise MessageFormatError("messages", "must contain at least one message")
    out = []
    for i, msg in enumerate(messages):
        path = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise MessageFormatError(path, f"must be an object, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise MessageFormatError(f"{path}.role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = _content(msg.get("content"), f"{path}.content")
        reasoning = msg.get("reasoning_content")
        rkey = "reasoning_content"
        if reasoning is None and msg.get("reasoning") is not None:
            reasoning, rkey = msg.get("reasoning"), "reasoning"
        reasoning = _optional_str(reasoning, f"{path}.{rkey}")
        tool_calls: tuple[ToolCall, ...] = ()
        if role == "assistant":
            tool_calls = _tool_calls(msg.get("tool_calls"), f"{path}.tool_calls")
        tools: tuple[dict, ...] = ()
        response_format = None
        if role in ("system", "developer"):
            tools = normalize_tools(msg.get("tools"), f"{path}.tools")
            response_format = msg.get("response_format")
        tool_call_id = _optional_str(msg.get("tool_call_id"), f"{path}.tool_call_id") if role == "tool" else None
        known = {"role", "content", "reasoning_content", "reasoning", "tool_calls", "tools", "response_format",
                 "tool_call_id"}
        extra = {k: v for k, v in msg.items() if k not in known}
        out.append(Message(role=role, index=i, content=content, reasoning=reasoning, tool_calls=tool_calls,
                           tools=tools, response_format=response_format, tool_call_id=tool_call_id,
                           extra=extra))
    return out


def attach_tools(messages: list[Message], tools: Any) -> list[Message]:
    """Return ``messages`` with request-level ``tools`` (validated under the path ``tools``) attached to the
    leading system/developer message, or to a new empty system message put in front when the conversation
    starts with another role (that record has ``index`` -1; the others keep their request positions).
    Raises MessageFormatError if the leading message already carries its own ``tools``."""
    fns = normalize_tools(tools, "tools")
    if not fns:
        return list(messages)
    out = list(messages)
    if out and out[0].role in ("system", "developer"):
        if out[0].tools:
            raise MessageFormatError(f"{out[0].path}.tools", "tools given both here and at the request level")
        out[0] = replace(out[0], tools=fns)
    else:
        out.insert(0, Message(role="system", index=-1, content="", tools=fns))
    return out
