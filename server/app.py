"""The HTTP server: OpenAI-compatible and SGLang-native endpoints over an EngineClient.

The HTTP process validates, chat-encodes and tokenizes; it never runs the model. Every error is JSON in
OpenAI's shape; a malformed or oversized body is a 400/413, never a crash. Streams abort their request when
the client goes away (the generator's cancellation reaches EngineClient.generate, which sends an abort).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from dsv32.core.llm import expand_n
from dsv32.server.engine_process import EngineClient, EngineDead, EngineRejected
from dsv32.server.metrics import Metrics
from dsv32.server.protocol import RequestError, error_body, sampling_from_native, sampling_from_openai

log = logging.getLogger("dsv32.server")

MAX_BODY_BYTES = 32 * 1024 * 1024


@dataclass
class ServerConfig:
    served_model_name: str
    model_path: str
    api_key: str | None = None
    enable_metrics: bool = False
    log_requests: bool = False
    reasoning_parser: str | None = None
    tool_call_parser: str | None = None
    chat_template: str | None = None  # "dsv32", "v31" or a .jinja path; None = auto
    gen_defaults: dict = field(default_factory=dict)


class ServerState:
    def __init__(self, engine: EngineClient, tokenizer, cfg: ServerConfig):
        self.engine, self.tokenizer, self.cfg = engine, tokenizer, cfg
        self.metrics = Metrics(cfg.served_model_name)
        self.created = int(time.time())
        self.max_model_len = engine.info["max_model_len"]

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer.json: send token ids", "prompt")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def check_model(self, body: dict) -> None:
        name = body.get("model")
        if name is not None and name not in (self.cfg.served_model_name, self.cfg.model_path):
            raise RequestError(f"The model `{name}` does not exist; this server serves `{self.cfg.served_model_name}`.",
                               "model", status=404, type_="NotFoundError")


def _json_error(e: RequestError) -> JSONResponse:
    return JSONResponse(error_body(str(e), e.param, e.status, e.type), status_code=e.status)


async def read_json(request: Request) -> dict:
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise RequestError(f"request body exceeds {MAX_BODY_BYTES} bytes", None, status=413)
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"request body is not valid JSON: {e}", None) from None
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object", None)
    return body


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def run_request(state: ServerState, rid: str, prompt_ids: list[int], params):
    """Yields StepOutputs of one engine request, recording metrics (a client that goes away counts as abort)."""
    t0 = time.monotonic()
    last = None
    completion = 0
    finished = False
    try:
        async for out in state.engine.generate(rid, prompt_ids, params):
            now = time.monotonic()
            if out.new_token_ids:
                completion += len(out.new_token_ids)
                if last is None:
                    state.metrics.on_first_token(now - t0)
                else:
                    state.metrics.on_token_gap(now - last)
                last = now
            if out.finished:
                finished = True
                state.metrics.on_finish(out.prompt_tokens, out.completion_tokens, out.finish_reason, now - t0)
                if state.cfg.log_requests:
                    log.info("request %s: %d prompt + %d completion tokens, %s, %.3f s", rid, out.prompt_tokens,
                             out.completion_tokens, out.finish_reason, now - t0)
            yield out
    finally:
        if not finished:
            state.metrics.on_finish(len(prompt_ids), completion, "abort", time.monotonic() - t0)
            if state.cfg.log_requests:
                log.info("request %s: aborted after %d tokens", rid, completion)


async def merge_choices(streams: list):
    """Interleave several async generators as (index, item) pairs as items arrive."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, gen):
        try:
            async for item in gen:
                await queue.put((i, item))
        except Exception as e:  # surfaced to the consumer
            await queue.put((i, e))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def logprobs_openai_completion(lps, tokenizer) -> dict | None:
    if not lps:
        return None
    dec = (lambda t: tokenizer.decode([t], skip_special_tokens=False)) if tokenizer else str
    return {"tokens": [dec(lp.token_id) for lp in lps], "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{dec(t): v for t, v in lp.top} for lp in lps], "text_offset": []}


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="dsv32", version="0.1.0")
    app.state.dsv32 = state

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if state.cfg.api_key and request.url.path.startswith("/v1") or (
                state.cfg.api_key and request.url.path in ("/generate", "/tokenize", "/detokenize")):
            if request.headers.get("authorization", "") != f"Bearer {state.cfg.api_key}":
                return JSONResponse(error_body("invalid or missing API key (Authorization: Bearer <key>)", None, 401,
                                               "AuthenticationError"), status_code=401)
        try:
            return await call_next(request)
        except RequestError as e:
            return _json_error(e)

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, e: RequestError):
        return _json_error(e)

    @app.exception_handler(EngineRejected)
    async def on_rejected(request: Request, e: EngineRejected):
        return _json_error(RequestError(str(e), None))

    @app.exception_handler(EngineDead)
    async def on_dead(request: Request, e: EngineDead):
        return JSONResponse(error_body(str(e), None, 503, "ServiceUnavailableError"), status_code=503)

    @app.exception_handler(Exception)
    async def on_any(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", None, 500, "InternalServerError"),
                            status_code=500)

    @app.get("/health")
    async def health():
        return Response(status_code=200 if state.engine.alive else 503)

    @app.get("/health_generate")
    async def health_generate():
        from dsv32.core.sampling import SamplingParams

        async for out in state.engine.generate(state.engine.new_request_id("health"), [0],
                                               SamplingParams(max_tokens=1, temperature=0)):
            if out.finished:
                break
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models():
        card = {"id": state.cfg.served_model_name, "object": "model", "created": state.created, "owned_by": "dsv32",
                "root": state.cfg.model_path, "max_model_len": state.max_model_len}
        return {"object": "list", "data": [card]}

    @app.get("/get_model_info")
    async def model_info():
        return {"model_path": state.cfg.model_path, "served_model_name": state.cfg.served_model_name,
                "is_generation": True, **state.engine.info}

    @app.get("/metrics")
    async def metrics():
        if not state.cfg.enable_metrics:
            return JSONResponse(error_body("metrics are off: start the server with --enable-metrics", None, 404,
                                           "NotFoundError"), status_code=404)
        return PlainTextResponse(state.metrics.render(state.engine.stats), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await read_json(request)
        text = body.get("prompt", body.get("text"))
        if not isinstance(text, str):
            raise RequestError("'prompt' must be a string", "prompt")
        ids = state.encode(text)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await read_json(request)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise RequestError("'tokens' must be a list of non-negative integers", "tokens")
        if state.tokenizer is None:
            raise RequestError("this model has no tokenizer.json", "tokens")
        return {"text": state.tokenizer.decode(ids, skip_special_tokens=False)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        state.check_model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = state.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = prompt
        else:
            raise RequestError("'prompt' must be a non-empty string or a list of token ids (one prompt per request)", "prompt")
        vocab = state.engine.info["vocab_size"]
        if any(not 0 <= t < vocab for t in ids):
            raise RequestError(f"'prompt' token ids must be in [0, {vocab})", "prompt")
        params = sampling_from_openai(body, len(ids), state.max_model_len, state.cfg.gen_defaults, chat=False)
        stream = body.get("stream", False)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
        echo = body.get("echo", False) is True and isinstance(prompt, str)
        rid = body.get("rid") or f"cmpl-{uuid.uuid4().hex}"
        children = expand_n(params)
        gens = [run_request(state, f"{rid}-{i}", ids, p) for i, p in enumerate(children)]
        created = int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": state.cfg.served_model_name}

        if stream:
            async def events():
                usage = {"prompt_tokens": len(ids), "completion_tokens": 0}
                try:
                    async for i, out in merge_choices(gens):
                        usage["completion_tokens"] += len(out.new_token_ids)
                        text = out.text_delta
                        if out.text_delta or out.finished or out.new_token_ids:
                            choice = {"index": i, "text": text, "logprobs": logprobs_openai_completion(out.logprobs, state.tokenizer),
                                      "finish_reason": out.finish_reason if out.finished else None}
                            if out.finished:
                                choice["matched_stop"] = None
                            yield sse({**base, "choices": [choice]})
                    if include_usage:
                        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                        yield sse({**base, "choices": [], "usage": usage})
                except (EngineRejected, EngineDead) as e:
                    yield sse(error_body(str(e), None, 400 if isinstance(e, EngineRejected) else 503))
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")

        texts = [[] for _ in children]
        tokens = [[] for _ in children]
        lps = [[] for _ in children]
        finish = [None] * len(children)
        cached = 0
        async for i, out in merge_choices(gens):
            texts[i].append(out.text_delta)
            tokens[i] += out.new_token_ids
            lps[i] += out.logprobs
            if out.finished:
                finish[i], cached = out.finish_reason, max(cached, out.cached_tokens)
        choices = [{"index": i, "text": (prompt if echo else "") + "".join(texts[i]),
                    "logprobs": logprobs_openai_completion(lps[i], state.tokenizer), "finish_reason": finish[i]}
                   for i in range(len(children))]
        completion_tokens = sum(len(t) for t in tokens)
        return {**base, "choices": choices, "usage": {
            "prompt_tokens": len(ids), "completion_tokens": completion_tokens, "total_tokens": len(ids) + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}}

    @app.post("/generate")
    async def generate(request: Request):
        body = await read_json(request)
        if isinstance(body.get("text"), str):
            ids = state.encode(body["text"])
        elif isinstance(body.get("input_ids"), list) and body["input_ids"] and all(
                isinstance(t, int) and not isinstance(t, bool) for t in body["input_ids"]):
            ids = body["input_ids"]
        else:
            raise RequestError("give 'text' (a string) or 'input_ids' (a list of token ids)", "text")
        params = sampling_from_native(body.get("sampling_params"), len(ids), state.max_model_len, state.cfg.gen_defaults)
        if params.n != 1:
            raise RequestError("'sampling_params.n' > 1 is served by /v1/completions", "sampling_params.n")
        rid = body.get("rid") or uuid.uuid4().hex
        t0 = time.monotonic()

        def meta(out):
            return {"id": rid, "finish_reason": {"type": out.finish_reason} if out.finished else None,
                    "prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                    "cached_tokens": out.cached_tokens, "e2e_latency": time.monotonic() - t0}

        if body.get("stream"):
            async def events():
                text, out_ids = "", []
                async for out in run_request(state, rid, ids, params):
                    text += out.text_delta
                    out_ids += out.new_token_ids
                    yield sse({"text": text, "output_ids": out_ids, "meta_info": meta(out)})
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        text, out_ids, last = "", [], None
        async for out in run_request(state, rid, ids, params):
            text += out.text_delta
            out_ids += out.new_token_ids
            last = out
        return {"text": text, "output_ids": out_ids, "meta_info": meta(last)}

    from dsv32.server.chat import register_chat

    register_chat(app, state)
    return app
