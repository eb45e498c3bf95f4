"""Structured output through xgrammar (SGLang's default grammar backend, also vLLM's): JSON schema, JSON object,
regex, EBNF, and DSML tool calls whose arguments follow each tool's JSON schema.

Why xgrammar rather than llguidance: it is SGLang's default (users' `--grammar-backend xgrammar` keeps its meaning),
it compiles JSON schemas, regexes and EBNF to one grammar type that composes (`Grammar.concat` / `union`, used for
DSML framing around JSON-schema values), its per-token masks cost microseconds, and its wheels install on every
Linux host we serve from.

Where the work happens (compiling must never stall the engine loop, and ranks must agree):
- the HTTP process turns a request's constraint into a `GrammarRequest`, compiles it with the tokenizer in a thread
  (cached), which is also where a bad schema becomes a 400, and sends the serialized compiled grammar with the
  request (`SamplingParams.grammar`);
- an engine's sampling rank deserializes it (cached by key) into a matcher per request, fills the allowed-token
  bitmask of constrained rows before sampling (`core.sampling.apply_token_bitmask`, plain torch, so every backend
  applies it) and advances the matcher with each sampled token. Ranks that do not sample keep no matcher: the
  request ends through the EOS the grammar admits, which every rank sees.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections import OrderedDict
from dataclasses import dataclass

GRAMMAR_BACKENDS = ("xgrammar", "none")
DSML = "｜DSML｜"
MAX_CALLS = 4  # calls one forced (tool_choice required) block may hold


class GrammarError(ValueError):
    """A constraint that cannot be compiled; the message says what is wrong with it."""


@dataclass(frozen=True)
class GrammarRequest:
    """A request's constraint: kind json_schema (spec: the schema as JSON), json_object, regex, ebnf, or
    dsml_tools (spec: JSON {"tools": [function objects], "named": name or null})."""

    kind: str
    spec: str

    @property
    def control_bytes(self) -> str | None:
        """Which raw control bytes (< 0x20) its output may never hold, beyond what the grammar says: 'all' for JSON
        (compact JSON has none; xgrammar's length-bounded strings admit them, and strict JSON parsers refuse
        them), 'except_newline' for DSML calls (framed by newlines), None for a client's regex / EBNF."""
        return {"json_schema": "all", "json_object": "all", "dsml_tools": "except_newline"}.get(self.kind)

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.kind}\0{self.spec}".encode()).hexdigest()[:32]


def _xgr():
    try:
        import xgrammar
    except ImportError as e:  # pragma: no cover - xgrammar is a dependency
        raise GrammarError(f"structured output needs xgrammar ({e}); pip install xgrammar") from None
    return xgrammar


_XGR_LOCATION = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")


def _clean(e: Exception) -> str:
    """xgrammar's error message without its C++ source location."""
    return _XGR_LOCATION.sub("", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)


def _schema_grammar(schema, strict: bool = True):
    xgr = _xgr()
    text = schema if isinstance(schema, str) else json.dumps(schema, ensure_ascii=False)
    return xgr.Grammar.from_json_schema(text, any_whitespace=False, strict_mode=strict)


def build_grammar(req: GrammarRequest):
    """The xgrammar Grammar of a request (GrammarError naming the problem)."""
    xgr = _xgr()
    try:
        if req.kind == "json_schema":
            return _schema_grammar(req.spec)
        if req.kind == "json_object":
            return _schema_grammar({"type": "object"}, strict=False)
        if req.kind == "regex":
            return xgr.Grammar.from_regex(req.spec)
        if req.kind == "ebnf":
            return xgr.Grammar.from_ebnf(req.spec)
        if req.kind == "dsml_tools":
            spec = json.loads(req.spec)
            return dsml_tools_grammar(spec["tools"], spec.get("named"), spec.get("max_calls", MAX_CALLS))
    except GrammarError:
        raise
    except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError / ValueError with the reason
        raise GrammarError(f"invalid {req.kind.replace('_', ' ')}: {_clean(e)}") from None
    raise GrammarError(f"unknown constraint kind {req.kind!r}")


def _lit(text: str):
    return _xgr().Grammar.from_ebnf(f"root ::= {json.dumps(text, ensure_ascii=False)}")


def _is_plain_string(schema: dict) -> bool:
    """A property DSML writes raw (string="true"): a string with no constraint a raw text could break."""
    return isinstance(schema, dict) and schema.get("type") == "string" and not (
        set(schema) & {"enum", "const", "pattern", "format", "minLength", "maxLength"})


