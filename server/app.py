"""The HTTP server: OpenAI-compatible and SGLang-native endpoints over an EngineClient.

The HTTP process validates, chat-encodes and tokenizes; it never runs the model. Rules it keeps:
- one error shape everywhere ({"error": {message, type, param, code}}, protocol.error_body), 404 / 405 included,
  and no internals in a message; a client's mistake is a 4xx naming the field, never a 500;
- nothing slow on the event loop: bodies are read in chunks with a size limit and a per-chunk timeout, big texts
  are tokenized in a worker process (tokenization.py), chat prompts rendered in a thread;
- a request whose client goes away is aborted (streams and non-streaming alike); a stream that fails after it
  started ends with an error event and [DONE], one that fails before gets the error status instead of a 200;
- /health is 200 only while the engine is alive, beating (--health-timeout, 20 s) and not draining;
  /health_generate gives up after the same time (as SGLang's);
- with --api-key every route but /health and /metrics needs `Authorization: Bearer KEY` (scheme case-insensitive,
  key compared in constant time).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsv32 import __version__
from dsv32.core.llm import expand_n
from dsv32.server.engine_process import EngineClient, EngineDead, EngineRejected
from dsv32.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from dsv32.server.metrics import Metrics
from dsv32.server.protocol import (RequestError, constraint_native, constraint_openai, error_body, flag, request_id,
                                   sampling_from_native, sampling_from_openai, stream_options, token_id_list)

log = logging.getLogger("dsv32.server")

MAX_BODY_BYTES = 32 * 1024 * 1024
BODY_CHUNK_TIMEOUT_S = 30.0  # a client that stops sending its body for this long gets a 408
OPEN_PATHS = ("/health", "/metrics")  # served without the API key, as SGLang
MAX_BATCH = 1024  # prompts × samples of one /generate or /v1/completions request


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
    allow_special_tokens_in_messages: bool = False  # text spelling a special token in a message becomes that token
    health_timeout_s: float = 20.0  # /health fails after this long without engine progress; /health_generate's limit
    allow_auto_truncate: bool = False  # too-long prompts keep their head, max_tokens cut to fit (SGLang's flag)
    tokenizer_workers: int = 1  # processes tokenizing big prompts
    collect_tokens_histogram: bool = False  # /metrics: prompt and generation tokens per request as histograms
    tokenizer_path: str | None = None  # where tokenizer.json is (default: model_path)
    grammar_backend: str = "xgrammar"  # structured output: xgrammar, or none (such requests get a 400)
    server_args: dict = field(default_factory=dict)  # the command line's settings, for /server_info

    def __post_init__(self):
        self.tokenizer_path = self.tokenizer_path or self.model_path


class ClientGone(Exception):
    """The client disconnected before its (non-streaming) response was ready."""


class ServerState:
    def __init__(self, engine: EngineClient, tokenizer, cfg: ServerConfig):
        from dsv32.server.tokenization import Tokenization

        self.engine, self.tokenizer, self.cfg = engine, tokenizer, cfg
        self.metrics = Metrics(cfg.served_model_name, cfg.collect_tokens_histogram, lambda: self.engine.stats)
        self.created = int(time.time())
        self.max_model_len = engine.info["max_model_len"]
        self.vocab_size = engine.info["vocab_size"]
        self.tokens = (Tokenization(tokenizer, self.max_model_len, cfg.allow_special_tokens_in_messages,
                                    cfg.tokenizer_workers) if tokenizer is not None else None)
        self.think_end_id = tokenizer.token_to_id("</think>") if tokenizer is not None else None
        self.in_flight = 0  # engine requests not finished
        self._grammar_compiler = None  # core.grammar.GrammarCompiler, made on first use (in a thread)
        self._grammar_lock = threading.Lock()
        self.draining = False  # shutting down: no new requests

    async def encode(self, text: str, field_name: str, pieces: list[str] | None = None,
                     marker: str | None = None) -> list[int]:
        """Token ids of a prompt text (special-token text in `pieces` kept as plain text), bounded by the context
        before any tokenization and off the event loop when big."""
        if self.tokens is None:
            raise RequestError("this model has no tokenizer.json: send token ids", field_name)
        if not self.cfg.allow_auto_truncate:
            try:
                self.tokens.check_length(text, field_name)
            except ValueError as e:
                raise RequestError(str(e), field_name) from None
        return self.fit(await self.tokens.encode(text, pieces, marker))

    def fit(self, ids: list[int]) -> list[int]:
        """--allow-auto-truncate: a prompt that leaves no room to generate keeps its first max_model_len-1 tokens."""
        if self.cfg.allow_auto_truncate and len(ids) >= self.max_model_len:
            log.warning("prompt of %d tokens truncated to %d (--allow-auto-truncate)", len(ids), self.max_model_len - 1)
            return ids[:self.max_model_len - 1]
        return ids

    def _grammar(self, req, after: int | None) -> tuple:
        from dsv32.core.grammar import GrammarCompiler

        with self._grammar_lock:
            if self._grammar_compiler is None:
                self._grammar_compiler = GrammarCompiler(self.tokenizer, self.vocab_size,
                                                         self.engine.info["eos_token_ids"])
        return self._grammar_compiler.grammar(req, after)

    async def constrain(self, params, found, after: int | None = None) -> None:
        """Structured output: compiles found = (param, GrammarRequest) off the event loop (a bad schema, regex or
        grammar is a 400 naming param) into params.grammar; `after`: a token id (</think>) before which the output
        is free."""
        if found is None:
            return
        param, req = found
        if self.cfg.grammar_backend == "none":
            raise RequestError("structured output is off on this server (--grammar-backend none)", param)
        if self.tokenizer is None:
            raise RequestError("structured output needs the model's tokenizer.json", param)
        if params.ignore_eos:
            raise RequestError("'ignore_eos' cannot be combined with structured output (the grammar ends at EOS)",
                               "ignore_eos")
        if params.min_tokens:
            raise RequestError("'min_tokens' cannot be combined with structured output (the grammar decides where "
                               "the output ends)", "min_tokens")
        from dsv32.core.grammar import GrammarError

        try:
            params.grammar = await asyncio.to_thread(self._grammar, req, after)
        except GrammarError as e:
            raise RequestError(f"{param}: {e}", param) from None

    def check_model(self, body: dict) -> None:
        name = body.get("model")
        if name is not None and name not in (self.cfg.served_model_name, self.cfg.model_path):
            raise RequestError(f"The model `{str(name)[:200]}` does not exist; this server serves "
                               f"`{self.cfg.served_model_name}`.", "model", status=404)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False) if self.tokenizer else str(token_id)


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, param, status), status_code=status)


# Lone UTF-16 surrogates ("\ud800") are valid JSON escapes but not text: no tokenizer or client can use them.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


async def read_json(request: Request) -> dict:
    """The request body as a JSON object, or RequestError (400 / 408 / 413) saying what is wrong with it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise RequestError(f"request body exceeds {MAX_BODY_BYTES} bytes", None, status=413)
    raw = bytearray()
    chunks = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), BODY_CHUNK_TIMEOUT_S)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise RequestError(f"the request body did not arrive within {BODY_CHUNK_TIMEOUT_S:.0f} s", None,
                               status=408) from None
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise RequestError(f"request body exceeds {MAX_BODY_BYTES} bytes", None, status=413)
    try:
        body = json.loads(raw) if len(raw) < (1 << 20) else await asyncio.to_thread(json.loads, bytes(raw))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"request body is not valid JSON: {e}", None) from None
    except RecursionError:
        raise RequestError("request body is nested too deeply", None) from None
    except ValueError as e:  # e.g. an integer literal with more digits than Python converts
        raise RequestError(f"request body is not valid JSON: {e}", None) from None
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object", None)
    if _SURROGATE_ESCAPE.search(raw):
        path = _lone_surrogate(body, "")
        if path is not None:
            raise RequestError(f"{path or 'body'}: contains a lone UTF-16 surrogate (not valid text)", path or None)
    return body


