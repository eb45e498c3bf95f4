"""SamplingParams (per-request generation settings, validated with errors that name the field) and the
sampler that turns a batch's logits into next tokens: penalties, min_tokens masking, logprobs, then the
backend's `sample` op."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dsv32.core.grammar import CONSTRAINT_KINDS

from dsv32.core.forward_batch import to_device


GREEDY_BELOW = 1e-5  # temperatures below this sample greedily (as vLLM): 1/T would overflow fp32 logits
MAX_TOP_K = 2**31 - 1  # larger top_k values mean no cut (no vocabulary is that large)


@dataclass
class SamplingParams:
    """temperature 0 means greedy. top_k ≤ 0 (or -1) means no top-k cut; top_p 1.0 and min_p 0.0 mean none.
    seed makes a sampled request reproducible on its own, whatever else is batched with it (with n > 1,
    completion i uses seed + i). Generation stops at max_tokens, at an eos token (unless ignore_eos), at any of
    stop_token_ids, or when the text contains a stop string (trimmed from the output unless no_stop_trim),
    but never before min_tokens. Penalties follow vLLM/SGLang: repetition_penalty over prompt and output
    tokens (>1 discourages), frequency/presence penalties over output tokens. logprobs: None = none, k ≥ 0 =
    the chosen token's logprob plus the k most likely alternatives. logit_bias: token id → value in [-100, 100]
    added to that token's logit before sampling (as OpenAI's). A temperature below GREEDY_BELOW is greedy (dividing
    by it would overflow); a top_k beyond any vocabulary means no cut; seed is any integer in [-2**63, 2**64)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    # logprobs of the prompt's tokens 2..n (each given the ones before it) with k alternatives; None: none (vLLM's
    # name; OpenAI's echo + logprobs and SGLang's logprob_start_len use it). Such a request is computed whole: no
    # prefix-cache hit skips its positions.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)
    # special tokens (their text) that skip_special_tokens keeps: the tool-call markers a parser needs
    keep_special_tokens: tuple[str, ...] = ()
    # structured output: (key, serialized compiled grammar, token id after which it applies or None, control-byte
    # rule), made by the server's grammar compiler (core/grammar.py); the sampling rank masks every token the
    # grammar does not allow
    grammar: tuple | None = None
    # structured output in the offline LLM (SGLang's offline names; the server takes them from the request): at most
    # one of a JSON schema (dict or JSON text), a regex, an EBNF grammar; LLM.generate compiles it into `grammar`
    json_schema: str | dict | None = None
    regex: str | None = None
    ebnf: str | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = dict(self.logit_bias or {})
        self.validate()
        if 0 < self.temperature < GREEDY_BELOW:
            self.temperature = 0.0
        if self.top_k > MAX_TOP_K:
            self.top_k = -1

    def validate(self) -> None:
        def bad(name, why):
            raise ValueError(f"SamplingParams.{name}: {why}")

        given = [n for n in CONSTRAINT_KINDS if getattr(self, n) is not None]
        if len(given) > 1:
            bad(given[1], f"give one of json_schema, regex, ebnf (got {' and '.join(given)})")
        if given and (self.ignore_eos or self.min_tokens):
            bad(given[0], "cannot be combined with ignore_eos or min_tokens (the grammar decides where it ends)")

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", f"must be an integer ≥ 1, got {self.max_tokens!r}")
        if not is_num(self.temperature) or self.temperature < 0:
            bad("temperature", f"must be ≥ 0, got {self.temperature!r}")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", f"must be -1 (disabled), 0 (disabled) or a positive integer, got {self.top_k!r}")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            bad("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not -(2**63) <= self.seed < 2**64):
            bad("seed", f"must be an integer in [-2**63, 2**64), got {self.seed!r}")
        if not isinstance(self.n, int) or not 1 <= self.n <= 128:
            bad("n", f"must be an integer in [1, 128], got {self.n!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", f"must be non-empty strings, got {self.stop!r}")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", f"must be non-negative integers, got {self.stop_token_ids!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens:
            bad("min_tokens", f"must be an integer ≥ 0, got {self.min_tokens!r}")
        if self.min_tokens > self.max_tokens:
            bad("min_tokens", f"({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not is_num(v) or not -2 <= v <= 2:
                bad(name, f"must be in [-2, 2], got {v!r}")
        if not is_num(self.repetition_penalty) or not 0 < self.repetition_penalty <= 2:
            bad("repetition_penalty", f"must be in (0, 2], got {self.repetition_penalty!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            bad("logprobs", f"must be an integer in [0, 20], got {self.logprobs!r}")
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int)
                                                 or not 0 <= self.prompt_logprobs <= 20):
            bad("prompt_logprobs", f"must be an integer in [0, 20], got {self.prompt_logprobs!r}")
        if not isinstance(self.logit_bias, dict) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 and is_num(v) and -100 <= v <= 100
                for t, v in self.logit_bias.items()):
            bad("logit_bias", f"must map token ids (≥ 0) to numbers in [-100, 100], got {self.logit_bias!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def token_ids(self) -> list[int]:
        """Every token id the request names (stop ids, logit_bias keys): the engine checks them against its
        vocabulary."""
        return list(self.stop_token_ids) + list(self.logit_bias)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Sets to -inf the logits whose bit is 0 in an int32 bitmask [B, ⌈V/32⌉] (bit j of word w: token 32·w + j,
    xgrammar's layout). Plain torch ops, so every backend applies grammars the same way."""
    words = bitmask.to(logits.device, non_blocking=True)
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :logits.shape[-1]]
    return logits.masked_fill(~allowed, float("-inf"))


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the k most likely (token id, logprob), most likely first


def apply_penalties(logits: torch.Tensor, prompts: list[list[int]], outputs: list[list[int]],
                    params: list[SamplingParams]) -> torch.Tensor:
    """Penalized (and logit-biased) copy of logits [B, V] fp32 (rows without either untouched)."""
    out = logits.clone()
    V = logits.shape[1]
    for i, p in enumerate(params):
        if p.logit_bias:  # pinned, non-blocking copies: no wait for the device
            ids = to_device(torch.tensor(list(p.logit_bias), dtype=torch.long), out.device)
            out[i, ids] += to_device(torch.tensor(list(p.logit_bias.values()), dtype=out.dtype), out.device)
        if not p.has_penalties:
            continue
        row = out[i]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(prompts[i]) | set(outputs[i])), dtype=torch.long, device=row.device)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if outputs[i] and (p.frequency_penalty or p.presence_penalty):
            counts = torch.bincount(torch.tensor(outputs[i], device=row.device), minlength=V)[:V].float()
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return out


