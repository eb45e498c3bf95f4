"""Result and delta types shared by the output parsers, and the `finish_reason` helper.

Streaming contract (every parser): `feed(text)` and `finish()` return a list of `Delta`. Each `Delta` carries
exactly one of `content`, `reasoning_content` (non-empty string fragments) or `tool_call` (a `ToolCallDelta`).
Concatenating the fragments of one kind, over all `feed` calls and `finish`, gives exactly the matching field
of the parser's non-streaming `parse()` result for the whole text, for any chunking of that text.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class ToolCallDelta:
    """One streamed piece of a tool call.

    The first delta of a call has `id` ("call_" + 24 hex digits), `type` ("function"), `name` and
    `arguments == ""`; later deltas have `id`, `type` and `name` None and a non-empty `arguments` fragment.
    Concatenating a call's `arguments` fragments gives exactly `ToolCall.arguments_json`.
    """

    index: int
    id: Optional[str] = None
    type: Optional[str] = None
    name: Optional[str] = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI streaming shape `{index, id?, type?, function: {name?, arguments}}`."""
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = self.type or "function"
        function: dict[str, Any] = {"arguments": self.arguments}
        if self.name is not None:
            function["name"] = self.name
        out["function"] = function
        return out


@dataclass(frozen=True)
class Delta:
    """One streamed fragment: exactly one of the three fields is set."""

    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_call: Optional[ToolCallDelta] = None

    @property
    def kind(self) -> str:
        """Which field is set: "content", "reasoning_content" or "tool_call"."""
        if self.tool_call is not None:
            return "tool_call"
        return "reasoning_content" if self.reasoning_content is not None else "content"


@dataclass(frozen=True)
class ToolCall:
    """A finished tool call. `arguments_json` is a JSON object text (for `deepseekv31`, the model's raw
    argument text, which is not re-validated)."""

    id: str
    name: str
    arguments_json: str
    index: int = 0

    @property
    def arguments(self) -> str:
        return self.arguments_json

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI message shape `{id, index, type, function: {name, arguments}}`."""
        return {"id": self.id, "index": self.index, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments_json}}


@dataclass(frozen=True)
class ReasoningResult:
    """`reasoning_content` is None when there was no reasoning text (thinking off, or empty)."""

    reasoning_content: Optional[str]
    content: str


@dataclass(frozen=True)
class ToolParseResult:
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass(frozen=True)
class ParsedOutput:
    """Combined result of `OutputParser`: reasoning split first, tool calls parsed from the content."""

    reasoning_content: Optional[str]
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)


def finish_reason(base_reason: Optional[str], result: Any) -> Optional[str]:
    """The OpenAI `finish_reason` for a choice.

    `result` is anything with a `tool_calls` list (ToolParseResult, ParsedOutput, a parser's `result()`),
    a list of calls, or a bool ("calls were produced"). Returns "tool_calls" when calls were produced and the
    engine stopped normally (`base_reason` None, "stop" or "tool_calls"). A truncated or aborted generation
    keeps "length" / "abort" even with calls, so a client never runs a call whose arguments were cut off.
    """
    if isinstance(result, bool):
        has_calls = result
    elif isinstance(result, (list, tuple)):
        has_calls = len(result) > 0
    else:
        has_calls = bool(getattr(result, "tool_calls", None))
    if has_calls and base_reason in (None, "stop", "tool_calls"):
        return "tool_calls"
    return base_reason
