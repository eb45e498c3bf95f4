"""OpenAI / SGLang request validation and the mapping to SamplingParams.

Every bad field raises `RequestError(message, param)`, which the app turns into HTTP 400 in OpenAI's error
shape {"error": {"message", "type", "param", "code"}} naming the field.
"""

from __future__ import annotations

from typing import Any

from dsv32.core.sampling import SamplingParams


class RequestError(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.type = param, status, type_


def error_body(message: str, param: str | None = None, status: int = 400,
               type_: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def _num(body: dict, name: str, default=None, *, lo=None, hi=None, integer=False):
    v = body.get(name)
    if v is None:
        return default
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type:
        raise RequestError(f"'{name}' must be {'an integer' if integer else 'a number'}, got {v!r}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise RequestError(f"'{name}' must be in [{lo}, {hi}], got {v!r}", name)
    return v


def _bool(body: dict, name: str, default: bool) -> bool:
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
                         chat: bool) -> SamplingParams:
    """SamplingParams for a /v1/chat/completions or /v1/completions body. Fields the request omits take the
    model's generation_config values (as SGLang does), then the engine defaults."""
    room = max_model_len - prompt_tokens
    if room < 1:
        raise RequestError(f"This model's maximum context length is {max_model_len} tokens; the prompt has "
                           f"{prompt_tokens} tokens, leaving no room to generate.", "messages" if chat else "prompt")
    max_tokens = _num(body, "max_completion_tokens", None, lo=1, integer=True) if chat else None
    if max_tokens is None:
        max_tokens = _num(body, "max_tokens", None, lo=1, integer=True)
    if max_tokens is None:
        max_tokens = room if chat else min(16, room)  # OpenAI's (and vLLM's, SGLang's) completions default is 16
    elif max_tokens > room:
        raise RequestError(f"This model's maximum context length is {max_model_len} tokens. You requested "
                           f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for "
                           "the completion). Please reduce the prompt or max_tokens.",
                           "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens")
    if chat:
        logprobs = None
        if _bool(body, "logprobs", False):
            logprobs = _num(body, "top_logprobs", 0, lo=0, hi=20, integer=True)
        elif body.get("top_logprobs") is not None:
            raise RequestError("'top_logprobs' requires 'logprobs': true", "top_logprobs")
    else:
        logprobs = _num(body, "logprobs", None, lo=0, hi=20, integer=True)
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None and (not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in stop_ids)):
        raise RequestError("'stop_token_ids' must be a list of non-negative integers", "stop_token_ids")
    d = gen_defaults
    params = dict(
        max_tokens=max_tokens,
        temperature=_num(body, "temperature", d.get("temperature", 1.0), lo=0, hi=2),
        top_p=_num(body, "top_p", d.get("top_p", 1.0), lo=0, hi=1),
        top_k=_num(body, "top_k", d.get("top_k", -1), lo=-1, integer=True),
        min_p=_num(body, "min_p", d.get("min_p", 0.0), lo=0, hi=1),
        seed=_num(body, "seed", None, integer=True),
        n=_num(body, "n", 1, lo=1, hi=128, integer=True),
        stop=parse_stop(body.get("stop")),
        stop_token_ids=stop_ids or [],
        ignore_eos=_bool(body, "ignore_eos", False),
        min_tokens=_num(body, "min_tokens", 0, lo=0, integer=True),
        presence_penalty=_num(body, "presence_penalty", 0.0, lo=-2, hi=2),
        frequency_penalty=_num(body, "frequency_penalty", 0.0, lo=-2, hi=2),
        repetition_penalty=_num(body, "repetition_penalty", d.get("repetition_penalty", 1.0), lo=0, hi=2),
        logprobs=logprobs,
        skip_special_tokens=_bool(body, "skip_special_tokens", True),
        no_stop_trim=_bool(body, "no_stop_trim", False),
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


def sampling_from_native(sp: Any, prompt_tokens: int, max_model_len: int, gen_defaults: dict) -> SamplingParams:
    """SGLang's /generate `sampling_params` (max_new_tokens, min_new_tokens, ...) → SamplingParams."""
    if sp is None:
        sp = {}
    if not isinstance(sp, dict):
        raise RequestError("'sampling_params' must be an object", "sampling_params")
    body = dict(sp)
    if "max_new_tokens" in body:
        body["max_tokens"] = body.pop("max_new_tokens")
    elif "max_tokens" not in body:
        body["max_tokens"] = min(128, max(1, max_model_len - prompt_tokens))  # SGLang's default
    if "min_new_tokens" in body:
        body["min_tokens"] = body.pop("min_new_tokens")
    try:
        return sampling_from_openai(body, prompt_tokens, max_model_len, gen_defaults, chat=False)
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
