"""Tool-call parser `deepseekv32`: DeepSeek-V3.2 DSML blocks (spec §5).

    [CONTENT]\\n\\n<｜DSML｜function_calls>
    <｜DSML｜invoke name="NAME">
    <｜DSML｜parameter name="KEY" string="true|false">VALUE</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜function_calls>

Accepted beyond the strict grammar: the DSML-less form (`<function_calls>`, `<invoke>`, `<parameter>`, ... as
left when special tokens were skipped), chosen per tag; any whitespace between tags; whitespace around `=`;
attributes in any order; a missing `string` attribute (parsed as JSON, falling back to a string); a
self-closing invoke `<｜DSML｜invoke name="NAME"/>` (or `<invoke name="NAME" />`, whitespace allowed before
`/>`), a call without parameters (`{}`), which may be followed by further invokes in the same block; an invoke
body that is a JSON object (constrained decoding) taken as the arguments; a parameter or invoke whose close tag
is missing when the next DSML tag starts; several blocks.

Content = the text outside blocks. Whitespace just before a block, whitespace between tags inside it, and
whitespace that ends the output after it are dropped; text after a block is content with its leading whitespace.
Values are converted as described in arguments.py. Streaming: the call's first delta (id, name) goes out when
its `<｜DSML｜invoke name="...">` tag is complete; then `{"key": ` when a parameter opens; a string value is
streamed JSON-escaped as it arrives (holding back anything that may start an end tag); other values when
their end tag arrives; `}` (or `{}`) when the invoke closes. A self-closing invoke sends its first delta and
then `{}` as soon as its tag (through `/>`) is complete.

Failure handling (no text lost): if the text after `<｜DSML｜function_calls>` is not an invoke open tag, the
marker was not a block (content, and scanning continues after it); a call whose name is not in `tools` goes
to content raw (for a self-closing invoke, just its tag); other unparseable text inside a block goes to
content; an invalid JSON invoke body goes to content (the call gets `{}`).
"""
from __future__ import annotations

import re
from typing import Optional

from .arguments import escape_fragment, key_fragment, object_json, streams_as_string, value_json
from .scan import MATCH, PARTIAL, find_first, match_literal, match_tag, partial_suffix_len, tag_regex
from .tools import ToolMachine

BLOCK_OPEN = ("<｜DSML｜function_calls>", "<function_calls>")
BLOCK_CLOSE = ("</｜DSML｜function_calls>", "</function_calls>")
INVOKE_HEADS = ("<｜DSML｜invoke", "<invoke")
INVOKE_CLOSE = ("</｜DSML｜invoke>", "</invoke>")
PARAM_HEADS = ("<｜DSML｜parameter", "<parameter")
PARAM_CLOSE = ("</｜DSML｜parameter>", "</parameter>")
# A value also ends (without consuming it) where the next DSML tag starts: `｜DSML｜` is one special token,
# so it never occurs inside genuine value text.
VALUE_ENDS = PARAM_CLOSE + ("<｜DSML｜", "</｜DSML｜invoke>", "</｜DSML｜function_calls>")
BODY_ENDS = INVOKE_CLOSE + BLOCK_CLOSE
SKIP_ENDS = INVOKE_CLOSE + ("</｜DSML｜function_calls>", "<｜DSML｜invoke")

# The invoke open tag, or a self-closing one (`... name="NAME"/>`, a call without parameters): tag_regex's
# pattern with an optional `/` before the `>`.
INVOKE_RE = re.compile(r'<(?:｜DSML｜)?invoke((?:\s+[A-Za-z_][\w-]*\s*=\s*"[^"]*")*)\s*/?>')
PARAM_RE = tag_regex("parameter")

MARKER_SETS = (BLOCK_OPEN, VALUE_ENDS, BODY_ENDS, SKIP_ENDS)  # for the tests' marker-containment check


def _flag(attrs: dict[str, str]) -> Optional[str]:
    value = attrs.get("string")
    if value is None:
        return None
    value = value.strip().lower()
    return value if value in ("true", "false") else None


