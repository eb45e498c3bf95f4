"""DeepSeek-V3.2 / V3.2-Speciale prompt encoder ("dsv32"; protocol.md section 3).

The prompt is plain text: ``BOS`` + every message rendered in order, no separators. Tokenize it without
adding special tokens (the BOS is already in the text). The output reproduces DeepSeek's official gold
vectors byte for byte (``shared/testdata/dsv32_encoding``).

Public API:
  * :func:`encode_messages` -- the official encoder's semantics (``thinking_mode`` "thinking" | "chat").
  * :func:`build_prompt` -- the generation prompt for an OpenAI chat request (``thinking`` bool).
  * :func:`render_tools` / :func:`render_tool_calls` -- the TOOLS_BLOCK and FUNCTION_CALLS_BLOCK pieces.
  * :class:`DSV32ChatEncoder` -- the object that ``get_chat_encoder("dsv32")`` returns.

Every malformed input raises a ``ValueError`` (:class:`~.common.MessageFormatError`) naming the field.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from .common import (ASSISTANT, BOS, DSML, EOS, THINK_END, THINK_START, USER, Message, MessageFormatError,
                     ToolCall, attach_tools, normalize_messages)

_TOOLS_BLOCK_HEAD = f"""## Tools

You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a "<{DSML}function_calls>" block like the following as part of your reply to the user:
<{DSML}function_calls>
<{DSML}invoke name="$FUNCTION_NAME">
<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>
...
</{DSML}invoke>
<{DSML}invoke name="$FUNCTION_NAME2">
...
</{DSML}invoke>
</{DSML}function_calls>

String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects should use JSON format. The "string" attribute should be set to "true" for string type parameters and "false" for other types (numbers, booleans, arrays, objects).

If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking block. Here is an example:

<{DSML}function_calls>
...
</{DSML}function_calls>

<function_results>
...
</function_results>

{THINK_START}...thinking about results{THINK_END}

Here are the functions available in JSONSchema format:
<functions>
"""
_TOOLS_BLOCK_TAIL = "\n</functions>\n"

_RESPONSE_FORMAT_HEAD = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"

THINKING_MODES = ("thinking", "chat")


def _json(value: Any, path: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise MessageFormatError(path, f"not JSON-serialisable ({e})") from None


def render_tools(functions: Sequence[Mapping[str, Any]]) -> str:
    """TOOLS_BLOCK for bare function objects (``{"name", "description", "parameters"}``, the OpenAI wrapper
    removed): one ``json.dumps(fn, ensure_ascii=False)`` line per tool, client key order kept. The block
    ends with a single "\\n" after ``</functions>``."""
    lines = "\n".join(_json(dict(fn), f"tools[{i}]") for i, fn in enumerate(functions))
    return _TOOLS_BLOCK_HEAD + lines + _TOOLS_BLOCK_TAIL


def _render_parameters(call: ToolCall) -> str:
    lines = []
    for key, value in call.arguments_object().items():
        if isinstance(value, str):
            lines.append(f'<{DSML}parameter name="{key}" string="true">{value}</{DSML}parameter>')
        else:
            text = _json(value, f"{call.path}.function.arguments.{key}")
            lines.append(f'<{DSML}parameter name="{key}" string="false">{text}</{DSML}parameter>')
    return "\n".join(lines)


def render_tool_calls(calls: Sequence[ToolCall]) -> str:
    """FUNCTION_CALLS_BLOCK (without the leading "\\n\\n"): one invoke per call joined with "\\n"; string
    argument values raw, other values as JSON. Raises MessageFormatError for non-object arguments."""
    invokes = [f'<{DSML}invoke name="{c.name}">\n{_render_parameters(c)}\n</{DSML}invoke>' for c in calls]
    return f"<{DSML}function_calls>\n" + "\n".join(invokes) + f"\n</{DSML}function_calls>"


def _response_format(rf: Any, path: str) -> str:
    return "\n\n" + _RESPONSE_FORMAT_HEAD + _json(rf, path)


def _order_tool_results(msgs: list[Message]) -> list[Message]:
    """Check every run of tool messages against the assistant that owns it (the nearest preceding non-tool
    message, which must be an assistant with tool_calls) and return the list with each run in call order.

    A run must hold exactly as many results as the owner made calls (fewer would leave the
    ``<function_results>`` block unclosed). A run is reordered by ``tool_call_id`` only when every result
    and every call carries an id and the ids match one to one; otherwise results are taken by position.
    """
    out: list[Message] = []
    i = 0
    while i < len(msgs):
        if msgs[i].role != "tool":
            out.append(msgs[i])
            i += 1
            continue
        j = i
        while j < len(msgs) and msgs[j].role == "tool":
            j += 1
        run = msgs[i:j]
        owner = out[-1] if out else None
        if owner is None or owner.role != "assistant" or not owner.tool_calls:
            raise MessageFormatError(f"{run[0].path}.role",
                                     "a tool message must follow an assistant message with tool_calls")
        calls = owner.tool_calls
        if len(run) > len(calls):
            raise MessageFormatError(run[len(calls)].path, f"more tool results ({len(run)}) than tool calls "
                                     f"({len(calls)}) in {owner.path}.tool_calls")
        if len(run) < len(calls):
            raise MessageFormatError(f"{owner.path}.tool_calls", f"{len(calls)} tool calls but only {len(run)} "
                                     f"tool result(s) follow; send one tool message per call")
        call_ids = [c.id for c in calls]
        run_ids = [m.tool_call_id for m in run]
        if (all(call_ids) and all(run_ids) and len(set(call_ids)) == len(call_ids)
                and set(run_ids) == set(call_ids) and len(set(run_ids)) == len(run_ids)):
            by_id = {m.tool_call_id: m for m in run}
            run = [by_id[cid] for cid in call_ids]
        out.extend(run)
        i = j
    return out


def _render(msgs: list[Message], thinking: bool, add_generation_prompt: bool) -> str:
    """Render validated, tool-ordered messages (no BOS). With ``add_generation_prompt`` false, the suffix
    that opens the model's reply after a final user/developer/tool message is left out."""
    last_user = max((k for k, m in enumerate(msgs) if m.role in ("user", "developer")), default=-1)
    parts: list[str] = []
    owner: Message | None = None
    run_pos = 0
    for pos, m in enumerate(msgs):
        is_final = pos == len(msgs) - 1
        if m.role == "system":
            text = m.content or ""
            if m.tools:
                text += "\n\n" + render_tools(m.tools)
            if m.response_format:
                text += _response_format(m.response_format, f"{m.path}.response_format")
            parts.append(text)
        elif m.role in ("user", "developer"):
            if m.role == "developer":
                if not m.content:
                    raise MessageFormatError(f"{m.path}.content", "a developer message needs non-empty content")
                body = ""
                if m.tools:
                    body += "\n\n" + render_tools(m.tools)
                if m.response_format:
                    body += _response_format(m.response_format, f"{m.path}.response_format")
                body += f"\n\n# The user's message is: {m.content}"
            else:
                body = m.content or ""
            parts.append(USER + body)
            if not (is_final and not add_generation_prompt):
                parts.append(ASSISTANT + (THINK_START if thinking and pos == last_user else THINK_END))
        elif m.role == "assistant":
            owner, run_pos = m, 0
            text = ""
            if thinking and pos > last_user:
                if not (m.reasoning or m.tool_calls):
                    raise MessageFormatError(f"{m.path}.reasoning_content", "in thinking mode an assistant message "
                                             "after the last user message needs reasoning_content or tool_calls")
                text += (m.reasoning or "") + THINK_END
            text += m.content or ""
            if m.tool_calls:
                text += "\n\n" + render_tool_calls(m.tool_calls)
            parts.append(text + EOS)
        else:  # tool; ownership and counts were checked by _order_tool_results
            assert owner is not None
            run_pos += 1
            if run_pos == 1:
                parts.append("\n\n<function_results>")
            parts.append(f"\n<result>{m.content or ''}</result>")
            if run_pos == len(owner.tool_calls):
                parts.append("\n</function_results>")
                if not (is_final and not add_generation_prompt):
                    parts.append("\n\n" + (THINK_START if thinking and pos >= last_user else THINK_END))
    return "".join(parts)


