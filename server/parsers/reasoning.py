"""Reasoning parser `deepseek-v3`: splits model output into reasoning_content and content (spec §7).

Contract, with `thinking=True` (the prompt ends with `<think>`, so output starts inside reasoning):
- one leading `<think>` (if the model repeats it) is removed;
- reasoning = text before the first `</think>`; content = text after it, unstripped; the `</think>` itself is
  dropped; later `<think>` / `</think>` are ordinary content;
- no `</think>` at all (length stop): everything is reasoning, content "";
- `extra_end_markers` (set by `OutputParser` to the tool parser's block-start marker, e.g.
  `<｜DSML｜function_calls>`) end reasoning implicitly: reasoning = text before the marker, and the marker plus
  everything after is content (so a tool block the model opened without closing its reasoning still parses).
With `thinking=False`: everything is content, except one stray leading `</think>`, which is dropped.

`reasoning_content` in results is None when empty. Streaming holds back any suffix that could still become a
marker (never emits part of `</think>` as text), so streamed fragments concatenate to `parse()` for any
chunking. A suffix that never completed a marker is emitted by `finish()` as ordinary text.
"""
from __future__ import annotations

from typing import Sequence

from .scan import StreamMachine, find_first, partial_suffix_len
from .types import ReasoningResult

THINK_START = "<think>"
THINK_END = "</think>"

REASONING_PARSER_NAMES = ("deepseek-v3",)

_START, _REASONING, _CONTENT = "start", "reasoning", "content"


class ReasoningParser(StreamMachine):
    """`ReasoningParser("deepseek-v3", thinking=True)`; one instance per response (streaming state).

    `feed(delta) -> list[Delta]`, `finish() -> list[Delta]`, `result() -> ReasoningResult` (after finish),
    `parse(text) -> ReasoningResult` (stateless: uses a fresh copy), `fresh()` (same config, new state).
    """

    def __init__(self, name: str = "deepseek-v3", thinking: bool = True, *,
                 extra_end_markers: Sequence[str] = ()) -> None:
        if name not in REASONING_PARSER_NAMES:
            raise ValueError(f"unknown reasoning parser {name!r}; valid names: {', '.join(REASONING_PARSER_NAMES)}")
        super().__init__()
        self.name = name
        self.thinking = bool(thinking)
        self.extra_end_markers = tuple(m for m in extra_end_markers if m)
        self._end_markers = (THINK_END,) + self.extra_end_markers
        self._state = _START
        self._reasoning_parts: list[str] = []
        self._content_parts: list[str] = []

    def fresh(self, **overrides) -> "ReasoningParser":
        kwargs = dict(name=self.name, thinking=self.thinking, extra_end_markers=self.extra_end_markers)
        kwargs.update(overrides)
        return ReasoningParser(**kwargs)

    @property
    def in_reasoning(self) -> bool:
        """True until reasoning has ended (useful for counting reasoning tokens as they stream)."""
        return self.thinking and self._state != _CONTENT

    def parse(self, text: str) -> ReasoningResult:
        p = self.fresh()
        p.feed(text)
        p.finish()
        return p.result()

    def result(self) -> ReasoningResult:
        reasoning = "".join(self._reasoning_parts)
        return ReasoningResult(reasoning_content=reasoning or None, content="".join(self._content_parts))

    # -- machine ---------------------------------------------------------------------------------------
    def _emit(self, kind: str, text: str) -> None:
        if text:
            (self._reasoning_parts if kind == "reasoning_content" else self._content_parts).append(text)
            self._emit_text(kind, text)

    def _step(self) -> bool:
        buf = self._buf
        if not buf:
            return False
        if self._state == _START:
            marker = THINK_START if self.thinking else THINK_END
            if buf.startswith(marker):
                self._buf = buf[len(marker):]
            elif marker.startswith(buf) and not self._final:
                return False  # may still become the marker
            self._state = _REASONING if self.thinking else _CONTENT
            return True
        if self._state == _CONTENT:
            self._emit("content", buf)
            self._buf = ""
            return False
        pos, marker = find_first(buf, self._end_markers)
        if marker is not None:
            self._emit("reasoning_content", buf[:pos])
            # `</think>` is dropped; an implicit end marker belongs to the content (the tool parser needs it)
            self._buf = buf[pos + len(marker):] if marker == THINK_END else buf[pos:]
            self._state = _CONTENT
            return True
        keep = 0 if self._final else partial_suffix_len(buf, self._end_markers)
        self._emit("reasoning_content", buf[:len(buf) - keep])
        self._buf = buf[len(buf) - keep:]
        return False
