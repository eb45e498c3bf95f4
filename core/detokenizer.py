"""Incremental detokenization with stop strings.

Byte-level BPE tokens do not map to whole characters: a token may end inside a UTF-8 sequence, and a
tokenizer's decode of a suffix can differ from the tail of decoding the whole (leading spaces). So, as vLLM
and SGLang do, each step decodes a short window [prefix_offset:] and emits only what extends the window's
previous decode, holding back text that ends in an incomplete character (U+FFFD).

Stop strings: the text is searched for any stop string as it grows; on a hit the text is cut before it (or
after it with no_stop_trim) and the request finishes. While the text ends with a proper prefix of a stop
string, that tail is held back, so a stop string never leaks into streamed output.
"""

from __future__ import annotations


def special_token_ids(tokenizer) -> dict[str, int]:
    """The tokenizer's special tokens (those skip_special_tokens drops): text → id."""
    return {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True,
                 stop: list[str] | None = None, no_stop_trim: bool = False, min_tokens: int = 0,
                 keep_special_tokens: tuple[str, ...] = ()):
        """keep_special_tokens: special tokens (text) that skipping keeps (the markers a tool parser reads)."""
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # skipping all but some: drop the other special ids ourselves and decode the rest as they are
        self._drop = None
        if skip_special_tokens and keep_special_tokens:
            self._drop = {i for text, i in special_token_ids(tokenizer).items() if text not in keep_special_tokens}
        self.stop = list(stop or [])
        self.no_stop_trim = no_stop_trim
        self.min_tokens = min_tokens  # stop strings count only once this many tokens exist
        self.ids: list[int] = []
        # Start the window a few prompt tokens back so the first output token decodes in context.
        self._context = list(prompt_ids[-5:])
        self._prefix_offset = 0
        self._read_offset = len(self._context)
        self.text = ""  # all output text decoded so far (before any stop trimming)
        self._emitted = 0  # characters of `final_text` already handed out
        self.stopped_by: str | None = None
        self._stop_at: int | None = None

    def _decode(self, ids: list[int]) -> str:
        if self._drop is not None:
            return self.tokenizer.decode([i for i in ids if i not in self._drop], skip_special_tokens=False)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> None:
        """Feed one generated token; updates text and stop status."""
        self.ids.append(token_id)
        window = self._context + self.ids
        prefix = self._decode(window[self._prefix_offset:self._read_offset])
        full = self._decode(window[self._prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self._prefix_offset, self._read_offset = self._read_offset, len(window)
        if self.stop and self._stop_at is None and len(self.ids) >= self.min_tokens:
            self._find_stop()

    def flush(self) -> None:
        """At the end: take whatever the window still holds back (an incomplete character decodes to U+FFFD)."""
        window = self._context + self.ids
        prefix = self._decode(window[self._prefix_offset:self._read_offset])
        full = self._decode(window[self._prefix_offset:])
        if len(full) > len(prefix):
            self.text += full[len(prefix):]
            self._prefix_offset = self._read_offset = len(window)
            if self.stop and self._stop_at is None and len(self.ids) >= self.min_tokens:
                self._find_stop()

    def _find_stop(self) -> None:
        longest = max(len(s) for s in self.stop)
        start = max(0, self._emitted - longest)
        hits = [(self.text.find(s, start), s) for s in self.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            i, s = min(hits)
            self.stopped_by = s
            self._stop_at = i + len(s) if self.no_stop_trim else i

    @property
    def final_text(self) -> str:
        return self.text if self._stop_at is None else self.text[: self._stop_at]

    def _held_back(self) -> int:
        """Length of the text's tail that could still become a stop string."""
        if not self.stop or self._stop_at is not None:
            return 0
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    held = max(held, k)
                    break
        return held

    def take_delta(self, finished: bool) -> str:
        """New text safe to emit now (everything remaining when finished)."""
        text = self.final_text
        end = len(text) if finished else len(text) - self._held_back()
        if end <= self._emitted:
            return ""
        delta = text[self._emitted:end]
        self._emitted = end
        return delta
