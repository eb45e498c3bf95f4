"""`OutputParser`: the reasoning parser and the tool-call parser chained, as the server uses them.

Text goes to the reasoning parser first; its reasoning fragments are passed through, its content fragments go
to the tool-call parser (tool calls are parsed from content only, never from reasoning). When a tool parser is
active, its block-start marker (`<｜DSML｜function_calls>` / `<｜tool▁calls▁begin｜>`) also ends reasoning, so
a block the model opened without `</think>` is still parsed as calls.

`OutputParser(reasoning=ReasoningParser|None, tools=ToolCallParser|None)`; either may be None (pass-through).
It works on fresh copies of the given parsers (their configuration only), available as `.reasoning` and
`.tools`. API as the single parsers: `feed(delta) -> list[Delta]`, `finish() -> list[Delta]`,
`result() -> ParsedOutput`, `parse(text) -> ParsedOutput` (stateless), `fresh()`. Streaming equals `parse()`
for any chunking, per kind of fragment.
"""
from __future__ import annotations

from typing import Optional

from .reasoning import ReasoningParser
from .tools import ToolCallParser
from .types import Delta, ParsedOutput


class OutputParser:
    def __init__(self, reasoning: Optional[ReasoningParser] = None,
                 tools: Optional[ToolCallParser] = None) -> None:
        self.tools = tools.fresh() if tools is not None else None
        extra = self.tools.reasoning_end_markers if self.tools is not None else ()
        self.reasoning = reasoning.fresh(extra_end_markers=extra) if reasoning is not None else None
        self._content_parts: list[str] = []  # used when there is no tool parser
        self._done = False

    def fresh(self) -> "OutputParser":
        return OutputParser(self.reasoning, self.tools)

    @property
    def in_reasoning(self) -> bool:
        return self.reasoning is not None and self.reasoning.in_reasoning

    def _route(self, deltas: list[Delta]) -> list[Delta]:
        out: list[Delta] = []
        for d in deltas:
            if d.content is None:
                out.append(d)
            elif self.tools is not None:
                out.extend(self.tools.feed(d.content))
            else:
                self._content_parts.append(d.content)
                out.append(d)
        return out

    def feed(self, delta: str) -> list[Delta]:
        if self._done:
            raise RuntimeError("feed() after finish(); use a fresh parser per response")
        if self.reasoning is not None:
            return self._route(self.reasoning.feed(delta))
        return self._route([Delta(content=delta)] if delta else [])

    def finish(self) -> list[Delta]:
        if self._done:
            raise RuntimeError("finish() called twice")
        self._done = True
        out = self._route(self.reasoning.finish()) if self.reasoning is not None else []
        if self.tools is not None:
            out.extend(self.tools.finish())
        return out

    def result(self) -> ParsedOutput:
        reasoning = self.reasoning.result().reasoning_content if self.reasoning is not None else None
        if self.tools is not None:
            tool_result = self.tools.result()
            return ParsedOutput(reasoning, tool_result.content, list(tool_result.tool_calls))
        return ParsedOutput(reasoning, "".join(self._content_parts), [])

    def parse(self, text: str) -> ParsedOutput:
        p = self.fresh()
        p.feed(text)
        p.finish()
        return p.result()
