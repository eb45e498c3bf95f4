"""POST /v1/chat/completions: chat encoding, thinking switch, tools, reasoning and tool-call parsing, streaming.

tool_choice: "none" (tools left out of the prompt, no parsing), "auto" (default with tools), "required" and
named. There is no constrained decoding yet, so required/named are enforced by prefilling: the prompt ends
with an empty reasoning and the opening of a DSML call block (`</think>\n\n<｜DSML｜function_calls>\n`, plus
`<｜DSML｜invoke name="NAME">\n` when named), and that prefill is fed to the tool parser before the model's
output, so the client sees a normal tool call. Other parsers reject required/named with a clear 400.
"""

from __future__ import annotations

import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from dsv32.core.llm import expand_n
from dsv32.server.app import ServerState, merge_choices, read_json, run_request, sse
from dsv32.server.engine_process import EngineDead, EngineRejected
from dsv32.server.protocol import RequestError, error_body, sampling_from_openai

DSML_BLOCK_OPEN = "\n\n<｜DSML｜function_calls>\n"


def _validate_tools(body: dict):
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise RequestError("'tools' must be a list", "tools")
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict) \
                    or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise RequestError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}",
                                   f"tools[{i}]")
    choice = body.get("tool_choice", "auto" if tools else "none")
    named = None
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RequestError("'tool_choice' object must be {'type': 'function', 'function': {'name': ...}}", "tool_choice")
        named = fn["name"]
        if not tools:
            raise RequestError("Tools cannot be empty if tool choice is set to a function.", "tool_choice")
        if named not in {t["function"]["name"] for t in tools}:
            raise RequestError(f"Tool '{named}' not found in tools list.", "tool_choice")
        choice = "named"
    elif choice not in ("none", "auto", "required"):
        raise RequestError("'tool_choice' must be 'none', 'auto', 'required' or a function object", "tool_choice")
    if choice == "required" and not tools:
        raise RequestError("Tools cannot be empty if tool choice is set to required.", "tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise RequestError("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    return tools or None, choice, named, parallel


def _chat_logprobs(lps, tokenizer):
    if not lps:
        return None
    dec = (lambda t: tokenizer.decode([t], skip_special_tokens=False)) if tokenizer else str

    def entry(t, v):
        s = dec(t)
        return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps]}


def register_chat(app: FastAPI, state: ServerState) -> None:
    from dsv32.server.encoding import get_chat_encoder, resolve_thinking
    from dsv32.server.parsers import OutputParser, ReasoningParser, ToolCallParser, finish_reason

    encoder = get_chat_encoder(state.cfg.chat_template or "dsv32")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request)
        state.check_model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty list", "messages")
        rf = body.get("response_format")
        if rf is not None and (not isinstance(rf, dict) or rf.get("type", "text") != "text"):
            raise RequestError("'response_format' json_object / json_schema needs constrained decoding, which this "
                               "server does not have yet; only {'type': 'text'} is accepted", "response_format")
        if body.get("continue_final_message"):
            raise RequestError("'continue_final_message' is not supported yet", "continue_final_message")
        tools, choice, named, parallel = _validate_tools(body)
        kwargs = body.get("chat_template_kwargs")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise RequestError("'chat_template_kwargs' must be an object", "chat_template_kwargs")
        try:
            thinking = resolve_thinking(kwargs, body.get("thinking"))
        except ValueError as e:
            raise RequestError(str(e), "chat_template_kwargs") from None
        use_tools = tools is not None and choice != "none"
        tool_parser_name = state.cfg.tool_call_parser
        forced = ""
        if use_tools and choice in ("required", "named"):
            if tool_parser_name != "deepseekv32":
                raise RequestError(f"tool_choice '{choice}' needs --tool-call-parser deepseekv32 (this server: "
                                   f"{tool_parser_name or 'none'})", "tool_choice")
            forced = DSML_BLOCK_OPEN + (f'<｜DSML｜invoke name="{named}">\n' if named else "")
        try:
            prompt = encoder.render(messages, tools=tools if use_tools else None, thinking=thinking,
                                    add_generation_prompt=True, chat_template_kwargs=kwargs)
        except ValueError as e:
            raise RequestError(str(e), getattr(e, "path", None) or "messages") from None
        if forced and thinking:
            prompt += "</think>"  # no reasoning before a forced call
        ids = state.encode(prompt + forced)
        params = sampling_from_openai(body, len(ids), state.max_model_len, state.cfg.gen_defaults, chat=True)
        if use_tools and tool_parser_name:
            params.skip_special_tokens = False  # DSML / V3.1 markers must survive detokenization
        separate = body.get("separate_reasoning", True) is not False
        stream_reasoning = body.get("stream_reasoning", True) is not False
        reasoning_on = bool(state.cfg.reasoning_parser) and separate and not forced

        def new_parser():
            reasoning = ReasoningParser(state.cfg.reasoning_parser, thinking=thinking) if reasoning_on else None
            tool = (ToolCallParser(tool_parser_name, tools=tools, tool_choice="auto" if choice == "named" else choice,
                                   parallel_tool_calls=parallel) if use_tools and tool_parser_name else None)
            return OutputParser(reasoning=reasoning, tools=tool)

        rid = body.get("rid") or f"chatcmpl-{uuid.uuid4().hex}"
        children = expand_n(params)
        parsers = [new_parser() for _ in children]
        prefeed = [p.feed(forced) if forced else [] for p in parsers]
        gens = [run_request(state, f"{rid}-{i}", ids, p) for i, p in enumerate(children)]
        base = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": state.cfg.served_model_name}
        if body.get("stream"):
            return StreamingResponse(_stream(state, body, base, gens, parsers, prefeed, stream_reasoning, len(ids)),
                                     media_type="text/event-stream")

        texts = [[forced] if forced else [] for _ in children]
        lps, tokens = [[] for _ in children], [0] * len(children)
        finish, cached = [None] * len(children), 0
        async for i, out in merge_choices(gens):
            texts[i].append(out.text_delta)
            lps[i] += out.logprobs
            tokens[i] += len(out.new_token_ids)
            if out.finished:
                finish[i], cached = out.finish_reason, max(cached, out.cached_tokens)
        choices, reasoning_tokens = [], 0
        for i, parser in enumerate(parsers):
            parsed = parser.parse("".join(texts[i]))
            if parsed.reasoning_content:
                reasoning_tokens += len(state.encode(parsed.reasoning_content))
            message = {"role": "assistant", "content": parsed.content or "",
                       "reasoning_content": parsed.reasoning_content or None,
                       "tool_calls": [c.to_openai() for c in parsed.tool_calls] or None}
            choices.append({"index": i, "message": message, "logprobs": _chat_logprobs(lps[i], state.tokenizer),
                            "finish_reason": finish_reason(finish[i], parsed)})
        completion = sum(tokens)
        return {**base, "choices": choices, "usage": {
            "prompt_tokens": len(ids), "completion_tokens": completion, "total_tokens": len(ids) + completion,
            "prompt_tokens_details": {"cached_tokens": cached}, "reasoning_tokens": reasoning_tokens}}


