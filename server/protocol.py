"""OpenAI / SGLang request validation and the mapping to SamplingParams.

Every bad field raises `RequestError(message, param)`, which the app turns into HTTP 400 in OpenAI's error
shape {"error": {"message", "type", "param", "code"}} naming the field.
"""

from __future__ import annotations

import math
from typing import Any

from dsv32.core.grammar import CONSTRAINT_KINDS, GrammarError, GrammarRequest, grammar_request
from dsv32.core.sampling import SamplingParams


class RequestError(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


# OpenAI's error types by HTTP status (the `type` of every error body this server sends)
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 408: "timeout_error",
                429: "rate_limit_error", 503: "service_unavailable_error"}


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(message: str, param: str | None = None, status: int = 400) -> dict:
    """The one error shape: {"error": {message, type, param, code}} (code = the HTTP status)."""
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": status}}


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _num(body: dict, name: str, default=None, *, lo=None, hi=None, integer=False):
    v = body.get(name)
    if v is None:
        return default
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type or (isinstance(v, float) and not math.isfinite(v)):
        raise RequestError(f"'{name}' must be {'an integer' if integer else 'a finite number'}, got {_short(v)}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise RequestError(f"'{name}' must be in [{lo}, {hi}], got {_short(v)}", name)
    return v


def request_id(body: dict) -> str | None:
    """The client's request id ('rid'), if it gave one: a non-empty string of at most 256 characters."""
    rid = body.get("rid")
    if rid is not None and (not isinstance(rid, str) or not 0 < len(rid) <= 256):
        raise RequestError("'rid' must be a non-empty string of at most 256 characters", "rid")
    return rid


def stream_options(body: dict) -> bool:
    """Whether a streamed response ends with a usage chunk (stream_options.include_usage); checked whether or not
    the request streams (as OpenAI: stream_options without stream is an error)."""
    opts = body.get("stream_options")
    stream = flag(body, "stream", False)
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise RequestError("'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
    if not stream:
        raise RequestError("'stream_options' is only allowed when 'stream' is true", "stream_options")
    return flag(opts, "include_usage", False)


def token_id_list(v: Any, name: str, vocab_size: int) -> list[int]:
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size
                                          for t in v):
        raise RequestError(f"'{name}' must be a list of token ids in [0, {vocab_size})", name)
    return v


def _logit_bias(v: Any, vocab_size: int) -> dict[int, float]:
    """OpenAI's logit_bias: {"token id": bias in [-100, 100]} (keys may be strings of digits)."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise RequestError("'logit_bias' must be an object mapping token ids to numbers in [-100, 100]", "logit_bias")
    out = {}
    for k, b in v.items():
        try:
            t = int(k)
        except (TypeError, ValueError):
            t = -1
        if not 0 <= t < vocab_size or isinstance(b, bool) or not isinstance(b, (int, float)) \
                or not math.isfinite(b) or not -100 <= b <= 100:
            raise RequestError(f"'logit_bias' entry {_short(k)}: {_short(b)} must map a token id in [0, {vocab_size}) "
                               "to a number in [-100, 100]", "logit_bias")
        out[t] = float(b)
    return out


def flag(body: dict, name: str, default: bool) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise RequestError(f"'{name}' must be a boolean, got {v!r}", name)
    return v


def parse_stop(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v) or len(v) > 16:
        raise RequestError("'stop' must be a non-empty string or a list of up to 16 non-empty strings", "stop")
    return v


def sampling_from_openai(body: dict, prompt_tokens: int, max_model_len: int, gen_defaults: dict,
                         chat: bool, vocab_size: int, clamp: bool = False) -> SamplingParams:
    """SamplingParams for a /v1/chat/completions or /v1/completions body, every field checked (finite, in range,
    token ids inside the vocabulary). Fields the request omits take the model's generation_config values (as SGLang
    does), then the engine defaults. Fields this server cannot honour are refused, never ignored."""
    if body.get("suffix") is not None:
        raise RequestError("'suffix' (insertion) is not supported by this model", "suffix")
    if body.get("best_of") is not None and body.get("best_of") != body.get("n", 1):
        raise RequestError("'best_of' other than n is not supported (generate n completions and rank them)",
                           "best_of")
    room = max_model_len - prompt_tokens
    if room < 1:
        raise RequestError(f"This model's maximum context length is {max_model_len} tokens; the prompt has "
                           f"{prompt_tokens} tokens, leaving no room to generate.", "messages" if chat else "prompt")
    max_tokens = _num(body, "max_completion_tokens", None, lo=1, integer=True) if chat else None
    if max_tokens is None:
        max_tokens = _num(body, "max_tokens", None, lo=1, integer=True)
    if max_tokens is None:
        max_tokens = room if chat else min(16, room)  # OpenAI's (and vLLM's, SGLang's) completions default is 16
    elif max_tokens > room and clamp:  # --allow-auto-truncate
        max_tokens = room
    elif max_tokens > room:
        raise RequestError(f"This model's maximum context length is {max_model_len} tokens. You requested "
                           f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for "
                           "the completion). Please reduce the prompt or max_tokens.",
                           "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens")
    if chat:
        logprobs = None
        if flag(body, "logprobs", False):
            logprobs = _num(body, "top_logprobs", 0, lo=0, hi=20, integer=True)
        elif body.get("top_logprobs") is not None:
            raise RequestError("'top_logprobs' requires 'logprobs': true", "top_logprobs")
    else:
        logprobs = _num(body, "logprobs", None, lo=0, hi=20, integer=True)
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None:
        token_id_list(stop_ids, "stop_token_ids", vocab_size)
    top_k = _num(body, "top_k", gen_defaults.get("top_k", -1), lo=-1, integer=True)
    seed = _num(body, "seed", None, lo=-(2**63), hi=2**64 - 1, integer=True)
    d = gen_defaults
    params = dict(
        max_tokens=max_tokens,
        temperature=_num(body, "temperature", d.get("temperature", 1.0), lo=0, hi=2),
        top_p=_num(body, "top_p", d.get("top_p", 1.0), lo=0, hi=1),
        top_k=-1 if top_k >= vocab_size else top_k,  # no cut
        min_p=_num(body, "min_p", d.get("min_p", 0.0), lo=0, hi=1),
        seed=seed,
        n=_num(body, "n", 1, lo=1, hi=128, integer=True),
        stop=parse_stop(body.get("stop")),
        stop_token_ids=stop_ids or [],
        ignore_eos=flag(body, "ignore_eos", False),
        min_tokens=_num(body, "min_tokens", 0, lo=0, integer=True),
        presence_penalty=_num(body, "presence_penalty", 0.0, lo=-2, hi=2),
        frequency_penalty=_num(body, "frequency_penalty", 0.0, lo=-2, hi=2),
        repetition_penalty=_num(body, "repetition_penalty", d.get("repetition_penalty", 1.0), lo=0, hi=2),
        logprobs=logprobs,
        skip_special_tokens=flag(body, "skip_special_tokens", True),
        no_stop_trim=flag(body, "no_stop_trim", False),
        logit_bias=_logit_bias(body.get("logit_bias"), vocab_size),
    )
    if params["top_p"] == 0:
        raise RequestError("'top_p' must be > 0", "top_p")
    if params["repetition_penalty"] == 0:
        raise RequestError("'repetition_penalty' must be > 0", "repetition_penalty")
    if params["min_tokens"] > max_tokens:
        raise RequestError(f"'min_tokens' ({params['min_tokens']}) exceeds max_tokens ({max_tokens})", "min_tokens")
    try:
        return SamplingParams(**params)
    except ValueError as e:  # SamplingParams' own checks name the field as SamplingParams.<field>
        field = str(e).split(":")[0].replace("SamplingParams.", "")
        raise RequestError(str(e), field) from None


# SGLang sampling_params this server cannot honour yet: refused when set
_NATIVE_UNSUPPORTED = ("structural_tag", "custom_params", "stop_regex")


def constraint_openai(body: dict):
    """The structured-output constraint of a chat / completions body, or None: response_format json_object /
    json_schema, or SGLang's extra fields regex / ebnf / json_schema (at most one of them)."""
    found = []
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
            raise RequestError("'response_format' must be {'type': 'text' | 'json_object' | 'json_schema', ...}",
                               "response_format")
        if rf["type"] == "json_object":
            found.append(("response_format", GrammarRequest("json_object", "")))
        elif rf["type"] == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or "schema" not in js and "schema_" not in js:
                raise RequestError("'response_format.json_schema' must be {'name': ..., 'schema': {...}}",
                                   "response_format.json_schema")
            schema = js.get("schema", js.get("schema_"))
            found.append(("response_format", _native_constraint("json_schema", schema,
                                                                 "response_format.json_schema.schema")))
    for name in CONSTRAINT_KINDS:
        if body.get(name) is not None:
            found.append((name, _native_constraint(name, body[name], name)))
    if len(found) > 1:
        raise RequestError(f"give one constraint, not {' and '.join(n for n, _ in found)}", found[1][0])
    return found[0] if found else None


