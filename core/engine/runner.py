"""ModelRunner: turns scheduled work into a ForwardBatch, runs the model and returns the logits of the rows to
sample; batches of a uniform shape replay device graphs captured at startup.

Graphs (EngineConfig's graph_max_bs / disable_graphs) are keyed by GraphKey(kind, batch size, tokens per request,
attention path): kind "target" (the model) or "mtp" (the MTP layer alone, speculative drafting); tokens per request 1
(decode; the MTP chain) or, with speculative decoding, k + 1 (verify of k drafts; the MTP extend after it); path
"dense" (every request has ≤ the dense threshold of keys: no indexer logits, attention over every causal key) or
"sparse" (indexer logits + top-k + sparse attention). A batch of n requests with q tokens each runs the graph of the
smallest captured size ≥ n; the extra rows are padding requests of q tokens on the KV cache's scratch page. Each graph
holds the whole pass: embedding, every layer (indexer and top-k included) and, for the target, the LM head (of each
request's last token; with speculative decoding of every token, since every verify row is sampled).

Kernels that size work by host-side lengths (kv_lens_cpu) see the captured upper bound: the dense threshold, or
the context length for the sparse path; their device-side loops stop at each row's real length, and skipped
keys contribute exact zeros, so a replay gives the same logits as the eager step of the same padded batch.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

from dsv32.core.forward_batch import ForwardBatch, to_device
from dsv32.core.kv_cache import KVCache
from dsv32.core.model import DeepseekV32

log = logging.getLogger("dsv32.runner")


def graph_batch_sizes(max_bs: int) -> list[int]:
    """Captured batch sizes up to max_bs (SGLang's ladder: 1, 2, 4, 8, 12, then steps of 8, then 16)."""
    if max_bs <= 0:
        return []
    ladder = [1, 2, 4, 8, 12] + list(range(16, 257, 8)) + list(range(272, max(max_bs, 256) + 16, 16))
    sizes = [s for s in ladder if s < max_bs]
    return sizes + [max_bs]


class EagerGraph:
    """A stand-in DeviceGraph for devices without graphs, used by tests: replay() re-runs the captured function on
    the same static buffers. It checks the runner's plumbing (inputs copied into the buffers the graph reads,
    outputs read from the buffers it writes) without a GPU."""

    def __init__(self, pool=None):
        self.fn = None

    def capture_fn(self, fn) -> None:
        self.fn = fn
        fn()

    def replay(self) -> None:
        self.fn()


class GraphKey(NamedTuple):
    kind: str  # "target" or "mtp"
    batch_size: int
    tokens: int  # per request
    sparse: bool


@dataclass
class _Graph:
    graph: object
    batch: ForwardBatch  # views of the static buffers
    hidden: torch.Tensor | None  # speculative: [bs · q, Hd], written by replay
    logits: torch.Tensor | None  # target: [rows, V] fp32 (each request's last token, or every token), written by replay
    hidden_in: torch.Tensor | None = None  # mtp: [bs · q, Hd], the hidden states the pass reads


class ModelRunner:
    def __init__(self, model: DeepseekV32, cache: KVCache, max_model_len: int, graph_max_bs: int = 0,
                 graph_factory=None, verify_tokens: int = 0):
        """graph_max_bs: largest batch replayed from a graph (0: graphs off). graph_factory: makes DeviceGraphs
        (default: the backend's `new_graph`; tests pass EagerGraph). verify_tokens: k + 1 with speculative decoding
        of k drafts (graphs of the target's verify, and of the MTP layer; every target row's logits), else 0."""
        self.model, self.cache, self.ops = model, cache, model.ops
        self.max_model_len = max_model_len
        self.graph_sizes = graph_batch_sizes(graph_max_bs)
        self._factory = graph_factory
        self.verify_tokens = verify_tokens
        # tokens per request that graphs are captured for, per kind (a padding row's tokens must fit the scratch page)
        q = [verify_tokens] if 1 < verify_tokens <= cache.page_size else []
        self.graph_tokens = {"target": [1] + q, "mtp": ([1] + q) if verify_tokens else []}
        self.graphs: dict[GraphKey, _Graph] = {}
        self._logits: torch.Tensor | None = None  # [max rows, V] fp32, shared by every graph's output
        self.table_width = math.ceil(max_model_len / cache.page_size)
        self.dense_threshold = min(model.dense_kv_threshold, max_model_len)
        self.replays = 0  # steps served by a graph (tests, logs)
        self.groups = model.groups
        self.builds = 0  # batches built (with attention DP: step synchronizations, one per step on every rank)

    # ---- batches ------------------------------------------------------------------------------------
    def build(self, requests: list[tuple[list[int], int, list[int]]], graphs: bool = True,
              kind: str = "target") -> ForwardBatch | None:
        """(new token ids, start position, pages) per request → ForwardBatch, padded to a graph size when a graph of
        `kind` will run it (every request has the same number of tokens, one that graphs were captured for).

        With attention data-parallelism every rank calls this once per step, with or without requests: the groups
        agree on the step's per-group token count (the dense MLP / MoE gather pads to it) and on the graph size. A
        rank with no requests then gets a batch of padding rows so that it joins the step's collectives, or None when
        no group has work (without attention data-parallelism: None for no requests). graphs=False: never padded for
        a graph (every rank of a step passes the same)."""
        if not requests and not self.groups.dp_attention:
            return None
        self.builds += 1
        widths = {len(ids) for ids, _, _ in requests}
        q = widths.pop() if len(widths) == 1 else 0  # tokens per request when uniform
        n_tokens = sum(len(ids) for ids, _, _ in requests)
        graphs = graphs and bool(self.graphs)
        if not self.groups.dp_attention:
            if graphs and q in self.graph_tokens[kind] and len(requests) <= self.graph_sizes[-1]:
                return self._padded(requests, next(s for s in self.graph_sizes if s >= len(requests)), q)
            return ForwardBatch.build(requests, self.cache, self.model.device)
        # the groups agree on one graph (size, tokens per request) or none; an idle group takes any q
        rows = self.groups.all_gather_ints([n_tokens, len(requests) if q or not requests else -1, q])
        if all(n == 0 for n, _, _ in rows):
            return None
        a = self.groups.attn_tp.size
        largest = max(bs for _, bs, _ in rows)
        qs = {w for _, bs, w in rows if bs > 0}
        q = qs.pop() if len(qs) == 1 else 0
        if graphs and all(bs >= 0 for _, bs, _ in rows) and q in self.graph_tokens[kind] \
                and largest <= self.graph_sizes[-1]:
            bs = next(s for s in self.graph_sizes if s >= largest)
            fb = self._padded(requests, bs, q)
            fb.mlp_tokens_per_group = -(-bs * q // a) * a
            return fb
        fb = ForwardBatch.build(requests, self.cache, self.model.device, pad_to=1)  # no requests: one padding row
        fb.mlp_tokens_per_group = -(-max(max(n for n, _, _ in rows), 1) // a) * a
        return fb

    def graph_fits(self, batch_size: int, tokens: int, kind: str = "target") -> bool:
        """A batch of batch_size requests with `tokens` tokens each would replay a graph (one rank's view)."""
        return bool(self.graphs) and tokens in self.graph_tokens[kind] and batch_size <= self.graph_sizes[-1]

    def _padded(self, requests, bs: int, q: int = 1) -> ForwardBatch:
        return ForwardBatch.build(requests, self.cache, self.model.device, pad_to=bs, table_width=self.table_width,
                                  pad_tokens=q)

    def idle_step(self) -> None:
        """A step of a rank with no requests: with attention data-parallelism it still joins the other groups' step
        (a batch of padding rows) so their collectives never wait for it."""
        fb = self.build([])
        if fb is not None:
            self.logits(fb, [])

    def hidden_and_logits(self, fb: ForwardBatch, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Speculative steps: the target's hidden states of every token of fb [T, Hd] (the MTP layer's input) and the
        fp32 logits of the flat token indices `rows`."""
        g = self._graph_for(fb, "target")
        if g is None:
            hidden = self.model.forward(fb, self.cache)
            return hidden, self.model.logits(hidden[self._index(rows, hidden.device)])
        self._replay(g, fb)
        return g.hidden, g.logits[self._index(rows, g.logits.device)]

    def mtp_hidden(self, fb: ForwardBatch, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """The MTP layer's hidden states [T, Hd] on fb (tokens after those whose hidden states are `hidden`): hidden has
        a row for each of fb's first tokens, the rest (padding rows; all of them when None) read zeros."""
        n = 0 if hidden is None else hidden.shape[0]
        g = self._graph_for(fb, "mtp")
        if g is None:
            if n == fb.num_tokens:
                return self.model.forward_mtp(fb, self.cache, hidden)
            h = torch.zeros(fb.num_tokens, self.model.cfg.hidden_size, dtype=self.model.dtype, device=self.model.device)
            if n:
                h[:n] = hidden
            return self.model.forward_mtp(fb, self.cache, h)
        g.hidden_in[n:].zero_()
        if n:
            g.hidden_in[:n].copy_(hidden)
        self._replay(g, fb)
        return g.hidden

    @staticmethod
    def _index(rows: list[int], device) -> torch.Tensor:
        return to_device(torch.tensor(rows, dtype=torch.int64), device)

    def _replay(self, g: _Graph, fb: ForwardBatch) -> None:
        b = g.batch
        b.input_ids.copy_(fb.input_ids)
        b.positions.copy_(fb.positions)
        b.slots.copy_(fb.slots)
        b.attn.kv_lens.copy_(fb.attn.kv_lens)
        b.attn.block_table.copy_(fb.attn.block_table)
        g.graph.replay()
        self.replays += 1

    def _graph_for(self, fb: ForwardBatch, kind: str = "target") -> _Graph | None:
        if not self.graphs or not fb.tokens_per_request or fb.attn.block_table.shape[1] != self.table_width:
            return None
        g = self.graphs.get(GraphKey(kind, fb.attn.block_table.shape[0], fb.tokens_per_request,
                                     fb.max_kv_len > self.dense_threshold))
        # with attention DP the graph's gather size must be the step's (the other groups' collectives use it)
        return g if g is not None and g.batch.mlp_tokens_per_group == fb.mlp_tokens_per_group else None

    def logits(self, fb: ForwardBatch, rows: list[int], tokens: list[int] | None = None):
        """Runs the step; returns fp32 logits [len(rows), V] for the given request rows (their last tokens). With
        `tokens` (flat token indices of the batch: prompt logprobs) returns (those logits, logits [len(tokens), V])."""
        g = None if tokens or self.verify_tokens else self._graph_for(fb)
        if g is None:
            hidden = self.model.forward(fb, self.cache)
            extra = self.model.logits(hidden[to_device(torch.tensor(tokens, dtype=torch.int64), hidden.device)]) \
                if tokens else None
            if not rows:
                out = hidden.new_empty(0, self.model.cfg.vocab_size, dtype=torch.float32)
                return (out, extra) if tokens else out
            idx = fb.logits_indices
            if rows != list(range(idx.shape[0])):
                idx = idx[to_device(torch.tensor(rows, dtype=torch.int64), idx.device)]
            out = self.model.logits(hidden[idx])
            return (out, extra) if tokens else out
        self._replay(g, fb)
        if rows == list(range(fb.num_requests)):
            return g.logits[:fb.num_requests]
        return g.logits[to_device(torch.tensor(rows, dtype=torch.int64), g.logits.device)]

    # ---- capture ------------------------------------------------------------------------------------
    def capture(self) -> None:
        """Captures one graph per (kind, batch size, tokens per request, attention path), largest first; logs
        progress."""
        if not self.graph_sizes:
            return
        factory = self._factory
        if factory is None:
            why = self.ops.platform().graphs
            if why:
                raise RuntimeError(f"device graphs are not available: {why}; set disable_graphs")
            factory = self.ops.new_graph
        # dense: batches whose requests all have ≤ the threshold of keys (none when the threshold is 0)
        paths = ([False] if self.dense_threshold > 0 else []) + ([True] if self.max_model_len > self.dense_threshold else [])
        todo = [GraphKey(kind, bs, q, sparse) for kind, qs in self.graph_tokens.items() for q in reversed(qs)
                for bs in reversed(self.graph_sizes) for sparse in paths]
        # One logits buffer for all graphs (only one replays at a time): per-graph outputs would cost Σ rows · V · 4 B.
        rows = self.graph_sizes[-1] * max(self.verify_tokens, 1)
        self._logits = torch.empty(rows, self.model.cfg.vocab_size, dtype=torch.float32, device=self.model.device)
        pool = self.ops.graph_pool() if self._factory is None else None
        t0 = time.monotonic()
        log.info("capturing %d device graphs: batch sizes 1..%d × attention paths %d × %s", len(todo),
                 self.graph_sizes[-1], len(paths),
                 " + ".join(f"{kind} ({'/'.join(map(str, qs))} tokens per request)"
                            for kind, qs in self.graph_tokens.items() if qs))
        for k, key in enumerate(todo):
            self.graphs[key] = self._capture_one(factory, pool, key)
            if k == 0 or (k + 1) % 8 == 0 or k + 1 == len(todo):
                log.info("captured %d/%d graphs (%s bs %d × %d, %s) in %.1f s", k + 1, len(todo), key.kind,
                         key.batch_size, key.tokens, "sparse" if key.sparse else "dense", time.monotonic() - t0)

    def _capture_one(self, factory, pool, key: GraphKey) -> _Graph:
        bs, q = key.batch_size, key.tokens
        fb = self._padded([], bs, q)
        a = self.groups.attn_tp.size
        fb.mlp_tokens_per_group = -(-bs * q // a) * a if self.groups.dp_attention else 0
        # The static batch claims the captured path's upper bound of keys; the real lengths are in kv_lens.
        fb.attn.kv_lens_cpu = [self.max_model_len if key.sparse else self.dense_threshold] * bs
        fb.num_requests = bs
        hidden_in = logits = None
        spec = self.verify_tokens > 0  # speculative: the hidden states feed the MTP layer; every row is sampled
        # static outputs (the copies are what EagerGraph's re-runs refresh; a device graph writes them in place)
        hidden = torch.empty(bs * q, self.model.cfg.hidden_size, dtype=self.model.dtype, device=self.model.device) \
            if spec else None
        if key.kind == "mtp":
            hidden_in = torch.zeros_like(hidden)

            def step():
                hidden.copy_(self.model.forward_mtp(fb, self.cache, hidden_in))
        else:
            logits = self._logits[:bs * q] if spec else self._logits[:bs]

            def step():
                h = self.model.forward(fb, self.cache)
                if spec:
                    hidden.copy_(h)
                logits.copy_(self.model.logits(h if spec else h[fb.logits_indices]))

        step()  # warm-up outside capture: compiles kernels, settles allocator pools
        self.ops.synchronize()
        graph = factory(pool) if pool is not None else factory()
        if isinstance(graph, EagerGraph):
            graph.capture_fn(step)
        else:
            with graph.capture():
                step()
        self.ops.synchronize()
        return _Graph(graph, fb, hidden, logits, hidden_in)