async def _stream(state, body, base, gens, parsers, prefeed, stream_reasoning, prompt_tokens):
    base = {**base, "object": "chat.completion.chunk"}
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    n = len(parsers)
    held_reasoning = [[] for _ in range(n)]
    made_calls = [False] * n
    completion = 0
    cached = 0

    def chunk(i, deltas, finish=None, logprobs=None):
        delta: dict = {}
        calls = []
        for d in deltas:
            if d.reasoning_content is not None:
                if stream_reasoning:
                    delta["reasoning_content"] = delta.get("reasoning_content", "") + d.reasoning_content
                else:
                    held_reasoning[i].append(d.reasoning_content)
            elif d.content is not None:
                delta["content"] = delta.get("content", "") + d.content
            elif d.tool_call is not None:
                calls.append(d.tool_call.to_openai())
                made_calls[i] = True
        if calls:
            delta["tool_calls"] = calls
        if finish is not None and held_reasoning[i]:
            delta["reasoning_content"] = "".join(held_reasoning[i])
            held_reasoning[i].clear()
        if not delta and finish is None and logprobs is None:
            return None
        c = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return sse({**base, "choices": [c]})

    try:
        for i in range(n):
            yield sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]})
            first = chunk(i, prefeed[i])
            if first:
                yield first
        reasoning_text = [[] for _ in range(n)]
        async for i, out in merge_choices(gens):
            completion += len(out.new_token_ids)
            deltas = parsers[i].feed(out.text_delta) if out.text_delta else []
            if out.finished:
                deltas += parsers[i].finish()
                cached = max(cached, out.cached_tokens)
            reasoning_text[i] += [d.reasoning_content for d in deltas if d.reasoning_content]
            lp = _chat_logprobs(out.logprobs, state.tokenizer)
            c = chunk(i, deltas, logprobs=lp)
            if c:
                yield c
            if out.finished:
                reason = "tool_calls" if made_calls[i] and out.finish_reason == "stop" else out.finish_reason
                yield chunk(i, [], finish=reason)
        if include_usage:
            rt = sum(len(state.encode("".join(r))) if r else 0 for r in reasoning_text)
            yield sse({**base, "choices": [], "usage": {
                "prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": cached},
                "reasoning_tokens": rt}})
    except (EngineRejected, EngineDead) as e:
        yield sse(error_body(str(e), None, 400 if isinstance(e, EngineRejected) else 503))
    yield "data: [DONE]\n\n"