def _parameters_grammar(parameters: dict):
    """DSML parameter lines of one invoke: every property in the schema's order, required ones always, optional
    ones possibly; plain strings raw (string="true", no '<'), other values as JSON of their own schema
    (string="false")."""
    xgr = _xgr()
    if parameters:
        _schema_grammar(parameters)  # a schema xgrammar cannot read is refused here, naming the problem
        if parameters.get("type", "object") != "object":
            raise GrammarError(f"tool parameters must be a JSON schema of type object, not {parameters.get('type')!r}")
    props = (parameters or {}).get("properties") or {}
    required = set((parameters or {}).get("required") or [])
    # a property's schema compiles on its own: it takes the definitions its $refs point at (#/$defs/..., pydantic's)
    defs = {k: parameters[k] for k in ("$defs", "definitions") if parameters and k in parameters}
    parts = []
    for name, schema in props.items():
        head = f'<{DSML}parameter name="{name}" string='
        if _is_plain_string(schema):
            value = xgr.Grammar.concat(_lit(head + '"true">'), xgr.Grammar.from_regex(r"[^<]*"))
        else:
            sub = {**defs, **schema} if isinstance(schema, dict) and schema else {}
            value = xgr.Grammar.concat(_lit(head + '"false">'), _schema_grammar(sub))
        line = xgr.Grammar.concat(value, _lit(f"</{DSML}parameter>\n"))
        parts.append(line if name in required else xgr.Grammar.union(line, _lit("")))
    if not parts:
        return _lit("\n")  # empty arguments: a blank line (the encoder's form)
    return xgr.Grammar.concat(*parts) if len(parts) > 1 else parts[0]


def dsml_tools_grammar(tools: list[dict], named: str | None, max_calls: int = MAX_CALLS):
    """What follows the forced prefix of a tool_choice required / named call: for named (prefix ends with the
    invoke's open tag) its parameter lines and the closing tags; for required (prefix is the block's open tag)
    one to max_calls invokes of the given tools, then the block's close."""
    xgr = _xgr()
    close_invoke, close_block = f"</{DSML}invoke>", f"\n</{DSML}function_calls>"
    by_name = {t["name"]: t for t in tools}
    if named is not None:
        return xgr.Grammar.concat(_parameters_grammar(by_name[named].get("parameters")), _lit(close_invoke + close_block))
    invokes = [xgr.Grammar.concat(_lit(f'<{DSML}invoke name="{t["name"]}">\n'), _parameters_grammar(t.get("parameters")),
                                  _lit(close_invoke)) for t in tools]
    one = xgr.Grammar.union(*invokes) if len(invokes) > 1 else invokes[0]
    seq = one  # one to max_calls invokes, newline-separated
    for _ in range(max_calls - 1):
        seq = xgr.Grammar.union(one, xgr.Grammar.concat(one, _lit("\n"), seq))
    return xgr.Grammar.concat(seq, _lit(close_block))


CONSTRAINT_KINDS = ("json_schema", "regex", "ebnf")  # what a request (or SamplingParams) may name directly


def grammar_request(kind: str, value) -> GrammarRequest:
    """A json_schema (an object, or its JSON text; kept as canonical JSON), regex or ebnf (non-empty strings) as a
    GrammarRequest; GrammarError says what is wrong with the value."""
    if kind == "json_schema":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise GrammarError(f"is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise GrammarError("must be a JSON schema (an object)")
        return GrammarRequest("json_schema", json.dumps(value, ensure_ascii=False))
    if not isinstance(value, str) or not value:
        raise GrammarError("must be a non-empty string")
    return GrammarRequest(kind, value)


def request_of(params) -> GrammarRequest | None:
    """The constraint a SamplingParams names (json_schema / regex / ebnf), if any."""
    for kind in CONSTRAINT_KINDS:
        value = getattr(params, kind)
        if value is not None:
            try:
                return grammar_request(kind, value)
            except GrammarError as e:
                raise GrammarError(f"{kind} {e}") from None
    return None


def tokenizer_info(tokenizer, vocab_size: int, stop_ids: list[int]):
    """xgrammar's view of a `tokenizers.Tokenizer` (the model's logits width and EOS ids)."""
    xgr = _xgr()
    from transformers import PreTrainedTokenizerFast

    return xgr.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=tokenizer),
                                              vocab_size=vocab_size, stop_token_ids=list(stop_ids))


