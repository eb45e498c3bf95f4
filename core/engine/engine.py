"""Engine: requests, a FCFS scheduler over the paged KV cache, and the schedule → run → sample → update step.

Each step builds one ForwardBatch under a token budget (chunked prefill): running requests first, in
admission order, each taking min(tokens left to compute, budget left) — 1 for a decoding request, a chunk of
the prompt for a prefilling one — then newly admitted requests. Logits are taken only for requests whose
chunk reaches their last token. A request is admitted when pages for its remaining prompt are free (counting
prefix-cache pages that can be evicted). When a running request needs a page and none can be freed, the most
recently admitted request is preempted: its pages are released and it returns to the front of the queue with
prompt + generated tokens, to be recomputed. Per-request generators keep seeded sampling identical with or
without preemption, batching or prefix hits.

Overlap (SchedulerConfig.overlap, SGLang's overlap scheduler): a step schedules and launches batch N+1 before it
reads batch N's sampled tokens, so the host's scheduling, batch building and output processing run while the
device computes. A request sampled in N and scheduled again in N+1 gets its input token from N's token tensor on
the device. Consequences kept invisible: a request that N finishes may run one extra token in N+1, which is
dropped, and its pages are freed only once N+1 is done; preemption, and batches with penalties (which need the
previous token on the host), first wait for N. Outputs are identical with and without overlap.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from dsv32.core.config import SchedulerConfig
from dsv32.core.engine.batch_log import BatchLog
from dsv32.core.detokenizer import IncrementalDetokenizer
from dsv32.core.engine.runner import ModelRunner
from dsv32.core.forward_batch import to_device
from dsv32.core.kv_cache import KVCache
from dsv32.core.model import DeepseekV32
from dsv32.core.prefix_cache import PrefixCache
from dsv32.core.sampling import (LogprobTensors, SamplingParams, TokenLogprob, apply_penalties, apply_token_bitmask,
                                 logprob_tensors, mask_stops_before_min_tokens, token_logprobs)

log = logging.getLogger("dsv32.engine")

LPM_MAX_QUEUE = 128  # schedule_policy "lpm" sorts the waiting queue only up to this length (SGLang's bound)


@dataclass(eq=False)  # identity: requests are found in queues by `is`, never by value
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose KV is in the cache
    cached_prompt_tokens: int = 0  # prompt tokens reused from the prefix cache (first admission)
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # what stopped it: the stop / EOS token id or the stop string
    generator: torch.Generator | None = None
    detok: IncrementalDetokenizer | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_preemptions: int = 0
    arrival_s: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None
    pending: int = 0  # tokens sampled by launched batches, not yet read back (overlap: at most 2, briefly)
    inflight: int = 0  # launched batches that include this request and are not finished
    suspect: bool = False  # was running when a step failed: runs alone until it samples a token (failure isolation)
    error: str | None = None  # why it was aborted when a step that ran it alone failed
    matcher: object | None = None  # structured output: its grammar state (core/grammar.py; sampling rank only)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # params.prompt_logprobs: tokens 2.. so far
    prompt_logprobs_sent: bool = False
    draft_ids: list[int] = field(default_factory=list)  # speculative decoding: tokens drafted to verify next step
    verify_pad: int = 0  # dummy drafts after them in this step's verify (padded to the graph's width)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def ids(self, start: int, end: int) -> list[int]:
        """all_ids[start:end] without copying the whole sequence (a step reads a few tokens of a long one)."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n:end - n]
        return self.prompt_ids[start:] + self.output_ids[:end - n]

    @property
    def num_tokens(self) -> int:
        """Prompt + generated tokens, counting a sampled token still on the device."""
        return len(self.prompt_ids) + len(self.output_ids) + self.pending

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StepOutput:
    """What one step produced for one request: new tokens (and their text / logprobs) and, at the end, why."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: str | None
    logprobs: list[TokenLogprob]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    error: str | None = None  # the request failed in the engine (finish_reason "abort"): why
    stop_reason: int | str | None = None  # finish_reason "stop": the token id or stop string that matched
    prompt_logprobs: list[TokenLogprob] | None = None  # params.prompt_logprobs: with the request's first output


@dataclass
class _Launched:
    """A batch on the device: its work, the requests it samples, and host copies of its results (valid once
    `event` has completed; None event: the device is synchronous)."""

    work: list[tuple[Request, int]]
    sampled: list[Request]
    tokens: torch.Tensor  # device [S]: read by the next batch's inputs
    tokens_host: torch.Tensor
    logprobs_host: LogprobTensors | None
    event: object | None
    # speculative decoding (core/engine/speculative.py): per sampled request its drafts (rows: one per draft, then its
    # last) and the position after its inputs before the drafts; per work item its first position and flat offset;
    # the target's hidden states [T, Hd]
    drafts: list[list[int]] | None = None
    sample_ends: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    hidden: torch.Tensor | None = None
    row_width: int = 0  # rows per sampled request when uniform (k + 1), else 0: one per draft plus one
    queued_drafts: torch.Tensor | None = None  # uniform: the drafts queued after the verify [requests, k] (host copy)


class _NeedsSync(Exception):
    """Scheduling needs to preempt while a batch is in flight: finish that batch first."""


class Engine:
    def __init__(self, model: DeepseekV32, cache: KVCache, config: SchedulerConfig, tokenizer=None,
                 runner: ModelRunner | None = None, speculative_steps: int = 0):
        """config.max_model_len must be resolved (an int); config.overlap is taken as is (the caller turns it off
        where the device runs synchronously). speculative_steps: draft tokens per request per step with the model's
        MTP layer (0: no speculative decoding; the cache needs the MTP layer's layer)."""
        self.model, self.cache, self.ops, self.cfg = model, cache, model.ops, config
        self.runner = runner or ModelRunner(model, cache, config.max_model_len)
        # Ranks of an attention group run identical engines; its first rank samples and the others take its tokens.
        self.group = model.groups.attn_tp
        self.samples = self.group.rank == 0
        self._launched: _Launched | None = None
        self.tokenizer = tokenizer
        self.eos_ids = set(model.cfg.eos_token_ids)
        self.prefix_cache = PrefixCache(cache.allocator, cache.page_size) if config.enable_prefix_cache else None
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._ids = itertools.count()
        self._pending: list[StepOutput] = []  # outputs produced outside a forward step (aborts)
        self._stepping: list[Request] = []  # the requests the step under way has touched (failure isolation)
        self._usage, self._usage_at = 0.0, 0.0
        self.num_preemptions = 0
        self.overlapped_steps = 0  # launches made while the previous batch was still unread
        # the group's first rank logs for the group (its other ranks run the same batches)
        self.batch_log = BatchLog(config.decode_log_interval, enabled=self.samples, device_type=model.device.type)
        self.grammars = None  # core.grammar.EngineGrammars, made with the first constrained request
        self.spec = None
        if speculative_steps:
            from dsv32.core.engine.speculative import Speculator

            self.spec = Speculator(self, speculative_steps)

    # ---- requests -----------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> Request:
        if not prompt_ids:
            raise ValueError("prompt is empty: give at least one token")
        vocab = self.model.cfg.vocab_size
        bad = [t for t in prompt_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        if len(prompt_ids) >= self.cfg.max_model_len:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the context length is {self.cfg.max_model_len} "
                             "(prompt + at least one generated token must fit)")
        bad = [t for t in params.token_ids() if t >= vocab]
        if bad:
            raise ValueError(f"token ids in stop_token_ids / logit_bias out of range [0, {vocab}): {bad[:5]}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; use stop_token_ids")
        req = Request(request_id or str(next(self._ids)), list(prompt_ids), params)
        if params.grammar is not None and self.samples:
            if self.grammars is None:
                from dsv32.core.grammar import EngineGrammars

                self.grammars = EngineGrammars(self.tokenizer, vocab, sorted(self.eos_ids))
            req.matcher = self.grammars.matcher(params.grammar)
        if params.seed is not None:
            req.generator = torch.Generator(device=self.model.device).manual_seed(params.seed)
        if self.tokenizer is not None:
            req.detok = IncrementalDetokenizer(self.tokenizer, req.prompt_ids, params.skip_special_tokens,
                                               params.stop, params.no_stop_trim, params.min_tokens,
                                               params.keep_special_tokens)
        self.waiting.append(req)
        return req

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is; frees its pages. Returns False if it is unknown or already done."""
        for queue in (self.waiting, self.running):
            for req in queue:
                if req.request_id == request_id:
                    queue.remove(req)
                    self._release(req)
                    req.finish_reason = "abort"
                    self._pending.append(self._output(req, [], []))
                    return True
        return False

    def flush_cache(self) -> bool:
        """Empties the prefix cache (SGLang's /flush_cache) and zeroes its hit counters; False (nothing done) while
        any request is queued or running, as their pages may be shared with it."""
        if self.has_work():
            return False
        if self.prefix_cache is not None:
            self.prefix_cache.clear()
            self.prefix_cache.hit_tokens = self.prefix_cache.query_tokens = 0
        log.info("cache flushed")
        return True

    def idle_step(self) -> None:
        """A step without requests of a rank under attention data-parallelism: joins the other groups' passes."""
        if self.spec is not None:
            self.spec.idle_step()
        else:
            self.runner.idle_step()

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._pending or self._launched)

    @property
    def kv_usage(self) -> float:
        """Share of KV pages held by requests (as SGLang's token usage: pages the prefix cache could evict count
        as free). Refreshed at most every 0.5 s: counting evictable pages walks the prefix tree."""
        now = time.monotonic()
        if now - self._usage_at > 0.5 or not self.has_work():
            a, pc = self.cache.allocator, self.prefix_cache
            self._usage = 1.0 - (a.num_free + (pc.evictable() if pc else 0)) / a.num_pages
            self._usage_at = now
        return self._usage

    # ---- one step -----------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Runs one forward pass (if anything is schedulable); returns the outputs that became known: this step's
        without overlap, the previous step's with it.

        A failing step aborts only what it can attribute (config.isolate_failures; ranks of a group must fail
        together, so several ranks end the run instead): every request it ran goes back to the queue, as after a
        preemption (recomputed later: greedy and seeded outputs unchanged), marked suspect; suspects then run
        one at a time, each alone in its steps, until it samples a token (cleared) or a step that ran it alone
        fails (aborted, with the error in its output)."""
        try:
            return self._step()
        except Exception as e:
            if not self.cfg.isolate_failures:
                raise
            log.error("engine step failed (%s: %s); isolating the requests it ran", type(e).__name__, e,
                      exc_info=True)
            return self._recover(f"{type(e).__name__}: {e}")

    def _recover(self, error: str) -> list[StepOutput]:
        """The failed step's requests (its batch and the one in flight before it) back to the queue as suspects, or
        the suspect that ran alone aborted."""
        stepping, self._launched, self._stepping = list(dict.fromkeys(self._stepping)), None, []
        for req in stepping:  # the dropped batches write nothing more
            req.pending = req.inflight = 0
            if req.finished:
                self._release(req)  # its pages waited for a batch in flight
        involved = [r for r in stepping if r in self.running]
        if len(involved) == 1 and involved[0].suspect:  # it failed alone: the cause
            req = involved[0]
            self.running.remove(req)
            self._release(req)
            req.suspect = False
            req.finish_reason, req.error = "abort", f"the request failed in the engine ({error})"
            return [self._output(req, [], [])]
        for req in sorted(involved, key=self.running.index, reverse=True):  # front of the queue, order kept
            self._requeue(req)
            req.suspect = True
        return []

    def _step(self) -> list[StepOutput]:
        # what a failure of this step involves: the batch in flight and the one this step schedules
        self._stepping = [r for r, _ in self._launched.work] if self._launched is not None else []
        outputs, self._pending = self._pending, []
        # (params, not matchers: every rank of the group must make the same choice, and only the first has matchers)
        if self._launched is not None and any(r.params.has_penalties or r.params.grammar is not None
                                              for r in self.running):
            outputs += self._sync()  # penalties and grammars read every generated token on the host
        try:
            work = self._schedule(can_preempt=self._launched is None)
        except _NeedsSync:
            outputs += self._sync()
            work = self._schedule(can_preempt=True)
        self._stepping += [r for r, _ in work]
        previous, self._launched = self._launched, self._launch(work) if work else None
        if previous is not None and self._launched is not None:
            self.overlapped_steps += 1
        if previous is not None:
            outputs += self._finish(previous)
        if (not self.cfg.overlap or self._isolating() or self.spec is not None) and self._launched is not None:
            outputs += self._sync()  # a suspect's step must succeed or fail on its own
        return outputs

    def _isolating(self) -> Request | None:
        """The suspect that runs alone now (the first one, running or waiting), if any."""
        return next((r for q in (self.running, self.waiting) for r in q if r.suspect), None)

    def _sync(self) -> list[StepOutput]:
        launched, self._launched = self._launched, None
        return self._finish(launched) if launched is not None else []

    def _launch(self, work: list[tuple[Request, int]]) -> _Launched:
        """Builds the batch, queues the forward pass and the sampling on the device; returns without waiting."""
        inputs, from_device = [], []  # from_device: (flat token index, row of the previous batch's tokens)
        flat, starts, offsets = 0, [], []
        prev_row = {id(r): i for i, r in enumerate(self._launched.sampled)} if self._launched else {}
        for req, n in work:
            if req.pending:  # its input is the token the launched batch sampled: still on the device
                assert n == 1 and req.num_cached == req.num_tokens - 1
                from_device.append((flat, prev_row[id(req)]))
                inputs.append(([0], req.num_cached, req.pages))
            else:  # speculative: a decoding request's last token, then its drafts
                real = n - len(req.draft_ids) - req.verify_pad
                ids = req.ids(req.num_cached, req.num_cached + real) + req.draft_ids
                ids += ids[-1:] * req.verify_pad
                inputs.append((ids, req.num_cached, req.pages))
            starts.append(req.num_cached)
            offsets.append(flat)
            flat += n
        fb = self.runner.build(inputs)
        if from_device:
            dst, src = (to_device(torch.tensor(x, dtype=torch.int64), fb.input_ids.device) for x in zip(*from_device))
            fb.input_ids[dst] = self._launched.tokens[src]
        rows = [i for i, (req, n) in enumerate(work)
                if req.num_cached + n == req.num_tokens + len(req.draft_ids) + req.verify_pad]
        reqs = [work[i][0] for i in rows]
        num_outputs = [len(r.output_ids) + r.pending for r in reqs]
        prefill = [(req, n) for req, n in work if req.num_cached < len(req.prompt_ids)]
        first = [req for req, _ in prefill if req.num_cached == req.cached_prompt_tokens]
        wanted = self._prompt_positions(work)  # (request, flat index, target token) for prompt logprobs
        # speculative, every request verifying k + 1 (padded) tokens: drafting is queued right after the verify
        uniform = self.spec is not None and self.spec.uniform(work)
        for req, n in work:
            req.num_cached += n
            req.inflight += 1
        replays, hidden = self.runner.replays, None
        if self.spec is not None:  # the target's hidden states feed the MTP layer; logits of every verify row
            last = [offsets[i] + work[i][1] - work[i][0].verify_pad - 1 for i in rows]  # each one's last real token
            flat_rows = list(range(flat)) if uniform else [t - len(work[i][0].draft_ids) + j for i, t in zip(rows, last)
                                                           for j in range(len(work[i][0].draft_ids) + 1)]
            hidden, logits = self.runner.hidden_and_logits(fb, flat_rows)
            if wanted:
                self._record_prompt_logprobs(wanted, self.model.logits(
                    hidden[to_device(torch.tensor([f for _, f, _ in wanted], dtype=torch.int64), hidden.device)]))
        elif wanted:
            logits, prompt_logits = self.runner.logits(fb, rows, [f for _, f, _ in wanted])
            self._record_prompt_logprobs(wanted, prompt_logits)  # every rank: they must want the same positions
        else:
            logits = self.runner.logits(fb, rows)
        if prefill:
            self.batch_log.prefill(len(first), sum(n for _, n in prefill), sum(r.cached_prompt_tokens for r in first),
                                   self.kv_usage, len(self.running), len(self.waiting))
        if len(prefill) < len(work):
            self.batch_log.decode(len(self.running), sum(r.num_cached for r in self.running), self.kv_usage,
                                  self.runner.replays > replays, len(self.waiting))
        if reqs and self.samples and self.spec is not None:
            tokens, lps = self.spec.verify(reqs, logits, num_outputs, self.spec.k + 1 if uniform else None)
        elif reqs and self.samples:
            logits = self.sampling_logits(logits, [r.prompt_ids for r in reqs], [r.output_ids for r in reqs],
                                          [r.params for r in reqs], num_outputs, [r.matcher for r in reqs])
            tokens = self._sample(reqs, logits)
            lps = logprob_tensors(logits, tokens, [r.params.logprobs for r in reqs])
        else:
            tokens, lps = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device), None
        if reqs:
            self.group.broadcast(tokens)  # no-op in a group of one
        for req in reqs:
            req.pending += 1
        queued = _host_copy(self.spec.draft_queued(work, starts, tokens, hidden)) if uniform else None
        event = self.ops.new_event()
        tokens_host = _host_copy(tokens)
        if lps is not None:
            lps = LogprobTensors(_host_copy(lps.chosen), _host_copy(lps.top_values), _host_copy(lps.top_ids), lps.want)
        if event is not None:
            event.record()
        launched = _Launched(work, reqs, tokens, tokens_host, lps, event)
        if self.spec is not None:
            launched.drafts = [list(r.draft_ids) for r in reqs]
            launched.row_width = self.spec.k + 1 if uniform else 0
            launched.queued_drafts = queued  # complete with the event, as the tokens
            launched.sample_ends = [starts[i] + work[i][1] - len(work[i][0].draft_ids) - work[i][0].verify_pad
                                    for i in rows]
            launched.starts, launched.offsets, launched.hidden = starts, offsets, hidden
        return launched

    def _finish(self, launched: _Launched) -> list[StepOutput]:
        """Reads a launched batch's tokens (waiting for it) and applies them: stop checks, outputs, page release."""
        if launched.event is not None:
            launched.event.synchronize()
        tokens = launched.tokens_host.tolist()
        lps = token_logprobs(launched.logprobs_host, tokens)
        outputs = []
        now = time.monotonic()
        for req, n in launched.work:
            req.inflight -= 1
        # the rows whose tokens each sampled request emits: its one row, or (speculative) its accepted drafts' and one
        emitted = self.spec.accept(launched, tokens) if launched.drafts is not None else [[i] for i in range(len(tokens))]
        for req, rows in zip(launched.sampled, emitted):
            req.pending -= 1
            if req.finished:  # finished or aborted while this batch ran: the extra token is dropped
                continue
            if req.first_token_s is None:
                req.first_token_s = now
            if not req.output_ids and self.prefix_cache is not None:
                self.prefix_cache.insert(req.prompt_ids, req.pages)  # prompt computed: shareable from now on
            new, new_lps = [], []
            for r in rows:
                tok, lp = tokens[r], lps[r]
                req.output_ids.append(tok)
                new.append(tok)
                if req.matcher is not None and not req.matcher.accept(tok):
                    log.error("request %s: token %d is outside its grammar", req.request_id, tok)
                self.batch_log.sampled(1)
                if lp is not None:
                    req.logprobs.append(lp)
                    new_lps.append(lp)
                if req.detok is not None:
                    req.detok.add(tok)
                self._check_stop(req, tok)
                if req.finished:  # the tokens after a stop are dropped
                    break
            req.suspect = False  # a step that ran it alone succeeded
            if req.finished:
                self.running.remove(req)
            outputs.append(self._output(req, new, new_lps))
        if launched.queued_drafts is not None:
            self.spec.take_drafts(launched)
        elif launched.drafts is not None:
            self.spec.draft(launched)
        for req, n in launched.work:
            if req.finished and req.inflight == 0:
                self._release(req)
        return outputs

    def _output(self, req: Request, new: list[int], lps: list[TokenLogprob]) -> StepOutput:
        text = ""
        if req.detok is not None:
            if req.finished:
                req.detok.flush()
            text = req.detok.take_delta(req.finished)
        prompt_lps = None
        if req.params.prompt_logprobs is not None and not req.prompt_logprobs_sent and (new or req.finished):
            prompt_lps, req.prompt_logprobs_sent = list(req.prompt_logprobs), True
        return StepOutput(req.request_id, new, text, req.finished, req.finish_reason, lps, len(req.prompt_ids),
                          len(req.output_ids), req.cached_prompt_tokens, req.error, req.stop_reason, prompt_lps)

    # ---- scheduling ---------------------------------------------------------------------------------
    def _schedule(self, can_preempt: bool = True) -> list[tuple[Request, int]]:
        limit = self.cfg.chunked_prefill_size
        budget = limit if limit > 0 else 1 << 62
        work: list[tuple[Request, int]] = []
        alone = self._isolating()
        for req in list(self.running):
            if budget <= 0:
                break
            if req not in self.running:  # preempted while making room for an earlier request
                continue
            if alone is not None and req is not alone:
                continue  # a suspect runs alone
            if req.pending and self._length_done(req, len(req.output_ids) + 1):
                continue  # its pending token ends it (max_tokens / context): nothing more to compute
            n = min(req.num_tokens - req.num_cached, budget)
            reserve = 0
            if self.spec is not None:
                if req.num_tokens - req.num_cached == 1:  # decoding: verify its drafts too (as many as fit)
                    req.draft_ids = req.draft_ids[:max(0, min(budget - 1, self.spec.wanted(req)))]
                    n += len(req.draft_ids)
                reserve = self._reserve
            if not self._make_room(req, min(req.num_cached + n + reserve, self.cfg.max_model_len), can_preempt):
                continue
            work.append((req, n))
            budget -= n
        if self.cfg.schedule_policy == "lpm" and alone is None:
            self._order_by_prefix()
        admit = self.cfg.max_prefill_tokens or 1 << 62  # prompt tokens newly admitted requests may take this step
        while self.waiting and budget > 0 and admit > 0 and len(self.running) < self.cfg.max_running_requests:
            req = self.waiting[0]
            if alone is not None and (req is not alone or work):
                break  # only the suspect, and alone
            if not self._try_admit(req):
                break
            self.waiting.popleft()
            self.running.append(req)
            n = min(len(req.all_ids) - req.num_cached, budget, admit)
            self.cache.grow(req.pages, min(req.num_cached + n + self._reserve, self.cfg.max_model_len))
            work.append((req, n))
            budget -= n
            admit -= n
        return self.spec.pad_verify(work) if self.spec is not None else work

    def _order_by_prefix(self) -> None:
        """SGLang's lpm: waiting requests with the longest prefix in the cache first (ties keep arrival order;
        preempted requests stay ahead of new ones). Sorting a long queue each step costs more than it saves: above
        LPM_MAX_QUEUE requests the order stays fcfs, as SGLang's."""
        pc = self.prefix_cache
        if pc is None or len(self.waiting) < 2 or len(self.waiting) > LPM_MAX_QUEUE:
            return
        page = self.cache.page_size
        key = {id(r): (r.num_preemptions == 0, -pc.peek(r.all_ids, (len(r.all_ids) - 1) // page)) for r in self.waiting}
        self.waiting = deque(sorted(self.waiting, key=lambda r: key[id(r)]))

    def _prompt_positions(self, work: list[tuple[Request, int]]) -> list[tuple[Request, int, int]]:
        """For requests that want prompt logprobs: (request, flat index in the batch, the prompt token its logits
        predict) of each prompt position this batch computes whose logprob is not recorded yet."""
        out, flat = [], 0
        for req, n in work:
            if req.params.prompt_logprobs is not None:
                done = len(req.prompt_logprobs)  # positions 0..done-1 recorded (predicting tokens 1..done)
                for p in range(max(req.num_cached, done), min(req.num_cached + n, len(req.prompt_ids) - 1)):
                    out.append((req, flat + p - req.num_cached, req.prompt_ids[p + 1]))
            flat += n
        return out

    def _record_prompt_logprobs(self, wanted: list[tuple[Request, int, int]], logits: torch.Tensor) -> None:
        targets = [t for _, _, t in wanted]
        lps = logprob_tensors(logits, to_device(torch.tensor(targets, dtype=torch.int64), logits.device),
                              [r.params.prompt_logprobs for r, _, _ in wanted])
        for (req, _, _), lp in zip(wanted, token_logprobs(lps, targets)):
            req.prompt_logprobs.append(lp)

    @property
    def _reserve(self) -> int:
        """Positions past a step's inputs that speculative drafting may write (0 without it)."""
        return self.spec.reserve_tokens if self.spec is not None else 0

    def _free_pages(self) -> int:
        return self.cache.allocator.num_free + (self.prefix_cache.evictable() if self.prefix_cache else 0)

    def _ensure_free(self, n: int) -> bool:
        free = self.cache.allocator.num_free
        if free < n and self.prefix_cache is not None:
            self.prefix_cache.evict(n - free)
        return self.cache.allocator.num_free >= n

    def _make_room(self, req: Request, num_tokens: int, can_preempt: bool = True) -> bool:
        """Give req pages for num_tokens, preempting from the tail of the running list if needed."""
        while not self._ensure_free(self.cache.pages_needed(num_tokens, len(req.pages))):
            if not can_preempt:
                raise _NeedsSync
            victim = self.running[-1]
            self._preempt(victim)
            if victim is req:
                return False
        self.cache.grow(req.pages, num_tokens)
        return True

    def _try_admit(self, req: Request) -> bool:
        ids = req.all_ids
        if self.prefix_cache is not None and not req.pages and req.params.prompt_logprobs is None:
            req.pages = self.prefix_cache.match(ids, max_pages=(len(ids) - 1) // self.cache.page_size)
            req.num_cached = len(req.pages) * self.cache.page_size
            if not req.output_ids and req.num_preemptions == 0:
                req.cached_prompt_tokens = req.num_cached
        need = self.cache.pages_needed(min(len(ids) + self._reserve, self.cfg.max_model_len), len(req.pages))
        if self._ensure_free(need):
            return True
        if not self.running and need > self.cache.allocator.num_pages:
            raise RuntimeError(f"request {req.request_id} needs {need} pages, more than the whole KV cache")
        self._release(req)  # keep nothing while waiting: hits are re-matched on the next try
        return False

    def _release(self, req: Request) -> None:
        if req.inflight:  # a launched batch still writes its KV: _finish releases it
            return
        if req.pages:
            self.cache.free(req.pages)
        req.num_cached = 0

    def _preempt(self, req: Request) -> None:
        self._requeue(req)
        self.num_preemptions += 1
        log.info("preempted request %s (%d tokens) to free KV pages", req.request_id, len(req.all_ids))

    def _requeue(self, req: Request) -> None:
        """Back to the queue's front with its pages freed: recomputed (prompt + outputs) when admitted again."""
        self.running.remove(req)
        self._release(req)
        req.draft_ids = []
        req.num_preemptions += 1
        self.waiting.appendleft(req)

    # ---- sampling and stopping ----------------------------------------------------------------------
    def sampling_logits(self, logits: torch.Tensor, prompts: list, outputs: list, params: list[SamplingParams],
                        num_outputs: list[int], matchers: list) -> torch.Tensor:
        """The logits rows are sampled from: penalties and logit bias (histories read only for penalized rows), stop
        tokens banned before min_tokens, each active grammar's mask. One entry per row in every list."""
        logits = apply_penalties(logits, prompts, outputs, params)
        logits = mask_stops_before_min_tokens(logits, num_outputs, params, self.eos_ids)
        if self.grammars is not None:
            bitmask = self.grammars.bitmask(matchers)
            if bitmask is not None:
                logits = apply_token_bitmask(logits, bitmask)
        return logits

    def _sample(self, batch: list[Request], logits: torch.Tensor) -> torch.Tensor:
        # Parameter tensors stay on the host: the sampler may branch on them without waiting for the device.
        f32 = dict(dtype=torch.float32)
        return self.ops.sample(logits, torch.tensor([r.params.temperature for r in batch], **f32),
                               torch.tensor([r.params.top_p for r in batch], **f32),
                               torch.tensor([r.params.top_k for r in batch], dtype=torch.int64),
                               torch.tensor([r.params.min_p for r in batch], **f32),
                               [r.generator for r in batch])

    def _check_stop(self, req: Request, tok: int) -> None:
        p = req.params
        if len(req.output_ids) >= p.min_tokens:
            if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_ids):
                req.finish_reason, req.stop_reason = "stop", tok
                return
            if req.detok is not None and req.detok.stopped_by is not None:
                req.finish_reason, req.stop_reason = "stop", req.detok.stopped_by
                return
        if self._length_done(req, len(req.output_ids)):
            req.finish_reason = "length"

    def _length_done(self, req: Request, num_outputs: int) -> bool:
        return num_outputs >= req.params.max_tokens or len(req.prompt_ids) + num_outputs >= self.cfg.max_model_len


def _host_copy(t: torch.Tensor | None) -> torch.Tensor | None:
    """A host copy that is complete once an event recorded after it completes (pinned, non-blocking)."""
    if t is None or t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)