def _lone_surrogate(v, path: str) -> str | None:
    """The path of the first string (or key) holding a lone surrogate, else None."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
    for k, x in items:
        sub = f"{path}.{k}" if isinstance(k, str) and path else (k if isinstance(k, str) else f"{path}[{k}]")
        if isinstance(k, str) and _lone_surrogate(k, sub) is not None:
            return sub
        found = _lone_surrogate(x, sub)
        if found is not None:
            return found
    return None


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def error_event(e: Exception) -> str:
    status = 503 if isinstance(e, EngineDead) else 400
    return sse(error_body(str(e), None, status))


async def run_request(state: ServerState, rid: str, prompt_ids: list[int], params):
    """Yields StepOutputs of one engine request, recording metrics (a client that goes away counts as abort); a
    request the engine failed raises EngineRejected with the reason."""
    t0 = time.monotonic()
    last = None
    completion = 0
    finished = False
    state.in_flight += 1
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
                if out.error:
                    raise EngineRejected(out.error)
            yield out
    finally:
        state.in_flight -= 1
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


@dataclass
class Choices:
    """Every choice of a non-streaming request, complete: text, token ids, logprobs, finish reason."""

    texts: list[str]
    tokens: list[list[int]]
    logprobs: list[list]
    finish: list[str | None]
    cached: int  # prompt tokens served from the prefix cache
    stop_reasons: list  # what matched when a choice stopped (token id or stop string), else None
    cached_each: list[int]  # per choice
    prompt_logprobs: list  # per choice: TokenLogprob of prompt tokens 2..n (SamplingParams.prompt_logprobs), or None


async def collect_choices(gens: list) -> Choices:
    texts, tokens, lps = [[] for _ in gens], [[] for _ in gens], [[] for _ in gens]
    finish, cached, matched, each = [None] * len(gens), 0, [None] * len(gens), [0] * len(gens)
    prompt_lps = [None] * len(gens)
    async for i, out in merge_choices(gens):
        if out.prompt_logprobs is not None:
            prompt_lps[i] = out.prompt_logprobs
        texts[i].append(out.text_delta)
        tokens[i] += out.new_token_ids
        lps[i] += out.logprobs
        if out.finished:
            finish[i], matched[i], each[i] = out.finish_reason, out.stop_reason, out.cached_tokens
            cached = max(cached, out.cached_tokens)
    return Choices(["".join(t) for t in texts], tokens, lps, finish, cached, matched, each, prompt_lps)


async def started(agen):
    """Waits for the first item of an async generator, so that its errors (a rejected request, a dead engine) raise
    here, before a streaming response's 200 is sent; returns a generator of that item and the rest."""
    end = object()
    try:
        first = await agen.__anext__()
    except StopAsyncIteration:
        first = end

    async def rest():
        if first is not end:
            yield first
        async for item in agen:
            yield item

    return rest()


