"""DeepSeek-V3.2-Exp prompt encoder: the V3.1-family chat-template semantics (protocol.md section 4), written
in Python and free of the stray whitespace that multi-line Jinja versions emit.

Layout: ``BOS`` + the system prompt (all system contents joined with "\\n\\n", hoisted to the top, plus the
tools block) + the other messages in order:

  * user: ``<｜User｜>`` + content.
  * assistant with tool_calls: ``<｜Assistant｜></think>`` when the last non-system message before it was a
    user message, or only system messages came before it; then content (if not null); then
    ``<｜tool▁calls▁begin｜>`` + per call ``<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>`` +
    ``<｜tool▁calls▁end｜><｜end▁of▁sentence｜>`` (ARGS: the arguments string verbatim, JSON if a dict).
  * assistant without tool_calls: ``<｜Assistant｜></think>`` when the last non-system message before it was a
    user message; then content, with everything up to and including the first ``</think>`` removed unless
    the previous message was a tool result; then EOS. ``reasoning_content`` is never rendered.
  * tool: ``<｜tool▁output▁begin｜>`` + content + ``<｜tool▁output▁end｜>``.
  * generation prompt (unless the last non-system message is a tool result, after which the model continues
    directly): ``<｜Assistant｜>`` + ``<think>`` (thinking) or ``</think>`` (not thinking).

``developer`` messages are treated as system messages. Malformed messages raise ValueError naming the field.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from .common import (ASSISTANT, BOS, EOS, THINK_END, THINK_START, TOOL_CALL_BEGIN, TOOL_CALL_END,
                     TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END, TOOL_SEP, USER,
                     MessageFormatError, normalize_messages, normalize_tools)

_TOOLS_HEAD = "## Tools\nYou have access to the following tools:\n"
_TOOLS_TAIL = (
    "\nIMPORTANT: ALWAYS adhere to this exact format for tool use:\n"
    f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}tool_call_name{TOOL_SEP}tool_call_arguments{TOOL_CALL_END}"
    "{{additional_tool_calls}}"  # literal text, not a placeholder
    f"{TOOL_CALLS_END}\n\nWhere:\n\n"
    "- `tool_call_name` must be an exact match to one of the available tools\n"
    "- `tool_call_arguments` must be valid JSON that strictly follows the tool's Parameters Schema\n"
    "- For multiple tool calls, chain them directly without separators or spaces\n"
)

_SYSTEM_ROLES = ("system", "developer")


def render_tools(functions: Sequence[Mapping[str, Any]]) -> str:
    """The V3.1-style tools section for bare function objects: per tool ``"\\n### NAME\\nDescription: DESC"
    "\\n\\nParameters: JSON\\n"`` (a missing description is empty, missing parameters are ``{}``), then the
    tool-call format instructions. Appended to the system prompt with "\\n\\n" by :func:`encode_messages`."""
    text = _TOOLS_HEAD
    for fn in functions:
        desc = fn.get("description") or ""
        try:
            params = json.dumps(fn.get("parameters") or {}, ensure_ascii=False)
        except (TypeError, ValueError) as e:
            raise MessageFormatError(f"tools ({fn['name']}).parameters", f"not JSON-serialisable ({e})") from None
        text += f"\n### {fn['name']}\nDescription: {desc}\n\nParameters: {params}\n"
    return text + _TOOLS_TAIL


def encode_messages(messages: Sequence[Mapping[str, Any]], thinking: bool = False,
                    tools: Sequence[Mapping[str, Any]] | None = None, add_generation_prompt: bool = True,
                    add_default_bos_token: bool = True) -> str:
    """Encode a conversation in the V3.2-Exp (V3.1-family) format described in the module docstring.

    ``tools``: request-level OpenAI tools; tools attached to system/developer messages are added after them.
    With tools, the tools section is appended to the system prompt with "\\n\\n" (also when there is no
    system text). Raises ValueError (naming the field) on malformed input.
    """
    msgs = normalize_messages(messages)
    functions = list(normalize_tools(tools, "tools"))
    for m in msgs:
        if m.role in _SYSTEM_ROLES:
            functions.extend(m.tools)

    system_prompt = "\n\n".join(m.content or "" for m in msgs if m.role in _SYSTEM_ROLES)
    if functions:
        system_prompt += "\n\n" + render_tools(functions)

    parts = [BOS if add_default_bos_token else "", system_prompt]
    last_user = False  # the last non-system message so far is a user message
    after_tool = False  # the last non-system message so far is a tool result
    only_system = any(m.role in _SYSTEM_ROLES for m in msgs)  # nothing but system messages so far
    for m in msgs:
        if m.role == "user":
            parts.append(USER + (m.content or ""))
            last_user, after_tool = True, False
        elif m.role == "assistant" and m.tool_calls:
            if last_user or only_system:
                parts.append(ASSISTANT + THINK_END)
            if m.content is not None:
                parts.append(m.content)
            calls = "".join(f"{TOOL_CALL_BEGIN}{c.name}{TOOL_SEP}{c.arguments_json()}{TOOL_CALL_END}"
                            for c in m.tool_calls)
            parts.append(TOOL_CALLS_BEGIN + calls + TOOL_CALLS_END + EOS)
            last_user, after_tool = False, False
        elif m.role == "assistant":
            if last_user:
                parts.append(ASSISTANT + THINK_END)
            content = m.content or ""
            if not after_tool and THINK_END in content:
                content = content.split(THINK_END, 1)[1]
            parts.append(content + EOS)
            last_user, after_tool = False, False
        elif m.role == "tool":
            parts.append(TOOL_OUTPUT_BEGIN + (m.content or "") + TOOL_OUTPUT_END)
            last_user, after_tool = False, True
        if m.role not in _SYSTEM_ROLES:
            only_system = False
    if add_generation_prompt and not after_tool:
        parts.append(ASSISTANT + (THINK_START if thinking else THINK_END))
    return "".join(parts)


class V31ChatEncoder:
    """The "v31" chat encoder (DeepSeek-V3.2-Exp, V3.1-family template semantics); stateless."""

    name = "v31"

    def render(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
               thinking: bool = False, add_generation_prompt: bool = True,
               chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
        """:func:`encode_messages` for a request; ``messages`` must be non-empty. ``chat_template_kwargs``
        is accepted and ignored (the thinking switch is resolved by the caller)."""
        if isinstance(messages, (list, tuple)) and not messages:
            raise MessageFormatError("messages", "must contain at least one message")
        return encode_messages(messages, thinking=thinking, tools=tools,
                               add_generation_prompt=add_generation_prompt)

    def __repr__(self) -> str:
        return "V31ChatEncoder()"
