"""Tokenization for the HTTP process: never on the event loop for big inputs, bounded before it starts, and safe
against special-token text in chat messages.

- The Rust tokenizer holds the GIL for the whole encode (a 6 MB text blocks every other coroutine for seconds), so
  texts over INLINE_CHARS are encoded in a worker process (a one-process pool, recycled after each big job so its
  memory goes back); small ones inline, where that costs microseconds.
- A text longer than max_model_len × the longest token's bytes cannot fit the context whatever its tokens: it is
  refused before anything is encoded (`check_length`).
- Chat messages and tool definitions come from the client: text in them that spells a special or added token
  (`<｜User｜>`, `<｜end▁of▁sentence｜>`, `｜DSML｜`, `</think>`, ...) must not become that token, or a user could forge
  turns or tool calls. `protect` swaps each such text for an alphanumeric marker before the prompt is rendered;
  `encode_chat` tokenizes the rendered prompt normally between markers and each swapped text with a tokenizer that
  knows no added tokens. Without such text (the usual case) the prompt is encoded exactly as before.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import re
import secrets
from concurrent.futures import ProcessPoolExecutor

INLINE_CHARS = 1 << 16

_worker = None  # (tokenizer, plain tokenizer) in a pool process


def plain_twin(tok):
    """The same tokenizer without its added tokens: their text is encoded as ordinary text."""
    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    spec["added_tokens"] = []
    return Tokenizer.from_str(json.dumps(spec))


def _init_worker(spec: str) -> None:
    from tokenizers import Tokenizer

    global _worker
    tok = Tokenizer.from_str(spec)
    _worker = (tok, plain_twin(tok))


def _encode_in_worker(text: str, pieces: list[str], marker: str | None) -> list[int]:
    return encode_pieces(*_worker, text, pieces, marker)


def encode_pieces(tok, plain, text: str, pieces: list[str], marker: str | None) -> list[int]:
    """Token ids of text; where `marker` + i + 'X' stands, pieces[i] encoded as plain text."""
    if not marker:
        return tok.encode(text, add_special_tokens=False).ids
    ids: list[int] = []
    pattern = re.compile(re.escape(marker) + r"(\d+)X")
    pos = 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            ids += tok.encode(text[pos:m.start()], add_special_tokens=False).ids
        ids += plain.encode(pieces[int(m.group(1))], add_special_tokens=False).ids
        pos = m.end()
    if pos < len(text):
        ids += tok.encode(text[pos:], add_special_tokens=False).ids
    return ids


class Tokenization:
    def __init__(self, tokenizer, max_model_len: int, allow_special_in_messages: bool = False, workers: int = 1):
        self.workers = workers
        self.tok, self.plain = tokenizer, plain_twin(tokenizer)
        self.max_model_len = max_model_len
        self.allow_special = allow_special_in_messages
        added = self.tok.get_added_tokens_decoder()
        self.added_texts = sorted({t.content for t in added.values()}, key=len, reverse=True)
        self._added_re = re.compile("|".join(re.escape(t) for t in self.added_texts)) if self.added_texts else None
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self.max_token_bytes = max(len(self.tok.decode([i], skip_special_tokens=False).encode("utf-8"))
                                   for i in vocab.values()) or 1
        self._pool: ProcessPoolExecutor | None = None

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                             initargs=(self.tok.to_str(),), max_tasks_per_child=1)
        return self._pool

    def check_length(self, text: str, field: str) -> None:
        """Refuse (ValueError naming `field`) a text that cannot fit the context with any tokenization."""
        if len(text) * 4 > self.max_model_len * self.max_token_bytes and \
                len(text.encode("utf-8", "surrogatepass")) > self.max_model_len * self.max_token_bytes:
            raise ValueError(f"{field}: {len(text)} characters cannot fit this model's context of "
                             f"{self.max_model_len} tokens")

    async def encode(self, text: str, pieces: list[str] | None = None, marker: str | None = None) -> list[int]:
        """Token ids (no BOS added: prompts carry their own), off the event loop for big texts."""
        if len(text) <= INLINE_CHARS:
            return encode_pieces(self.tok, self.plain, text, pieces or [], marker)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._get_pool(), _encode_in_worker, text, pieces or [], marker)

    def protect(self, obj, marker: str | None = None):
        """obj (messages / tools) with every added token's text inside its strings swapped for a marker; returns
        (new obj, pieces, marker), or (obj, [], None) when there is nothing to swap or swapping is allowed."""
        if self.allow_special or self._added_re is None:
            return obj, [], None
        pieces: list[str] = []
        marker = marker or "DSV32X" + secrets.token_hex(8) + "N"

        def swap(m):
            pieces.append(m.group(0))
            return f"{marker}{len(pieces) - 1}X"

        def walk(v):
            if isinstance(v, str):
                return self._added_re.sub(swap, v) if self._added_re.search(v) else v
            if isinstance(v, list):
                return [walk(x) for x in v]
            if isinstance(v, dict):
                return {k: walk(x) for k, x in v.items()}
            return v

        out = walk(obj)
        return (out, pieces, marker) if pieces else (obj, [], None)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
