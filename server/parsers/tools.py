"""`ToolCallParser`: the public tool-call parser, and the bookkeeping shared by its format machines.

`ToolCallParser(name, tools=None, tool_choice="auto", parallel_tool_calls=True)` with name "deepseekv32"
(DSML, spec §5; see dsml.py) or "deepseekv31" (V3.1 special tokens, spec §6; see v31.py).

- `parse(text) -> ToolParseResult(content, tool_calls)`: stateless (uses a fresh copy).
- `feed(delta) -> list[Delta]`, `finish() -> list[Delta]`, then `result() -> ToolParseResult` (same ids as the
  streamed deltas). Deltas are `Delta(content=...)` or `Delta(tool_call=ToolCallDelta(...))`.
- Streaming equals `parse()` for any chunking: same content, same calls, and each call's argument fragments
  concatenate byte-identically to its `arguments_json`. The name goes out as soon as the call's open tag is
  complete; arguments follow as they arrive.

Policies (identical in streaming and non-streaming):
- `tool_choice="none"`: no parsing; the text is all content. "auto", "required" and a named choice
  (`{"type": "function", "function": {"name": ...}}`) parse the same way; the server decides errors.
- `tools` given: a call whose function name is not in `tools` is not a call; its raw text goes to content.
  `tools` None or empty: every name is accepted and parameter types come from the `string` attribute only.
- `parallel_tool_calls=False`: only the first call is kept; later calls are dropped.
- Nothing is lost on failure: text that does not parse is returned as content. The one exception is a
  generation cut off inside a call that was already emitted: the call is closed with what arrived, and an
  incomplete tag at the very end is dropped (no raw markup leaks into content).
"""
from __future__ import annotations

import secrets
from typing import Any, Iterable, Optional

from .arguments import ToolSchemas, tool_schemas
from .scan import StreamMachine, find_first, partial_suffix_len
from .types import Delta, ToolCall, ToolCallDelta, ToolParseResult

TOOL_PARSER_NAMES = ("deepseekv32", "deepseekv31")


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class _Call:
    __slots__ = ("index", "id", "name", "parts", "dropped")

    def __init__(self, index: int, name: str, dropped: bool) -> None:
        self.index = index
        self.id = "" if dropped else new_call_id()
        self.name = name
        self.parts: list[str] = []
        self.dropped = dropped


class ToolMachine(StreamMachine):
    """Call/content bookkeeping for the format machines. Subclasses drive it with `_open_call`,
    `_emit_args`, `_close_call`, `_emit_content`; `_known(name)` applies the tools list."""

    # markers that implicitly end reasoning when they appear inside it (see ReasoningParser)
    reasoning_end_markers: tuple[str, ...] = ()

    def __init__(self, schemas: Optional[ToolSchemas], parallel_tool_calls: bool) -> None:
        super().__init__()
        self.schemas = schemas
        self.parallel_tool_calls = parallel_tool_calls
        self._calls: list[_Call] = []
        self._current: Optional[_Call] = None
        self._content_parts: list[str] = []
        self._state = "text"
        self._held = ""
        self._garbage_return = "text"
        self._garbage_first = False

    def _known(self, name: str) -> bool:
        return self.schemas is None or name in self.schemas

    def _param_types(self, key: str):
        if self.schemas is None or self._current is None:
            return None
        return self.schemas.get(self._current.name, {}).get(key)

    def _skip_to(self, ends, consumed) -> bool:
        """Garbage inside a block: pass text through as content up to the first of `ends` (a marker in
        `consumed` is passed through with it; any other stays in the buffer for the next state), then go back
        to the "block" state. Holds back a possible partial marker until the stream is final."""
        buf = self._buf
        pos, marker = find_first(buf, ends)
        if marker is not None:
            end = pos + len(marker) if marker in consumed else pos
            self._emit_content(buf[:end])
            self._buf = buf[end:]
            self._state = "block"
            return True
        keep = 0 if self._final else partial_suffix_len(buf, ends)
        self._emit_content(buf[:len(buf) - keep])
        self._buf = buf[len(buf) - keep:]
        return False

    def _emit_content(self, text: str) -> None:
        if text:
            self._content_parts.append(text)
            self._emit_text("content", text)

    def _open_known_call(self, name: str, raw: str) -> bool:
        """Open a call for a known function; an unknown one goes back to content as its raw text (and the rest
        of the call is skipped as content). Returns whether a call was opened."""
        if not self._known(name):
            self._emit_content(raw)
            self._state = "skip"
            return False
        self._open_call(name)
        return True

    def _open_call(self, name: str) -> None:
        kept = [c for c in self._calls if not c.dropped]
        dropped = not self.parallel_tool_calls and len(kept) >= 1
        call = _Call(len(kept), name, dropped)
        self._calls.append(call)
        self._current = call
        if not dropped:
            self._emit_tool(ToolCallDelta(index=call.index, id=call.id, type="function", name=name,
                                          arguments=""))

    def _emit_args(self, fragment: str) -> None:
        call = self._current
        if fragment and call is not None and not call.dropped:
            call.parts.append(fragment)
            self._emit_tool(ToolCallDelta(index=call.index, arguments=fragment))

    def _close_call(self, closing_fragment: str) -> None:
        self._emit_args(closing_fragment)
        self._current = None

    # -- states shared by the format machines ---------------------------------------------------------
    block_open: tuple[str, ...] = ()  # markers that open a call block (set by each format)

    def _s_text(self) -> bool:
        """Plain text until a block-opening marker; then the format's "pre" state reads the first call."""
        if self._scan_text(self.block_open) is None:
            return False
        self._state = "pre"
        return True

    def _scan_text(self, markers: tuple[str, ...]) -> Optional[str]:
        """TEXT state: content up to a block-start marker. Trailing whitespace before a marker is not
        content (the block is preceded by "\n\n"), so whitespace at the end of the buffer is held too.
        On a marker: sets `self._held` (that whitespace + the marker, returned as content if the block turns
        out not to be one), consumes through the marker and returns it; else returns None."""
        buf = self._buf
        if not buf:
            return None
        pos, marker = find_first(buf, markers)
        if marker is not None:
            before = buf[:pos]
            kept = before.rstrip()
            self._emit_content(kept)
            self._held = before[len(kept):] + marker
            self._buf = buf[pos + len(marker):]
            return marker
        if self._final:
            self._emit_content(buf)
            self._buf = ""
            return None
        safe = buf[:len(buf) - partial_suffix_len(buf, markers)]
        kept = safe.rstrip()
        self._emit_content(kept)
        self._buf = buf[len(kept):]
        return None

    def _not_a_block(self) -> bool:
        """The text after a block-start marker is not a tool block: the held whitespace and marker are
        content, and what follows the marker is scanned again as text."""
        self._emit_content(self._held)
        self._held = ""
        self._state = "text"
        return True

    def _enter_garbage(self, return_state: str) -> bool:
        """Unparseable text inside a block: content up to the next `<` (the first character always)."""
        self._garbage_return = return_state
        self._garbage_first = True
        self._state = "garbage"
        return True

    def _s_garbage(self) -> bool:
        buf = self._buf
        if not buf:
            return False
        j = buf.find("<", 1 if self._garbage_first else 0)
        if j == -1:
            self._emit_content(buf)
            self._buf = ""
            self._garbage_first = False
            return False
        self._emit_content(buf[:j])
        self._buf = buf[j:]
        self._state = self._garbage_return
        return True

    def _s_after(self) -> bool:
        """After a block's close tag: text is content again, including the whitespace before it;
        whitespace that only ends the output is dropped."""
        if not self._buf.lstrip():
            if self._final:
                self._buf = ""
            return False
        self._state = "text"
        return True

    def _step(self) -> bool:
        return getattr(self, "_s_" + self._state)()

    def result(self) -> ToolParseResult:
        calls = [ToolCall(id=c.id, name=c.name, arguments_json="".join(c.parts), index=c.index)
                 for c in self._calls if not c.dropped]
        return ToolParseResult(content="".join(self._content_parts), tool_calls=calls)


