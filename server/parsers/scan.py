"""Text-scanning helpers and the streaming state-machine base used by every parser.

Why chunking cannot change the result: a machine only consumes text once what it does with it is fixed by the
text already seen (a marker found completely, or text that can no longer become the start of a marker); a
suffix that may still become a marker is held in the buffer until more text or `finish()` decides it. Marker
sets passed to `find_first` / `partial_suffix_len` must not contain one marker inside another except as a
prefix (checked by the tests), otherwise "earliest complete marker" could depend on where a chunk ends.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

from .types import Delta, ToolCallDelta

# Longest tag (`<｜DSML｜invoke name="..." ...>`) waited for; longer is treated as malformed so that a
# stray `<invoke` cannot make the buffer grow without bound.
MAX_TAG_CHARS = 1024


def find_first(buf: str, markers: Sequence[str], start: int = 0) -> tuple[int, Optional[str]]:
    """Earliest complete occurrence of any marker in `buf[start:]`: (position, marker) or (-1, None)."""
    best_pos, best = -1, None
    for m in markers:
        pos = buf.find(m, start)
        if pos != -1 and (best_pos == -1 or pos < best_pos or (pos == best_pos and len(m) > len(best))):
            best_pos, best = pos, m
    return best_pos, best


def partial_suffix_len(buf: str, markers: Sequence[str]) -> int:
    """Length of the longest suffix of `buf` that is a strict prefix of some marker (0 if none)."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(buf)), best, -1):
            if buf.endswith(m[:k]):
                best = k
                break
    return best


MATCH, PARTIAL, NO = "match", "partial", "no"

_ATTR_RE = re.compile(r'([A-Za-z_][\w-]*)\s*=\s*"([^"]*)"')


def match_literal(s: str, literals: Sequence[str]) -> tuple[str, int, Optional[str]]:
    """(MATCH, length, literal) if `s` starts with a literal, (PARTIAL, 0, None) if `s` is a strict prefix of
    one, else (NO, 0, None)."""
    partial = False
    for lit in literals:
        if s.startswith(lit):
            return MATCH, len(lit), lit
        if lit.startswith(s):
            partial = True
    return (PARTIAL, 0, None) if partial else (NO, 0, None)


def tag_regex(names: str) -> "re.Pattern[str]":
    """Open tag `<NAME attr="v" ...>` or `<｜DSML｜NAME ...>`, whitespace allowed around `=`."""
    return re.compile(r'<(?:｜DSML｜)?(?:%s)((?:\s+[A-Za-z_][\w-]*\s*=\s*"[^"]*")*)\s*>' % names)


def match_tag(s: str, heads: Sequence[str], regex: "re.Pattern[str]",
              required: str = "name") -> tuple[str, int, Optional[dict[str, str]]]:
    """Match an open tag at the start of `s`.

    (MATCH, length, attrs) for a complete well-formed tag having attribute `required` (non-blank);
    (PARTIAL, 0, None) while `s` may still become one (a strict prefix of a head, or a head whose `>` has not
    arrived, up to MAX_TAG_CHARS); (NO, 0, None) otherwise (including a malformed complete tag).
    """
    status, _, head = match_literal(s, heads)
    if status != MATCH:
        return status, 0, None
    if len(s) > len(head) and not (s[len(head)].isspace() or s[len(head)] == ">"):
        return NO, 0, None  # `<invoked`, `<parameters`: another word, not this tag
    gt = s.find(">", len(head), MAX_TAG_CHARS)
    if gt == -1:
        return (PARTIAL, 0, None) if len(s) < MAX_TAG_CHARS else (NO, 0, None)
    m = regex.fullmatch(s, 0, gt + 1)
    if m is None:
        return NO, 0, None
    attrs = {k: v for k, v in _ATTR_RE.findall(m.group(1))}
    if not attrs.get(required, "").strip():
        return NO, 0, None
    return MATCH, gt + 1, attrs


class StreamMachine:
    """Buffer + state loop. Subclasses implement `_step()`, returning True while it made progress (consumed
    text or changed state); with `self._final` set it must eventually consume the whole buffer. `_end()` runs
    once after the final loop (close whatever is still open)."""

    def __init__(self) -> None:
        self._buf = ""
        self._final = False
        self._done = False
        self._out: list[Delta] = []

    def feed(self, text: str) -> list[Delta]:
        if self._done:
            raise RuntimeError("feed() after finish(); use a fresh parser per response")
        if text:
            self._buf += text
            while self._step():
                pass
        return self._take()

    def finish(self) -> list[Delta]:
        if self._done:
            raise RuntimeError("finish() called twice")
        self._final = True
        while self._step():
            pass
        self._end()
        assert not self._buf, f"parser left text unconsumed: {self._buf!r}"
        self._done = True
        return self._take()

    def _step(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def _end(self) -> None:
        pass

    # -- output ----------------------------------------------------------------------------------------
    def _emit_text(self, kind: str, text: str) -> None:
        if not text:
            return
        last = self._out[-1] if self._out else None
        if last is not None and last.kind == kind:
            self._out[-1] = Delta(**{kind: getattr(last, kind) + text})
        else:
            self._out.append(Delta(**{kind: text}))

    def _emit_tool(self, delta: ToolCallDelta) -> None:
        last = self._out[-1].tool_call if self._out else None
        if (delta.name is None and last is not None and last.index == delta.index and last.name is None):
            # merge argument fragments produced in the same step (never into the name-carrying first delta)
            self._out[-1] = Delta(tool_call=ToolCallDelta(index=delta.index,
                                                          arguments=last.arguments + delta.arguments))
        else:
            self._out.append(Delta(tool_call=delta))

    def _take(self) -> list[Delta]:
        out, self._out = self._out, []
        return out