def mask_stops_before_min_tokens(logits: torch.Tensor, num_outputs: list[int], params: list[SamplingParams],
                                 eos_ids: set[int]) -> torch.Tensor:
    """Bans stop tokens for rows that have generated fewer than min_tokens (num_outputs: tokens so far)."""
    for i, p in enumerate(params):
        if num_outputs[i] < p.min_tokens:
            banned = set(p.stop_token_ids) | (set() if p.ignore_eos else eos_ids)
            if banned:  # a pinned, non-blocking index copy: no wait for the device (overlap)
                logits[i, to_device(torch.tensor(sorted(banned)), logits.device)] = float("-inf")
    return logits


@dataclass
class LogprobTensors:
    """Device-side logprobs of a step's chosen tokens (and the top-k alternatives), read on the host later so
    that computing them never waits for the device."""

    chosen: torch.Tensor  # [B] fp32
    top_values: torch.Tensor | None  # [B, kmax]
    top_ids: torch.Tensor | None
    want: list[int | None]  # per row: None = no logprobs, else how many alternatives


def logprob_tensors(logits: torch.Tensor, tokens: torch.Tensor, want: list[int | None]) -> LogprobTensors | None:
    """Logprobs of the chosen tokens under the (penalized, unscaled by temperature) model distribution; want: per
    row None (none) or the number of alternatives."""
    if all(w is None for w in want):
        return None
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, tokens[:, None])[:, 0]
    kmax = max((w or 0) for w in want)
    top_values, top_ids = lp.topk(kmax, dim=-1) if kmax else (None, None)
    return LogprobTensors(chosen, top_values, top_ids, want)


def token_logprobs(t: LogprobTensors | None, tokens: list[int]) -> list[TokenLogprob | None]:
    if t is None:
        return [None] * len(tokens)
    chosen = t.chosen.tolist()
    values = t.top_values.tolist() if t.top_values is not None else None
    ids = t.top_ids.tolist() if t.top_ids is not None else None
    out = []
    for i, w in enumerate(t.want):
        if w is None:
            out.append(None)
            continue
        top = list(zip(ids[i][:w], values[i][:w])) if w else []
        out.append(TokenLogprob(tokens[i], chosen[i], top))
    return out