async def unless_disconnected(request: Request, coro):
    """The result of coro, or ClientGone (coro cancelled, so its engine requests are aborted) when the client goes
    away first."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


def logprobs_openai_completion(lps, state: ServerState, offset: int = 0) -> dict | None:
    """OpenAI's completions logprobs; text_offset: where each token starts in the choice's text, counting from
    `offset` (the characters before these tokens)."""
    if not lps:
        return None
    tokens = [state.token_text(lp.token_id) for lp in lps]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{state.token_text(t): v for t, v in lp.top} for lp in lps], "text_offset": offsets}


def echo_logprobs(prompt_ids: list[int], prompt_lps, lps, state: ServerState) -> dict:
    """OpenAI's completions logprobs with echo: the prompt's tokens first (the first has no logprob: nothing comes
    before it), then the completion's; text_offset over both."""
    first = state.token_text(prompt_ids[0])
    prompt = {"tokens": [first] + [state.token_text(lp.token_id) for lp in prompt_lps],
              "token_logprobs": [None] + [lp.logprob for lp in prompt_lps],
              "top_logprobs": [None] + [{state.token_text(t): v for t, v in lp.top} for lp in prompt_lps]}
    offsets, at = [], 0
    for t in prompt["tokens"]:
        offsets.append(at)
        at += len(t)
    rest = logprobs_openai_completion(lps, state, at) or {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                                          "text_offset": []}
    return {k: prompt[k] + rest[k] for k in ("tokens", "token_logprobs", "top_logprobs")} | \
        {"text_offset": offsets + rest["text_offset"]}