class GrammarCompiler:
    """The HTTP process's compiler: GrammarRequest → serialized compiled grammar (cached; thread-safe)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int], threads: int = 2, cache_size: int = 256):
        self.info = tokenizer_info(tokenizer, vocab_size, stop_ids)
        self.compiler = _xgr().GrammarCompiler(self.info, max_threads=threads)
        self.compile = functools.lru_cache(maxsize=cache_size)(self._compile)

    def attach(self, params):
        """params with its json_schema / regex / ebnf compiled into `grammar` (params itself when it has none)."""
        import dataclasses

        req = request_of(params)
        if req is None or params.grammar is not None:
            return params
        return dataclasses.replace(params, grammar=self.grammar(req))

    def grammar(self, req: GrammarRequest, after: int | None = None) -> tuple:
        """SamplingParams.grammar for a request: (key, serialized compiled grammar, after, control-byte rule)."""
        return req.key, self.compile(req), after, req.control_bytes

    def _compile(self, req: GrammarRequest) -> str:
        grammar = build_grammar(req)
        try:
            return self.compiler.compile_grammar(grammar).serialize_json()
        except Exception as e:  # noqa: BLE001
            raise GrammarError(f"invalid {req.kind.replace('_', ' ')}: {_clean(e)}") from None


# UTF-8 (Unicode table 3-7): bytes that never occur, and the lead bytes whose next byte has a narrower range than
# 80-BF. xgrammar checks lead / continuation structure only, so without this a constrained string could hold an
# encoded surrogate (ED A0 80) or a code point past U+10FFFF, which decodes to U+FFFD and breaks e.g. maxLength.
_NEVER = frozenset([0xC0, 0xC1, *range(0xF5, 0x100)])
_SECOND = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}


def _utf8_tables(vocab_bytes: list[bytes]):
    """(ids never allowed: a byte that cannot occur or a narrowed second byte out of range inside the token;
    {lead byte: ids whose first byte is out of the range that lead allows next}; {control-byte rule: ids it
    forbids})."""
    import torch

    never, after = [], {lead: [] for lead in _SECOND}
    control = {"all": [], "except_newline": []}
    for i, b in enumerate(vocab_bytes):
        if any(x < 0x20 for x in b):
            control["all"].append(i)
        if any(x < 0x20 and x != 0x0A for x in b):
            control["except_newline"].append(i)
        if any(x in _NEVER for x in b) or any(b[k] in _SECOND and not _SECOND[b[k]][0] <= b[k + 1] <= _SECOND[b[k]][1]
                                              for k in range(len(b) - 1)):
            never.append(i)
        for lead, (lo, hi) in _SECOND.items():
            if b and not lo <= b[0] <= hi:
                after[lead].append(i)
    ids = lambda xs: torch.tensor(xs, dtype=torch.int64)  # noqa: E731
    return ids(never), {lead: ids(xs) for lead, xs in after.items()}, {k: ids(xs) for k, xs in control.items()}


def _clear(bitmask, row: int, ids) -> None:
    """Clears the bits of token ids in one row of an int32 bitmask."""
    import torch

    if ids.numel() == 0:
        return
    clear = torch.zeros(bitmask.shape[1], dtype=torch.int64)
    clear.scatter_add_(0, ids // 32, torch.ones_like(ids) << (ids % 32))  # distinct bits: the sum is their OR
    bitmask[row] = (bitmask[row].to(torch.int64) & ~clear).to(torch.int32)


class Matcher:
    """One request's grammar state on the sampling rank. `after`: a token id (</think>) before which the request
    is unconstrained (its reasoning); the grammar starts after it. `lead`: the output's last byte when it is a lead
    byte that narrows the next byte (UTF-8 validity, see _SECOND)."""

    def __init__(self, compiled, after: int | None, vocab_bytes: list[bytes] | None = None,
                 control_bytes: str | None = None):
        self.matcher = _xgr().GrammarMatcher(compiled)
        self.waiting_for = after
        self.control_bytes = control_bytes
        self.vocab_bytes = vocab_bytes
        self.lead: int | None = None

    @property
    def active(self) -> bool:
        return self.waiting_for is None

    def fill(self, bitmask, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        if self.waiting_for is not None:
            if token == self.waiting_for:
                self.waiting_for = None
            return True
        if self.matcher.is_terminated():
            return True
        b = self.vocab_bytes[token] if self.vocab_bytes is not None and token < len(self.vocab_bytes) else b""
        self.lead = b[-1] if b and b[-1] in _SECOND else None
        return self.matcher.accept_token(token)


class EngineGrammars:
    """An engine's side: the tokenizer info (built on first use) and deserialized grammars (LRU by key)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int], cache_size: int = 64):
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, stop_ids
        self._info = None
        self._cache: OrderedDict[str, object] = OrderedDict()
        self.cache_size = cache_size

    def matcher(self, grammar: tuple) -> Matcher:
        key, serialized, after, control_bytes = grammar
        compiled = self._cache.pop(key, None)
        if compiled is None:
            if self._info is None:
                if self.tokenizer is None:
                    raise ValueError("structured output needs the model's tokenizer.json")
                self._info = tokenizer_info(self.tokenizer, self.vocab_size, self.stop_ids)
                self._vocab_bytes = list(self._info.decoded_vocab)
                self._never, self._after_lead, self._control = _utf8_tables(self._vocab_bytes)
            try:
                compiled = _xgr().CompiledGrammar.deserialize_json(serialized, self._info)
            except Exception as e:  # noqa: BLE001 - e.g. made by another xgrammar version: the request is refused
                raise ValueError(f"the request's compiled grammar cannot be read: {_clean(e)}") from None
        self._cache[key] = compiled
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return Matcher(compiled, after, self._vocab_bytes, control_bytes)

    def bitmask(self, matchers: list[Matcher | None]):
        """An int32 bitmask [len(matchers), ⌈V/32⌉] with the allowed tokens of each active matcher's row (other rows
        allow everything), or None when no row is constrained."""
        if not any(m is not None and m.active for m in matchers):
            return None
        xgr = _xgr()
        mask = xgr.allocate_token_bitmask(len(matchers), self.vocab_size)  # all allowed
        for i, m in enumerate(matchers):
            if m is not None and m.active:
                m.fill(mask, i)
                _clear(mask, i, self._never)
                if m.lead is not None:
                    _clear(mask, i, self._after_lead[m.lead])
                if m.control_bytes is not None:
                    _clear(mask, i, self._control[m.control_bytes])
        return mask
