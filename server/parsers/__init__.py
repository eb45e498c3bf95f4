"""Output parsers: model text → reasoning_content, content and tool calls (shared/spec/protocol.md §5–§8).

    from dsv32.server.parsers import ReasoningParser, ToolCallParser, OutputParser

    reasoning = ReasoningParser("deepseek-v3", thinking=True)          # --reasoning-parser deepseek-v3
    tools = ToolCallParser("deepseekv32", tools=request_tools,         # --tool-call-parser deepseekv32
                           tool_choice="auto", parallel_tool_calls=True)
    out = OutputParser(reasoning=reasoning, tools=tools)                # one per choice
    for text in detokenized_pieces:
        for delta in out.feed(text): ...                                 # Delta(content | reasoning_content | tool_call)
    tail = out.finish(); result = out.result()                          # ParsedOutput(reasoning_content, content, tool_calls)
    finish_reason(engine_reason, result)                                # "tool_calls" when calls were produced

Every parser: `feed(str) -> list[Delta]`, `finish() -> list[Delta]`, `result()`, `parse(text)` (stateless) and
`fresh()`. For any chunking of a text, the streamed fragments of each kind concatenate to exactly what
`parse()` returns for the whole text, and each call's argument fragments to its `arguments_json`.
Detokenize with skip_special_tokens=False while a tool parser is active (the markers are special tokens).
"""
from .output import OutputParser
from .reasoning import REASONING_PARSER_NAMES, ReasoningParser
from .tools import TOOL_PARSER_NAMES, ToolCallParser
from .types import (Delta, ParsedOutput, ReasoningResult, ToolCall, ToolCallDelta, ToolParseResult,
                    finish_reason)

__all__ = [
    "Delta", "OutputParser", "ParsedOutput", "REASONING_PARSER_NAMES", "ReasoningParser", "ReasoningResult",
    "TOOL_PARSER_NAMES", "ToolCall", "ToolCallDelta", "ToolCallParser", "ToolParseResult", "finish_reason",
]