class DsmlMachine(ToolMachine):
    """States: text → pre (marker seen, nothing committed) → block ⇄ invoke ⇄ value / body (a self-closing
    invoke opens and closes its call without leaving block); skip (unknown function, raw to content); garbage
    (content up to the next `<`); after (block closed)."""
    block_open = BLOCK_OPEN

    reasoning_end_markers = ("<｜DSML｜function_calls>",)

    def __init__(self, schemas, parallel_tool_calls: bool) -> None:
        super().__init__(schemas, parallel_tool_calls)
        self._params = 0
        self._args_closed = False
        self._value_stream = False
        self._value_flag: Optional[str] = None
        self._value_types = None
        self._parts: list[str] = []

    # -- outside calls ---------------------------------------------------------------------------------
    def _s_pre(self) -> bool:
        s = self._buf.lstrip()
        status, n, attrs = match_tag(s, INVOKE_HEADS, INVOKE_RE)
        if status == MATCH:
            self._held = ""
            self._buf = s[n:]
            self._start_invoke(attrs["name"].strip(), s[:n])
            return True
        if status == PARTIAL and not self._final:
            return False
        return self._not_a_block()

    def _s_block(self) -> bool:
        s = self._buf = self._buf.lstrip()
        if not s:
            return False
        status, n, attrs = match_tag(s, INVOKE_HEADS, INVOKE_RE)
        if status == MATCH:
            self._buf = s[n:]
            self._start_invoke(attrs["name"].strip(), s[:n])
            return True
        close, m, _ = match_literal(s, BLOCK_CLOSE)
        if close == MATCH:
            self._buf = s[m:]
            self._state = "after"
            return True
        if PARTIAL in (status, close):
            return self._wait_or_drop()
        return self._enter_garbage("block")

    def _wait_or_drop(self) -> bool:
        """A possible tag at the end of the buffer: wait for more text; at finish it is an incomplete tag
        of a cut-off generation and is dropped."""
        if self._final:
            self._buf = ""
        return False

    def _start_invoke(self, name: str, tag: str) -> None:
        # `/>` can only end a matched tag as the self-closing form (attribute values end with `"`)
        self_closing = tag.endswith("/>")
        if not self._open_known_call(name, tag):
            if self_closing:  # the unknown call was just this tag (now content): nothing to skip
                self._state = "block"
            return
        self._params = 0
        self._args_closed = False
        self._state = "invoke"
        if self_closing:  # a call without parameters, complete with its tag
            self._end_invoke()
            self._state = "block"

    def _s_skip(self) -> bool:
        return self._skip_to(SKIP_ENDS, INVOKE_CLOSE)

    # -- inside an invoke ------------------------------------------------------------------------------
    def _s_invoke(self) -> bool:
        s = self._buf = self._buf.lstrip()
        if not s:
            return False
        param, n, attrs = match_tag(s, PARAM_HEADS, PARAM_RE)
        if param == MATCH:
            self._buf = s[n:]
            self._start_param(attrs)
            return True
        close, n, _ = match_literal(s, INVOKE_CLOSE)
        if close == MATCH:
            self._buf = s[n:]
            self._end_invoke()
            self._state = "block"
            return True
        block_close, n, _ = match_literal(s, BLOCK_CLOSE)
        if block_close == MATCH:  # invoke close tag missing
            self._buf = s[n:]
            self._end_invoke()
            self._state = "after"
            return True
        invoke, _, _ = match_tag(s, INVOKE_HEADS, INVOKE_RE)
        if invoke == MATCH:  # invoke close tag missing: the next invoke starts
            self._end_invoke()
            self._state = "block"
            return True
        if s[0] == "{" and self._params == 0 and not self._args_closed:
            self._parts = []
            self._state = "body"
            return True
        if PARTIAL in (param, close, block_close, invoke):
            return self._wait_or_drop()
        return self._enter_garbage("invoke")

    def _start_param(self, attrs: dict[str, str]) -> None:
        key = attrs["name"].strip()
        self._value_flag = _flag(attrs)
        self._value_types = self._param_types(key)
        self._value_stream = streams_as_string(self._value_flag, self._value_types)
        self._emit_args(key_fragment(key, self._params == 0) + ('"' if self._value_stream else ""))
        self._params += 1
        self._parts = []
        self._state = "value"

    def _s_value(self) -> bool:
        buf = self._buf
        if not buf:
            return False
        pos, marker = find_first(buf, VALUE_ENDS)
        if marker is not None:
            self._value_piece(buf[:pos])
            self._end_value()
            self._buf = buf[pos + len(marker):] if marker in PARAM_CLOSE else buf[pos:]
            self._state = "invoke"
            return True
        keep = partial_suffix_len(buf, VALUE_ENDS)
        self._value_piece(buf[:len(buf) - keep])
        # at finish, a held-back piece is an incomplete end tag of a cut-off generation: dropped
        self._buf = "" if self._final else buf[len(buf) - keep:]
        return False

    def _value_piece(self, text: str) -> None:
        if not text:
            return
        if self._value_stream:
            self._emit_args(escape_fragment(text))
        else:
            self._parts.append(text)

    def _end_value(self) -> None:
        if self._value_stream:
            self._emit_args('"')
        else:
            self._emit_args(value_json("".join(self._parts), self._value_flag, self._value_types))
        self._parts = []

    def _s_body(self) -> bool:
        buf = self._buf
        if not buf:
            return False
        pos, marker = find_first(buf, BODY_ENDS)
        if marker is not None:
            self._parts.append(buf[:pos])
            self._buf = buf[pos:]
            self._end_body()
            self._state = "invoke"
            return True
        keep = partial_suffix_len(buf, BODY_ENDS)
        self._parts.append(buf[:len(buf) - keep])
        self._buf = "" if self._final else buf[len(buf) - keep:]
        return False

    def _end_body(self) -> None:
        body = "".join(self._parts)
        self._parts = []
        arguments = object_json(body)
        if arguments is None:
            self._emit_content(body)
        else:
            self._emit_args(arguments)
            self._args_closed = True

    def _end_invoke(self) -> None:
        if self._args_closed:
            closing = ""
        else:
            closing = "}" if self._params else "{}"
        self._close_call(closing)

    def _end(self) -> None:
        if self._state == "value":
            self._end_value()
        elif self._state == "body":
            self._end_body()
        if self._current is not None:
            self._end_invoke()