def native_finish_reason(out) -> dict:
    """SGLang's meta_info.finish_reason: {type: stop, matched: token id | stop string} · {type: length, length: N}
    · {type: abort, message}."""
    if out.finish_reason == "stop":
        return {"type": "stop", "matched": out.stop_reason}
    if out.finish_reason == "length":
        return {"type": "length", "length": out.completion_tokens}
    return {"type": out.finish_reason or "abort", "message": out.error or "aborted"}


def _child_of(engine_rid: str, rid: str) -> bool:
    """Whether an engine request id is one of request `rid`'s (its samples / prompts are rid-N, rid-N-M)."""
    rest = engine_rid[len(rid):] if engine_rid.startswith(rid + "-") else ""
    return bool(rest) and all(part.isdigit() for part in rest[1:].split("-"))


def _is_ids(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


async def _native_prompts(state: ServerState, body: dict) -> tuple[list[list[int]], bool]:
    """/generate's prompts as token ids, and whether the request is a batch (text or input_ids a list of them)."""
    text, input_ids = body.get("text"), body.get("input_ids")
    if text is not None and input_ids is not None:
        raise RequestError("give either 'text' or 'input_ids', not both", "text")
    if isinstance(text, str) and text:
        return [await state.encode(text, "text")], False
    if isinstance(text, list) and text and len(text) <= MAX_BATCH and all(isinstance(t, str) and t for t in text):
        return [await state.encode(t, f"text[{i}]") for i, t in enumerate(text)], True
    if _is_ids(input_ids):
        return [state.fit(token_id_list(input_ids, "input_ids", state.vocab_size))], False
    if isinstance(input_ids, list) and input_ids and len(input_ids) <= MAX_BATCH and all(_is_ids(x) for x in input_ids):
        return [state.fit(token_id_list(x, f"input_ids[{i}]", state.vocab_size)) for i, x in enumerate(input_ids)], True
    raise RequestError(f"give 'text' (a string, or a list of up to {MAX_BATCH} strings) or 'input_ids' (a list of "
                       "token ids, or a list of such lists)", "text" if text is not None else "input_ids")


async def _completion_prompts(state: ServerState, prompt) -> list[tuple[list[int], str | None]]:
    """/v1/completions' prompt(s) as (token ids, text or None): a string, a list of token ids, or a list of either."""
    if isinstance(prompt, str) and prompt:
        return [(await state.encode(prompt, "prompt"), prompt)]
    if _is_ids(prompt):
        return [(state.fit(token_id_list(prompt, "prompt", state.vocab_size)), None)]
    if isinstance(prompt, list) and prompt and len(prompt) <= MAX_BATCH:
        out = []
        for i, p in enumerate(prompt):
            if isinstance(p, str) and p:
                out.append((await state.encode(p, f"prompt[{i}]"), p))
            elif _is_ids(p):
                out.append((state.fit(token_id_list(p, f"prompt[{i}]", state.vocab_size)), None))
            else:
                break
        else:
            return out
    raise RequestError(f"'prompt' must be a non-empty string, a list of token ids, or a list of up to {MAX_BATCH} "
                       "of those", "prompt")


def _authorized(header: str, key: str) -> bool:
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


class _Guard:
    """ASGI middleware (a plain one: it never buffers or wraps a streaming response): the API key on every route
    but OPEN_PATHS, and 503 for new requests while the server drains."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            key = self.state.cfg.api_key
            header = next((v for k, v in scope["headers"] if k == b"authorization"), b"").decode("latin-1")
            response = None
            if key and not _authorized(header, key):
                response = error_response(401, "invalid or missing API key (Authorization: Bearer <key>)")
            elif self.state.draining:
                response = error_response(503, "the server is shutting down")
            if response is not None:
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="dsv32", version="0.1.0")
    app.state.dsv32 = state

    app.add_middleware(_Guard, state=state)

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, e: RequestError):
        return error_response(e.status, str(e), e.param)

    @app.exception_handler(EngineRejected)
    async def on_rejected(request: Request, e: EngineRejected):
        return error_response(400, str(e))

    @app.exception_handler(EngineDead)
    async def on_dead(request: Request, e: EngineDead):
        return error_response(503, str(e))

    @app.exception_handler(ClientGone)
    async def on_gone(request: Request, e: ClientGone):
        return Response(status_code=499)  # nobody reads it

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, e: StarletteHTTPException):
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return error_response(e.status_code, message.get(e.status_code, str(e.detail)))

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, e: RequestValidationError):
        return error_response(400, "invalid request")

    @app.exception_handler(Exception)
    async def on_any(request: Request, e: Exception):
        ref = uuid.uuid4().hex[:12]
        log.exception("unhandled error on %s (ref %s)", request.url.path, ref)
        return error_response(500, f"internal server error (ref {ref} in the server log)")

    @app.get("/health")
    async def health():
        ok = state.engine.alive and not state.draining and state.engine.heartbeat_age() < state.cfg.health_timeout_s
        return Response(status_code=200 if ok else 503)

    @app.get("/health_generate")
    async def health_generate():
        from dsv32.core.sampling import SamplingParams

        async def probe():
            async for out in state.engine.generate(state.engine.new_request_id("health"), [0],
                                                   SamplingParams(max_tokens=1, temperature=0)):
                if out.finished:
                    return

        limit = state.cfg.health_timeout_s
        try:
            await asyncio.wait_for(probe(), limit)
        except asyncio.TimeoutError:
            return error_response(503, f"the engine did not generate a token within {limit:g} s")
        return Response(status_code=200)

    def card() -> dict:
        return {"id": state.cfg.served_model_name, "object": "model", "created": state.created, "owned_by": "dsv32",
                "root": state.cfg.model_path, "parent": None, "max_model_len": state.max_model_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model_card(model_id: str):
        if model_id not in (state.cfg.served_model_name, state.cfg.model_path):
            raise RequestError(f"The model `{model_id[:200]}` does not exist; this server serves "
                               f"`{state.cfg.served_model_name}`.", "model", status=404)
        return card()

    @app.get("/model_info")
    @app.get("/get_model_info")
    async def model_info():
        """SGLang's model info (benchmarks find the tokenizer here: tokenizer_path, a local directory)."""
        info = {k: v for k, v in state.engine.info.items() if k != "memory_per_rank"}
        return {**info, "model_path": state.cfg.model_path, "tokenizer_path": state.cfg.tokenizer_path,
                "served_model_name": state.cfg.served_model_name, "is_generation": True, "model_type": "deepseek_v32",
                "architectures": ["DeepseekV32ForCausalLM"], "weight_version": "default", "has_image_understanding": False,
                "has_audio_understanding": False}

    @app.get("/server_info")
    @app.get("/get_server_info")
    async def server_info():
        """SGLang's server info: the server's arguments at the top level (the API key redacted), the engine's
        capacity, and internal_states (the latest generation throughput; with speculative decoding the average accept
        length, which SGLang's bench_serving prints as "Accept length")."""
        stats, info = state.engine.stats, state.engine.info
        ok = state.engine.alive and not state.draining
        return {**state.cfg.server_args, "status": "ready" if ok else "unavailable", "version": __version__,
                "max_total_num_tokens": info["memory"]["max_tokens"], "max_req_input_len": state.max_model_len - 1,
                "internal_states": [{"last_gen_throughput": stats.get("gen_throughput", 0.0),
                                     "avg_spec_accept_length": stats.get("avg_spec_accept_length"),
                                     "num_running_reqs": stats.get("running", 0),
                                     "num_queue_reqs": stats.get("waiting", 0),
                                     "token_usage": stats.get("kv_usage", 0.0)}],
                "engine": {k: v for k, v in info.items() if k != "memory_per_rank"}}

    @app.get("/metrics")
    async def metrics():
        if not state.cfg.enable_metrics:
            return error_response(404, "metrics are off: start the server with --enable-metrics")
        return Response(state.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await read_json(request)
        text = body.get("prompt", body.get("text"))
        if not isinstance(text, str):
            raise RequestError("'prompt' must be a string", "prompt")
        ids = await state.encode(text, "prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await read_json(request)
        ids = token_id_list(body.get("tokens"), "tokens", state.vocab_size)
        if state.tokenizer is None:
            raise RequestError("this model has no tokenizer.json", "tokens")
        decode = state.tokenizer.decode
        text = decode(ids, skip_special_tokens=False) if len(ids) < 65536 else \
            await asyncio.to_thread(decode, ids, skip_special_tokens=False)
        return {"text": text}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        state.check_model(body)
        prompts = await _completion_prompts(state, body.get("prompt"))
        include_usage = stream_options(body)
        stream = flag(body, "stream", False)
        echo = flag(body, "echo", False)
        rid = request_id(body) or f"cmpl-{uuid.uuid4().hex}"
        found = constraint_openai(body)
        # choices in OpenAI's order: prompt-major, n samples each; index = prompt * n + sample
        jobs, echoed, firsts = [], [], []  # firsts: each prompt's first choice
        for ids, text in prompts:
            params = sampling_from_openai(body, len(ids), state.max_model_len, state.cfg.gen_defaults, chat=False,
                                          vocab_size=state.vocab_size, clamp=state.cfg.allow_auto_truncate)
            await state.constrain(params, found)
            if echo and params.logprobs is not None:
                params.prompt_logprobs = params.logprobs  # the echoed prompt's logprobs come first
            prefix = "" if not echo else text if text is not None else \
                state.tokenizer.decode(ids, skip_special_tokens=False) if state.tokenizer is not None else ""
            firsts.append(len(jobs))
            for child in expand_n(params):
                i = len(jobs)
                jobs.append((f"{rid}-{i}", ids, child))
                echoed.append(prefix)
        with_prompt_lps = echo and body.get("logprobs") is not None
        if len(jobs) > MAX_BATCH:
            raise RequestError(f"prompts × n may be at most {MAX_BATCH}, got {len(jobs)}", "n")
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        gens = [run_request(state, r, ids, p) for r, ids, p in jobs]
        created = int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": state.cfg.served_model_name}

        if stream:
            outs = await started(merge_choices(gens))

            async def events():
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 0}
                offsets = [len(e) for e in echoed]  # text_offset of each choice's next token (as non-streaming)
                try:
                    async for i, out in outs:
                        usage["completion_tokens"] += len(out.new_token_ids)
                        text = out.text_delta
                        if echoed[i]:
                            text, echoed[i] = echoed[i] + text, ""
                        if text or out.finished or out.new_token_ids:
                            if out.prompt_logprobs is not None and with_prompt_lps:
                                lp = echo_logprobs(jobs[i][1], out.prompt_logprobs, out.logprobs, state)
                                offsets[i] = sum(len(t) for t in lp["tokens"][:len(jobs[i][1])])
                            else:
                                lp = logprobs_openai_completion(out.logprobs, state, offsets[i])
                            choice = {"index": i, "text": text, "logprobs": lp,
                                      "finish_reason": out.finish_reason if out.finished else None}
                            if out.finished:
                                choice["matched_stop"] = out.stop_reason
                            yield sse({**base, "choices": [choice]})
                        offsets[i] += sum(len(state.token_text(lp.token_id)) for lp in out.logprobs)
                    if include_usage:
                        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                        yield sse({**base, "choices": [], "usage": usage})
                except (EngineRejected, EngineDead) as e:
                    yield error_event(e)
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")

        got = await unless_disconnected(request, collect_choices(gens))
        choices = [{"index": i, "text": echoed[i] + got.texts[i],
                    "logprobs": echo_logprobs(jobs[i][1], got.prompt_logprobs[i], got.logprobs[i], state)
                    if with_prompt_lps else logprobs_openai_completion(got.logprobs[i], state, len(echoed[i])),
                    "finish_reason": got.finish[i], "matched_stop": got.stop_reasons[i]}
                   for i in range(len(jobs))]
        completion_tokens = sum(len(t) for t in got.tokens)
        return {**base, "choices": choices, "usage": {
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": sum(got.cached_each[i] for i in firsts)}}}

    @app.post("/generate")
    async def generate(request: Request):
        body = await read_json(request)
        for name in ("lora_path", "custom_logit_processor", "image_data", "video_data", "audio_data",
                     "session_params", "token_ids_logprob"):
            if body.get(name) is not None:
                raise RequestError(f"'{name}' is not supported by this server", name)
        if body.get("return_hidden_states"):
            raise RequestError("'return_hidden_states' is not supported by this server", "return_hidden_states")
        start_len = body.get("logprob_start_len", -1)
        if start_len is None:
            start_len = -1
        if isinstance(start_len, bool) or not isinstance(start_len, int) or start_len < -1:
            raise RequestError("'logprob_start_len' must be an integer ≥ -1 (-1: no prompt logprobs)",
                               "logprob_start_len")
        prompts, batch = await _native_prompts(state, body)
        sps = body.get("sampling_params")
        if isinstance(sps, list):
            if not batch or len(sps) != len(prompts):
                raise RequestError("a list of 'sampling_params' needs a batch of as many prompts", "sampling_params")
        else:
            sps = [sps] * len(prompts)
        rids = body.get("rid")
        if isinstance(rids, list):
            if not batch or len(rids) != len(prompts) or len(set(map(str, rids))) != len(rids):
                raise RequestError("a list of 'rid' needs a batch of as many prompts, each id distinct", "rid")
            rids = [request_id({"rid": r}) for r in rids]
        else:
            base_rid = request_id(body) or uuid.uuid4().hex
            rids = [base_rid] if not batch else [f"{base_rid}-{i}" for i in range(len(prompts))]
        return_logprob = body.get("return_logprob", False)
        if not isinstance(return_logprob, bool):
            raise RequestError("'return_logprob' must be a boolean", "return_logprob")
        top_n = body.get("top_logprobs_num", 0)
        if isinstance(top_n, bool) or not isinstance(top_n, int) or not 0 <= top_n <= 20:
            raise RequestError("'top_logprobs_num' must be an integer in [0, 20]", "top_logprobs_num")
        with_text = body.get("return_text_in_logprobs", False) is True
        # one engine request per prompt and sample (sampling_params.n), in SGLang's order: prompt-major
        jobs = []
        for ids, sp, rid in zip(prompts, sps, rids):
            params = sampling_from_native(sp, len(ids), state.max_model_len, state.cfg.gen_defaults,
                                          state.vocab_size, clamp=state.cfg.allow_auto_truncate)
            if return_logprob:
                params.logprobs = top_n
                if start_len >= 0:
                    params.prompt_logprobs = top_n
            await state.constrain(params, constraint_native(sp))
            children = expand_n(params)
            for j, child in enumerate(children):
                jobs.append((rid if len(children) == 1 else f"{rid}-{j}", ids, child))
        if len(jobs) > MAX_BATCH:
            raise RequestError(f"a batch may hold at most {MAX_BATCH} prompts × samples, got {len(jobs)}", "text")
        t0 = time.monotonic()

        def entry(lp_value, token_id):
            return [lp_value, token_id, state.token_text(token_id) if with_text else None]

        prompt_lps: dict[int, list] = {}  # job → its prompt's logprobs (logprob_start_len ≥ 0), once they came

        def meta(i, out, lps):  # SGLang's meta_info (logprobs of every output token so far)
            rid, ids = jobs[i][0], jobs[i][1]
            m = {"id": rid, "finish_reason": native_finish_reason(out) if out.finished else None,
                 "prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                 "cached_tokens": out.cached_tokens, "e2e_latency": time.monotonic() - t0}
            if return_logprob:
                if out.prompt_logprobs is not None:
                    prompt_lps[i] = out.prompt_logprobs
                if start_len >= 0 and i in prompt_lps:  # the first prompt token has no logprob: nothing precedes it
                    pl = prompt_lps[i]
                    m["input_token_logprobs"] = ([entry(None, ids[0])] + [entry(lp.logprob, lp.token_id)
                                                                        for lp in pl])[start_len:]
                    if top_n:
                        m["input_top_logprobs"] = ([None] + [[entry(v, t) for t, v in lp.top] for lp in pl])[start_len:]
                m["output_token_logprobs"] = [entry(lp.logprob, lp.token_id) for lp in lps]
                if top_n:
                    m["output_top_logprobs"] = [[entry(v, t) for t, v in lp.top] for lp in lps]
            return m

        gens = [run_request(state, rid, ids, p) for rid, ids, p in jobs]
        many = len(jobs) > 1
        if flag(body, "stream", False):
            outs = await started(merge_choices(gens))

            async def events():  # SGLang's stream: cumulative text / ids / logprobs per chunk ("index" in a batch)
                text, out_ids, lps = [""] * len(jobs), [[] for _ in jobs], [[] for _ in jobs]
                try:
                    async for i, out in outs:
                        text[i] += out.text_delta
                        out_ids[i] += out.new_token_ids
                        lps[i] += out.logprobs
                        chunk = {"text": text[i], "output_ids": out_ids[i], "meta_info": meta(i, out, lps[i])}
                        yield sse({**chunk, "index": i} if many else chunk)
                except (EngineRejected, EngineDead) as e:
                    yield error_event(e)
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")

        async def collect():
            text, out_ids, lps, last = [""] * len(jobs), [[] for _ in jobs], [[] for _ in jobs], [None] * len(jobs)
            async for i, out in merge_choices(gens):
                text[i] += out.text_delta
                out_ids[i] += out.new_token_ids
                lps[i] += out.logprobs
                last[i] = out
                if out.prompt_logprobs is not None:
                    prompt_lps[i] = out.prompt_logprobs
            results = [{"text": text[i], "output_ids": out_ids[i], "meta_info": meta(i, last[i], lps[i])}
                       for i in range(len(jobs))]
            return results if batch or many else results[0]

        return await unless_disconnected(request, collect())

    @app.api_route("/abort_request", methods=["POST"])
    async def abort_request(request: Request):
        """SGLang's: {"rid": id} aborts that request (all samples of it), {"abort_all": true} every one; each ends
        with finish_reason abort. Unknown ids are not an error (the request may have just finished)."""
        body = await read_json(request)
        if flag(body, "abort_all", False):
            state.engine.abort(state.engine.requests())
        else:
            rid = request_id(body)
            if rid is None:
                raise RequestError("give 'rid' (the request's id) or 'abort_all': true", "rid")
            state.engine.abort([r for r in state.engine.requests() if r == rid or _child_of(r, rid)])
        return Response(status_code=200)

    async def flush(timeout: float) -> Response:
        deadline = time.monotonic() + timeout
        while state.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if state.in_flight or not await state.engine.flush_cache():
            return PlainTextResponse("Cache not flushed: requests are running; retry when they are done (or pass "
                                     "?timeout=SECONDS to wait for them).\n", status_code=400)
        return PlainTextResponse("Cache flushed.\nPlease check backend logs for more details. (When there are "
                                 "running or waiting requests, the operation will not be performed.)\n")

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache(timeout: float = 0.0):
        """SGLang's: empties the prefix cache once no request is running (waiting up to ?timeout= seconds)."""
        if not 0 <= timeout <= 3600:
            raise RequestError("'timeout' must be in [0, 3600] seconds", "timeout")
        return await flush(timeout)

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache():
        """vLLM's name for the same (its benchmark's flush)."""
        return await flush(0.0)

    from dsv32.server.chat import register_chat

    register_chat(app, state)
    return app
