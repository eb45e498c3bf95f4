"""Tool-call parser `deepseekv31`: V3.1-family special-token tool calls, used by DeepSeek-V3.2-Exp (spec §6).

    [CONTENT]<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS_JSON<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>

All markers are special tokens (detokenize with skip_special_tokens=False). Content = text outside the block,
whitespace just before the block dropped. A `<｜tool▁call▁begin｜>` without the outer `<｜tool▁calls▁begin｜>`
also starts a block. The arguments are the model's raw text between `<｜tool▁sep｜>` and
`<｜tool▁call▁end｜>` with surrounding whitespace removed (`{}` if empty); they are streamed as they arrive
and are not re-serialised, so invalid JSON reaches the client as the model wrote it (as with OpenAI).

Streaming: the first delta (id, name) goes out at `<｜tool▁sep｜>`; raw argument text follows, holding back
whitespace and anything that may start an end marker. Failure handling: if the block start is not followed by
`<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>` (name at most MAX_NAME_CHARS, no other marker inside), the marker is
content and scanning continues after it; an unknown function's call goes to content raw; other unparseable
text inside a block goes to content.
"""
from __future__ import annotations

from .scan import MATCH, PARTIAL, find_first, match_literal, partial_suffix_len
from .tools import ToolMachine

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"

BLOCK_OPEN = (CALLS_BEGIN, CALL_BEGIN)
NAME_ENDS = (SEP, CALL_END, CALLS_END, CALL_BEGIN, CALLS_BEGIN)
ARGS_ENDS = (CALL_END, CALLS_END, CALL_BEGIN)
MAX_NAME_CHARS = 256

MARKER_SETS = (BLOCK_OPEN, NAME_ENDS, ARGS_ENDS)  # for the tests' marker-containment check

_WAIT, _FAIL, _CUT = "wait", "fail", "cut"


class V31Machine(ToolMachine):
    """States: text → pre (nothing committed yet) → args → block ⇄ name → args; skip; garbage; after."""
    block_open = BLOCK_OPEN

    reasoning_end_markers = (CALLS_BEGIN,)

    def __init__(self, schemas, parallel_tool_calls: bool) -> None:
        super().__init__(schemas, parallel_tool_calls)
        self._args_started = False
        self._args_emitted = False

    def _scan_name(self, region: str):
        """(end of `<｜tool▁sep｜>`, name) when `region` starts with `NAME<｜tool▁sep｜>`; else _WAIT (may
        still become one), _FAIL (cannot), or _CUT (finish() came first)."""
        pos, marker = find_first(region, NAME_ENDS)
        if marker is None:
            if len(region) - partial_suffix_len(region, NAME_ENDS) > MAX_NAME_CHARS:
                return _FAIL
            return _CUT if self._final else _WAIT
        name = region[:pos].strip()
        if marker != SEP or pos > MAX_NAME_CHARS or not name:
            return _FAIL
        return pos + len(SEP), name

    def _s_pre(self) -> bool:
        s, start = self._buf, 0
        if self._held.endswith(CALLS_BEGIN):
            stripped = s.lstrip()
            status, n, _ = match_literal(stripped, (CALL_BEGIN,))
            if status == PARTIAL and not self._final:
                return False
            if status != MATCH:
                return self._not_a_block()
            start = len(s) - len(stripped) + n
        found = self._scan_name(s[start:])
        if found == _WAIT:
            return False
        if found in (_FAIL, _CUT):
            return self._not_a_block()
        end, name = found
        self._held = ""
        raw = s[:start + end] if start else CALL_BEGIN + s[:end]
        self._buf = s[start + end:]
        self._start_call(name, raw.lstrip())
        return True

    def _start_call(self, name: str, raw: str) -> None:
        if not self._open_known_call(name, raw):
            return
        self._args_started = False
        self._args_emitted = False
        self._state = "args"

    def _s_name(self) -> bool:
        found = self._scan_name(self._buf)
        if found == _WAIT:
            return False
        if found == _CUT:
            self._buf = ""  # cut off inside the name: the incomplete call is dropped
            return False
        if found == _FAIL:
            self._emit_content(CALL_BEGIN)
            self._garbage_return, self._garbage_first, self._state = "block", False, "garbage"
            return True
        end, name = found
        raw = CALL_BEGIN + self._buf[:end]
        self._buf = self._buf[end:]
        self._start_call(name, raw)
        return True

    def _s_args(self) -> bool:
        buf = self._buf
        if not self._args_started:
            buf = self._buf = buf.lstrip()
            if not buf:
                return False
            self._args_started = True
        pos, marker = find_first(buf, ARGS_ENDS)
        if marker is not None:
            self._emit_raw_args(buf[:pos].rstrip())
            self._buf = buf[pos + len(CALL_END):] if marker == CALL_END else buf[pos:]
            self._end_call()
            self._state = "block"
            return True
        piece = buf[:len(buf) - partial_suffix_len(buf, ARGS_ENDS)].rstrip()
        self._emit_raw_args(piece)
        # trailing whitespace and a possible end marker wait; at finish they are dropped
        self._buf = "" if self._final else buf[len(piece):]
        return False

    def _emit_raw_args(self, piece: str) -> None:
        if piece:
            self._emit_args(piece)
            self._args_emitted = True

    def _end_call(self) -> None:
        self._close_call("" if self._args_emitted else "{}")

    def _s_block(self) -> bool:
        s = self._buf = self._buf.lstrip()
        if not s:
            return False
        status, n, marker = match_literal(s, (CALL_BEGIN, CALLS_END))
        if status == MATCH:
            self._buf = s[n:]
            self._state = "name" if marker == CALL_BEGIN else "after"
            return True
        if status == PARTIAL:
            if self._final:
                self._buf = ""
            return False
        return self._enter_garbage("block")

    def _s_skip(self) -> bool:
        return self._skip_to(ARGS_ENDS, (CALL_END,))

    def _end(self) -> None:
        if self._current is not None:
            self._end_call()