def _native_constraint(kind: str, v, param: str):
    try:
        return grammar_request(kind, v)
    except GrammarError as e:
        raise RequestError(f"'{param}' {e}", param) from None


def constraint_native(sp) -> tuple | None:
    """/generate's sampling_params json_schema / regex / ebnf (at most one) as (param, GrammarRequest), or None."""
    if not isinstance(sp, dict):
        return None
    found = [(f"sampling_params.{k}", _native_constraint(k, sp[k], f"sampling_params.{k}"))
             for k in CONSTRAINT_KINDS if sp.get(k) is not None]
    if len(found) > 1:
        raise RequestError("give one of json_schema, regex, ebnf", found[1][0])
    return found[0] if found else None


def sampling_from_native(sp: Any, prompt_tokens: int, max_model_len: int, gen_defaults: dict,
                         vocab_size: int, clamp: bool = False) -> SamplingParams:
    """SGLang's /generate `sampling_params` (max_new_tokens, min_new_tokens, ...) → SamplingParams."""
    if sp is None:
        sp = {}
    if not isinstance(sp, dict):
        raise RequestError("'sampling_params' must be an object", "sampling_params")
    for name in _NATIVE_UNSUPPORTED:
        if sp.get(name) is not None:
            raise RequestError(f"'sampling_params.{name}' (constrained decoding) is not supported yet",
                               f"sampling_params.{name}")
    body = {k: v for k, v in sp.items() if k not in CONSTRAINT_KINDS}  # constraints: constraint_native
    if "max_new_tokens" in body:
        body["max_tokens"] = body.pop("max_new_tokens")
    elif "max_tokens" not in body:
        body["max_tokens"] = min(128, max(1, max_model_len - prompt_tokens))  # SGLang's default
    if "min_new_tokens" in body:
        body["min_tokens"] = body.pop("min_new_tokens")
    try:
        return sampling_from_openai(body, prompt_tokens, max_model_len, gen_defaults, chat=False,
                                    vocab_size=vocab_size, clamp=clamp)
    except RequestError as e:
        e.param = f"sampling_params.{e.param}" if e.param else "sampling_params"
        raise


def load_generation_defaults(model_dir: str) -> dict:
    """Non-null sampling values of the model's generation_config.json (temperature, top_p, top_k, min_p,
    repetition_penalty); {} when the file is absent."""
    import json
    import os

    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    out = {k: cfg[k] for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty") if cfg.get(k) is not None}
    if cfg.get("do_sample") is False:
        out["temperature"] = 0.0
    return out
