"""MTP speculative decoding (SGLang's EAGLE / NEXTN with eagle_topk 1): the checkpoint's NextN layer drafts k tokens
per request, the target verifies them all in the step that also computes the request's last token, and every emitted
token is distributed exactly as without speculation (greedy: identical).

One step of a decoding request that holds drafts d_1..d_k (positions: c = tokens in the cache, x = its last token):
- target verify: the batch row [x, d_1, .., d_k] at positions c..c+k (a multi-token query: each token its own causal
  length in the indexer and attention); row j's logits (penalties as if d_1..d_j were generated) verify d_{j+1}
  (`Ops.verify`: greedy match, or rejection sampling); a accepted drafts and the token of row a are emitted;
- rollback: the cache holds c + a + 1 valid positions; the latent and indexer-key entries of the rejected drafts stay
  in the request's pages as garbage that the next step overwrites before anything reads it (a query at position p
  reads only positions ≤ p, and every step writes positions in increasing order from the first invalid one), so
  rolling back is setting num_cached; pages stay with the request (its next tokens fill them) and go back with it;
  drafts never reach the prefix cache (it takes full pages of the prompt only);
- draft: the MTP layer runs over the positions the target just computed with the tokens that follow them (an
  extend: MTP KV for c..c+a, from the target's hidden states), its last row's argmax is d'_1; then k−1 chain steps
  (one token per request: the previous draft and the MTP layer's own hidden) give d'_2..d'_k.
Prefill chunks run the MTP extend too (the MTP layer keeps KV for every position); the chunk that completes the
prompt samples the first token and drafts. Requests with a grammar do not draft (their mask depends on each token),
nor does a request about to end (drafts never pass max_tokens or the context).

Speculative steps run synchronously (the accepted count decides the next batch), so overlap applies to steps
without speculation only. Every rank of an attention group runs the same batches; with attention data-parallelism
every rank runs 1 + k forward passes per step (target, extend, chain), with padding rows where it has no work.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from dsv32.core.forward_batch import to_device
from dsv32.core.sampling import logprob_tensors

if TYPE_CHECKING:
    from dsv32.core.engine.engine import Engine, Request

log = logging.getLogger("dsv32.speculative")


@dataclass
class AcceptStats:
    """Accept lengths (accepted drafts + 1: tokens emitted per verify) of verify steps that carried drafts."""

    num_steps: int
    histogram: list[int] = field(default_factory=list)  # index L: verify steps that emitted L tokens (L = 1..k+1)
    verify_steps: int = 0
    emitted_tokens: int = 0
    drafted_tokens: int = 0

    def __post_init__(self):
        self.histogram = self.histogram or [0] * (self.num_steps + 2)

    def record(self, drafts: int, emitted: int) -> None:
        self.verify_steps += 1
        self.emitted_tokens += emitted
        self.drafted_tokens += drafts
        self.histogram[emitted] += 1

    @property
    def mean(self) -> float:
        """Average accept length (SGLang's avg_spec_accept_length); 0 before any verify step."""
        return self.emitted_tokens / self.verify_steps if self.verify_steps else 0.0

    def as_dict(self) -> dict:
        return {"spec_num_steps": self.num_steps, "spec_verify_steps": self.verify_steps,
                "spec_emitted_tokens": self.emitted_tokens, "spec_drafted_tokens": self.drafted_tokens,
                "spec_accept_histogram": list(self.histogram), "avg_spec_accept_length": self.mean}


class Speculator:
    """The engine's speculative part: draft counts, row-wise verification, rollback and MTP drafting."""

    def __init__(self, engine: "Engine", num_steps: int):
        if engine.model.mtp is None:
            raise ValueError("speculative decoding needs the model's MTP layer (load it: include_mtp)")
        if engine.cache.spec.num_layers <= engine.model.cfg.num_hidden_layers:
            raise ValueError("speculative decoding needs a KV cache with the MTP layer's own layer (kv_spec mtp=True)")
        self.engine, self.k = engine, num_steps
        self.model, self.runner, self.ops = engine.model, engine.runner, engine.ops
        self.stats = AcceptStats(num_steps)

    # ---- scheduling ---------------------------------------------------------------------------------------------------
    @property
    def reserve_tokens(self) -> int:
        """Positions past a step's first input that the step may write beyond its real inputs: the dummy drafts of a
        verify padded for a graph (up to k), then the chain's MTP KV, whose queued batches are built for the largest
        accepted count (up to position start + 2k − 1)."""
        return 2 * self.k

    def pad_verify(self, work: list[tuple["Request", int]]) -> list[tuple["Request", int]]:
        """When every item is a decoding request's verify and a verify graph fits the batch: each padded to k + 1
        tokens (dummy drafts after its real ones: their rows are never verified, their KV is overwritten later), so
        that the batch replays the graph; else unchanged."""
        for req, _ in work:
            req.verify_pad = 0
        q = self.k + 1
        if not work or not self.runner.graph_fits(len(work), q):
            return work
        if any(req.num_tokens - req.num_cached != 1 or req.num_cached + q > self.engine.cfg.max_model_len
               for req, _ in work):
            return work
        for req, n in work:
            req.verify_pad = q - n
        return [(req, q) for req, _ in work]

    def wanted(self, req: "Request") -> int:
        """Drafts worth making for a request's next step: none with a grammar, never past max_tokens (the verify step
        emits one token more than it accepts) or the context."""
        if req.matcher is not None or req.params.grammar is not None:
            return 0
        left = req.params.max_tokens - len(req.output_ids) - 1
        room = self.engine.cfg.max_model_len - req.num_tokens
        return max(0, min(self.k, left, room))

    # ---- verification -------------------------------------------------------------------------------------------------
    def rows(self, reqs: list["Request"]) -> list[int]:
        """Logit rows per sampled request: one per draft, plus its last."""
        return [len(r.draft_ids) + 1 for r in reqs]

    def uniform(self, work: list[tuple["Request", int]]) -> bool:
        """Every item is a decoding request verifying k + 1 tokens (drafts, padded) without a grammar, and the MTP
        layer's graphs fit the batch: the step queues its drafting right after the verify (draft_queued)."""
        q, limit = self.k + 1, self.engine.cfg.max_model_len
        return bool(work) and all(n == q and req.num_tokens - req.num_cached == 1 and req.matcher is None
                                  and req.params.grammar is None and req.num_cached + 2 * self.k <= limit
                                  for req, n in work) \
            and self.runner.graph_fits(len(work), q, "mtp")

    def verify(self, reqs: list["Request"], logits: torch.Tensor, num_outputs: list[int], width: int | None = None):
        """Row-wise penalties / min_tokens / grammar, then Ops.verify. Row j of a request sees its outputs plus d_1..d_j
        (what it will have generated if those are accepted). width: rows per request (uniform batches: k + 1, the
        rows past its drafts verify nothing), else one per draft plus one. Returns (tokens [R], logprobs or None)."""
        e = self.engine
        prompts, outputs, params, counts, drafts, matchers, gens = [], [], [], [], [], [], []
        for req, n_out in zip(reqs, num_outputs):
            d = req.draft_ids
            penalized = req.params.has_penalties  # only penalties read the history (copied per row)
            for j in range(width or len(d) + 1):
                prompts.append(req.prompt_ids)
                outputs.append(req.output_ids + d[:j] if penalized else None)
                params.append(req.params)
                counts.append(n_out + j)
                drafts.append(d[j] if j < len(d) else -1)
                matchers.append(req.matcher)  # requests with a matcher carry no drafts: one row
                gens.append(req.generator)
        logits = e.sampling_logits(logits, prompts, outputs, params, counts, matchers)
        f32 = dict(dtype=torch.float32)
        tokens = self.ops.verify(logits, torch.tensor(drafts, dtype=torch.int64),
                                 torch.tensor([p.temperature for p in params], **f32),
                                 torch.tensor([p.top_p for p in params], **f32),
                                 torch.tensor([p.top_k for p in params], dtype=torch.int64),
                                 torch.tensor([p.min_p for p in params], **f32), gens)
        return tokens, logprob_tensors(logits, tokens, [p.logprobs for p in params])

    def accept(self, launched, tokens: list[int]) -> list[list[int]]:
        """Per sampled request, the rows whose tokens it emits (the accepted drafts' rows, then the first rejecting or
        the last row); rolls back the cache positions of the rejected drafts (and of the dummy ones) and records the
        accept length."""
        out, r = [], 0
        for req, drafts, end in zip(launched.sampled, launched.drafts, launched.sample_ends):
            width = launched.row_width or len(drafts) + 1
            emitted = [r]
            for j, d in enumerate(drafts):
                if tokens[r + j] != d:
                    break
                emitted.append(r + j + 1)
            req.num_cached = end + len(emitted) - 1  # its inputs and the accepted drafts
            if drafts:
                self.stats.record(len(drafts), len(emitted))
            out.append(emitted)
            r += width
        return out

    # ---- drafting -----------------------------------------------------------------------------------------------------
    def draft(self, launched) -> None:
        """MTP extend over what the launched batch computed (the positions now valid, with the tokens after them), then
        the chain; sets draft_ids of every request that sampled, is still running and wants drafts."""
        e, hidden = self.engine, launched.hidden
        q = self.k + 1
        # a padded verify (every item k + 1 tokens) is followed by a padded extend: k + 1 positions per request, as
        # the verify computed them (the rows past a request's valid ones write MTP KV that is overwritten later)
        padded = all(n == q for _, n in launched.work) and self.runner.graph_fits(len(launched.work), q, "mtp")
        inputs, rows, last, drafting = [], [], [], []
        for (req, n), start, off in zip(launched.work, launched.starts, launched.offsets):
            req.draft_ids = []
            if req.finished or req not in e.running or req.matcher is not None:
                continue
            valid = req.num_cached - start  # positions start..start+valid-1 hold target KV now (after rollback)
            total = len(req.prompt_ids) + len(req.output_ids)
            if valid <= 0 or start + valid >= total:
                continue  # nothing computed, or its next token is not known (cannot happen: a chunk ends before it)
            width = q if padded else valid
            tokens = req.ids(start + 1, start + valid + 1)
            inputs.append((tokens + tokens[-1:] * (width - valid), start, req.pages))
            rows.extend(range(off, off + width))
            if start + valid == total - 1:  # reaches its last token: it drafts
                want = self.wanted(req)
                if want:
                    drafting.append((req, want))
                    last.append(len(rows) - width + valid - 1)
        fb = self.runner.build(inputs, kind="mtp")
        if fb is None:
            self._idle_chain()
            return
        h = self.runner.mtp_hidden(fb, hidden[to_device(torch.tensor(rows, dtype=torch.int64), hidden.device)]
                                   if rows else None)
        if not drafting:
            self._idle_chain()
            return
        pick = to_device(torch.tensor(last, dtype=torch.int64), h.device)
        h_last = h[pick]
        tok = self.model.logits(h_last).argmax(dim=-1)
        drafts = [tok]
        for i in range(2, self.k + 1):  # chain step i drafts d_i from d_{i-1} at the position after
            who = [j for j, (_, want) in enumerate(drafting) if want >= i]
            step_inputs = [([0], req.num_tokens - 2 + i - 1, req.pages) for req, want in drafting if want >= i]
            fb = self.runner.build(step_inputs, kind="mtp")
            if fb is None or not who:
                if fb is not None:
                    self.runner.mtp_hidden(fb)
                continue
            sel = to_device(torch.tensor(who, dtype=torch.int64), h.device)
            fb.input_ids[:len(who)] = tok[sel]
            h_new = self.runner.mtp_hidden(fb, h_last[sel])[:len(who)]
            nxt = self.model.logits(h_new).argmax(dim=-1)
            # keep every drafting request's row (those that stopped keep their last values, unused)
            tok = tok.clone()
            tok[sel] = nxt
            h_last = h_last.clone()
            h_last[sel] = h_new
            drafts.append(tok)
        table = torch.stack(drafts, dim=1)  # [drafting, k']
        e.group.broadcast(table)  # the group's schedulers must agree (argmax of identical logits: a no-op in effect)
        for (req, want), row in zip(drafting, table.tolist()):
            req.draft_ids = row[:want]

    def draft_queued(self, work, starts: list[int], tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Uniform verify batches: the drafting queued on the device right after the verify, with no host sync (the
        host learns the accepted counts with the drafts, at the step's one sync). Row j of a request emitted the token
        at position start + j + 1 (an accepted draft, then the bonus), so the verify's tokens are the MTP extend's
        inputs over positions start..start+k; the accepted count a (leading matches) picks the extend row whose hidden
        state drafts d'_1; chain step i runs at position start + a + i − 1, computed on the device (the batch is built
        for the largest a, so its host-side lengths are upper bounds). Returns the drafts [requests, k]."""
        q, k, bs = self.k + 1, self.k, len(work)
        dev = tokens.device
        drafts = [r.draft_ids + [-1] * (k - len(r.draft_ids)) for r, _ in work]
        tok = tokens.view(bs, q)
        accepted = (tok[:, :k] == to_device(torch.tensor(drafts, dtype=torch.int64), dev)).int().cumprod(1).sum(1)
        fb = self.runner.build([([0] * q, start, req.pages) for (req, _), start in zip(work, starts)], kind="mtp")
        fb.input_ids[:bs * q] = tokens[:bs * q]
        h = self.runner.mtp_hidden(fb, hidden[:bs * q])
        rows = torch.arange(bs, device=dev)
        h_last = h[rows * q + accepted]
        cur = self.model.logits(h_last).argmax(dim=-1)
        out = [cur]
        start = to_device(torch.tensor(starts, dtype=torch.int64), dev)
        P = self.engine.cache.page_size
        for i in range(2, k + 1):
            fb = self.runner.build([([0], s + k + i - 1, req.pages) for (req, _), s in zip(work, starts)], kind="mtp")
            pos = start + accepted + (i - 1)
            page = fb.attn.block_table[:bs].gather(1, (pos // P)[:, None]).squeeze(1).long()
            fb.positions[:bs] = pos  # also the attention metadata's positions (one tensor)
            fb.slots[:bs] = page * P + pos % P
            fb.attn.kv_lens[:bs] = pos + 1
            fb.input_ids[:bs] = cur
            h_last = self.runner.mtp_hidden(fb, h_last)[:bs]
            cur = self.model.logits(h_last).argmax(dim=-1)
            out.append(cur)
        table = torch.stack(out, dim=1)
        self.engine.group.broadcast(table)  # the group's schedulers must agree (argmax of identical logits anyway)
        return table

    def take_drafts(self, launched) -> None:
        """Uniform steps: each running request's drafts from the queued drafting (as many as it wants)."""
        e = self.engine
        for req, row in zip(launched.sampled, launched.queued_drafts.tolist()):
            keep = req in e.running and not req.finished
            req.draft_ids = row[:self.wanted(req)] if keep else []

    def _idle_chain(self) -> None:
        """The chain's forward passes with nothing to draft here: only with attention data-parallelism (the other
        groups' chain steps gather this rank's rows)."""
        if not self.model.groups.dp_attention:
            return
        for _ in range(self.k - 1):
            fb = self.runner.build([], kind="mtp")
            if fb is not None:
                self.runner.mtp_hidden(fb)

    def idle_step(self) -> None:
        """A step of a rank with no requests under attention data-parallelism: the target pass, the MTP extend and the
        chain, each on padding rows."""
        self.runner.idle_step()
        fb = self.runner.build([], kind="mtp")
        if fb is not None:
            self.runner.mtp_hidden(fb)
        self._idle_chain()