class _PassThrough(ToolMachine):
    """tool_choice="none": everything is content, immediately."""

    def _step(self) -> bool:
        self._emit_content(self._buf)
        self._buf = ""
        return False


def _normalize_tool_choice(tool_choice: Any) -> tuple[str, Optional[str]]:
    if tool_choice is None:
        return "auto", None
    if hasattr(tool_choice, "model_dump"):
        tool_choice = tool_choice.model_dump()
    if isinstance(tool_choice, str):
        if tool_choice not in ("auto", "none", "required"):
            raise ValueError(f"tool_choice must be 'auto', 'none', 'required' or a named function, "
                             f"got {tool_choice!r}")
        return tool_choice, None
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function") or {}
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            return "named", fn["name"]
    raise ValueError(f"tool_choice must be 'auto', 'none', 'required' or "
                     f"{{'type': 'function', 'function': {{'name': ...}}}}, got {tool_choice!r}")


class ToolCallParser:
    """See the module docstring. One instance per response (it holds the streaming state)."""

    def __init__(self, name: str, tools: Optional[Iterable[Any]] = None, tool_choice: Any = "auto",
                 parallel_tool_calls: bool = True) -> None:
        if name not in TOOL_PARSER_NAMES:
            raise ValueError(f"unknown tool-call parser {name!r}; valid names: {', '.join(TOOL_PARSER_NAMES)}")
        self.name = name
        self.tools = list(tools) if tools else None
        self.tool_choice = tool_choice
        self.tool_choice_mode, self.named_tool = _normalize_tool_choice(tool_choice)
        self.parallel_tool_calls = bool(parallel_tool_calls)
        self._schemas = tool_schemas(self.tools)
        self._machine = self._new_machine()

    def _new_machine(self) -> ToolMachine:
        if self.tool_choice_mode == "none":
            return _PassThrough(None, self.parallel_tool_calls)
        if self.name == "deepseekv32":
            from .dsml import DsmlMachine
            return DsmlMachine(self._schemas, self.parallel_tool_calls)
        from .v31 import V31Machine
        return V31Machine(self._schemas, self.parallel_tool_calls)

    @property
    def active(self) -> bool:
        """False for tool_choice="none" (no parsing; detokenizing with special tokens skipped is fine)."""
        return self.tool_choice_mode != "none"

    @property
    def reasoning_end_markers(self) -> tuple[str, ...]:
        """Markers that, seen inside reasoning, start this format's tool block (empty when inactive)."""
        return self._machine.reasoning_end_markers if self.active else ()

    def fresh(self) -> "ToolCallParser":
        return ToolCallParser(self.name, tools=self.tools, tool_choice=self.tool_choice,
                              parallel_tool_calls=self.parallel_tool_calls)

    def feed(self, delta: str) -> list[Delta]:
        return self._machine.feed(delta)

    def finish(self) -> list[Delta]:
        return self._machine.finish()

    def result(self) -> ToolParseResult:
        """Everything streamed so far as one result (complete after `finish()`)."""
        return self._machine.result()

    def parse(self, text: str) -> ToolParseResult:
        p = self.fresh()
        p.feed(text)
        p.finish()
        return p.result()