def _encode(messages: Any, tools: Any, thinking: bool, add_bos: bool, add_generation_prompt: bool,
            allow_empty: bool) -> str:
    msgs = normalize_messages(messages, allow_empty=allow_empty)
    msgs = attach_tools(msgs, tools)
    msgs = _order_tool_results(msgs)
    return (BOS if add_bos else "") + _render(msgs, thinking, add_generation_prompt)


def encode_messages(messages: Sequence[Mapping[str, Any]], thinking_mode: str = "thinking",
                    drop_thinking: bool = True, add_default_bos_token: bool = True,
                    tools: Sequence[Mapping[str, Any]] | None = None) -> str:
    """Encode a conversation as DeepSeek's ``encode_messages`` does (protocol.md section 3).

    ``thinking_mode`` is "thinking" or "chat". ``tools`` (request-level, OpenAI-shaped) are attached to the
    leading system/developer message, or to an empty system message put in front. Reasoning is rendered
    only for assistant messages after the last user/developer message in thinking mode; earlier reasoning
    is never rendered, so ``drop_thinking`` is accepted for signature compatibility and changes nothing
    (unlike DeepSeek's helper, earlier developer messages are kept). The result ends with the generation
    suffix after a final user/developer/tool message and with EOS after a final assistant message.
    Raises ValueError on an unknown ``thinking_mode`` or a malformed message.
    """
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode: must be one of {THINKING_MODES}, got {thinking_mode!r}")
    del drop_thinking  # the retention rule is positional; see the docstring
    return _encode(messages, tools, thinking_mode == "thinking", add_default_bos_token, True, allow_empty=True)


def build_prompt(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
                 thinking: bool = False, add_generation_prompt: bool = True) -> str:
    """The prompt text for an OpenAI chat request: BOS + the encoded conversation.

    ``thinking`` selects thinking mode (prompt ends ``<think>``) or chat mode (ends ``</think>``).
    ``add_generation_prompt=False`` leaves out the part that opens the reply: ``<｜Assistant｜><think>`` /
    ``<｜Assistant｜></think>`` after a final user/developer message, ``"\\n\\n<think>"`` / ``"\\n\\n</think>"``
    after a final tool result; a final assistant message renders the same either way (ends with EOS).
    ``messages`` must be non-empty. Raises ValueError (naming the field) on malformed input.
    """
    return _encode(messages, tools, bool(thinking), True, add_generation_prompt, allow_empty=False)


class DSV32ChatEncoder:
    """The "dsv32" chat encoder (V3.2 and V3.2-Speciale); stateless."""

    name = "dsv32"

    def render(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
               thinking: bool = False, add_generation_prompt: bool = True,
               chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
        """Same as :func:`build_prompt`; ``chat_template_kwargs`` is accepted and ignored (the thinking
        switch is resolved by the caller, see ``resolve_thinking``)."""
        return build_prompt(messages, tools=tools, thinking=thinking, add_generation_prompt=add_generation_prompt)

    def __repr__(self) -> str:
        return "DSV32ChatEncoder()"
