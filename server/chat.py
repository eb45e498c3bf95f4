"""POST /v1/chat/completions: chat encoding, thinking switch, tools, reasoning and tool-call parsing, streaming.

tool_choice: "none" (tools left out of the prompt, no parsing), "auto" (default with tools), "required" and
named. Required/named prefill the prompt with an empty reasoning and the opening of a DSML call block
(`</think>\n\n<｜DSML｜function_calls>\n`, plus `<｜DSML｜invoke name="NAME">\n` when named), fed to the tool parser
before the model's output, and constrain the rest with a grammar (core/grammar.py): DSML parameter lines whose
values follow the tool's JSON schema, then the closing tags, so a forced call always parses and its arguments
validate. Other parsers reject required/named with a clear 400. response_format json_object / json_schema (and
SGLang's regex / ebnf / json_schema fields) constrain the content; in thinking mode the reasoning stays free and
the grammar starts after </think>.
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

import asyncio

from dsv32.core.grammar import MAX_CALLS, GrammarRequest
from dsv32.core.llm import expand_n
from dsv32.server.app import (ServerState, collect_choices, error_event, merge_choices, read_json, run_request, sse,
                              started, unless_disconnected)
from dsv32.server.encoding.common import DSML, THINK_END, THINK_START
from dsv32.server.engine_process import EngineDead, EngineRejected
from dsv32.server.parsers import v31
from dsv32.server.protocol import (RequestError, constraint_openai, flag, request_id, sampling_from_openai,
                                   stream_options)

DSML_BLOCK_OPEN = "\n\n<｜DSML｜function_calls>\n"
# The markers each parser reads: detokenization keeps them even where they are special tokens (and drops the
# other special tokens, so an end-of-sentence never reaches the content).
PARSER_MARKERS = {"deepseek-v3": (THINK_START, THINK_END), "deepseekv32": (DSML,),
                  "deepseekv31": (v31.CALLS_BEGIN, v31.CALLS_END, v31.CALL_BEGIN, v31.CALL_END, v31.SEP)}
RENDER_INLINE_BYTES = 1 << 16  # bigger requests render their prompt in a thread, off the event loop


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


def _chat_logprobs(lps, state: ServerState):
    if not lps:
        return None

    def entry(t, v):
        s = state.token_text(t)
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
        found = constraint_openai(body)
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
        # text in the client's messages and tools that spells a special token stays text (tokenization.py)
        safe, pieces, marker = (state.tokens.protect({"messages": messages, "tools": tools}) if state.tokens
                                else ({"messages": messages, "tools": tools}, [], None))
        safe_messages, safe_tools = safe["messages"], safe["tools"]

        def render():
            return encoder.render(safe_messages, tools=safe_tools if use_tools else None, thinking=thinking,
                                  add_generation_prompt=True, chat_template_kwargs=kwargs)

        try:
            big = int(request.headers.get("content-length") or 0) > RENDER_INLINE_BYTES
            prompt = await asyncio.to_thread(render) if big else render()
        except ValueError as e:
            raise RequestError(str(e), getattr(e, "path", None) or "messages") from None
        if forced and thinking:
            prompt += "</think>"  # no reasoning before a forced call
        ids = await state.encode(prompt + forced, "messages", pieces, marker)
        params = sampling_from_openai(body, len(ids), state.max_model_len, state.cfg.gen_defaults, chat=True,
                                      vocab_size=state.vocab_size, clamp=state.cfg.allow_auto_truncate)
        separate = flag(body, "separate_reasoning", True)
        stream_reasoning = flag(body, "stream_reasoning", True)
        reasoning_on = bool(state.cfg.reasoning_parser) and separate and not forced
        markers = (PARSER_MARKERS[state.cfg.reasoning_parser] if reasoning_on else ()) + \
            (PARSER_MARKERS[tool_parser_name] if use_tools and tool_parser_name else ())
        params.keep_special_tokens = markers  # the parsers' markers survive skip_special_tokens
        if forced:  # the call's arguments follow the tool's JSON schema, inside DSML framing
            if found is not None:
                raise RequestError(f"'{found[0]}' cannot be combined with tool_choice '{choice}' (a forced call has "
                                   "no content to constrain)", found[0])
            fns = [{"name": t["function"]["name"], "parameters": t["function"].get("parameters") or {}} for t in tools]
            spec = json.dumps({"tools": fns, "named": named, "max_calls": MAX_CALLS if parallel else 1},
                              ensure_ascii=False)
            await state.constrain(params, ("tools", GrammarRequest("dsml_tools", spec)))
        else:  # in thinking mode the reasoning stays free: the grammar starts after </think>
            await state.constrain(params, found, after=state.think_end_id if thinking else None)

        def new_parser():
            reasoning = ReasoningParser(state.cfg.reasoning_parser, thinking=thinking) if reasoning_on else None
            tool = (ToolCallParser(tool_parser_name, tools=tools, tool_choice="auto" if choice == "named" else choice,
                                   parallel_tool_calls=parallel) if use_tools and tool_parser_name else None)
            return OutputParser(reasoning=reasoning, tools=tool)

        rid = request_id(body) or f"chatcmpl-{uuid.uuid4().hex}"
        include_usage = stream_options(body)
        children = expand_n(params)
        parsers = [new_parser() for _ in children]
        prefeed = [p.feed(forced) if forced else [] for p in parsers]
        gens = [run_request(state, f"{rid}-{i}", ids, p) for i, p in enumerate(children)]
        base = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": state.cfg.served_model_name}
        if flag(body, "stream", False):
            outs = await started(merge_choices(gens))
            return StreamingResponse(_stream(state, include_usage, base, outs, parsers, prefeed, stream_reasoning,
                                             len(ids)), media_type="text/event-stream")

        got = await unless_disconnected(request, collect_choices(gens))
        choices, reasoning_tokens = [], 0
        for i, parser in enumerate(parsers):
            parsed = parser.parse(forced + got.texts[i])
            if parsed.reasoning_content:
                reasoning_tokens += _reasoning_tokens(got.tokens[i], state.think_end_id)
            message = {"role": "assistant", "content": parsed.content or "",
                       "reasoning_content": parsed.reasoning_content or None,
                       "tool_calls": [c.to_openai() for c in parsed.tool_calls] or None}
            choices.append({"index": i, "message": message, "logprobs": _chat_logprobs(got.logprobs[i], state),
                            "finish_reason": finish_reason(got.finish[i], parsed), "matched_stop": got.stop_reasons[i]})
        completion = sum(len(t) for t in got.tokens)
        return {**base, "choices": choices, "usage": _usage(len(ids), completion, got.cached, reasoning_tokens)}


def _usage(prompt: int, completion: int, cached: int, reasoning: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning}, "reasoning_tokens": reasoning}


def _reasoning_tokens(output_ids: list[int], think_end_id: int | None) -> int:
    """Generated tokens before the end of reasoning (all of them while it has not ended), counted on the tokens
    themselves: never more than the completion's."""
    if think_end_id is not None and think_end_id in output_ids:
        return output_ids.index(think_end_id)
    return len(output_ids)


async def _stream(state, include_usage, base, outs, parsers, prefeed, stream_reasoning, prompt_tokens):
    base = {**base, "object": "chat.completion.chunk"}
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
        output_ids = [[] for _ in range(n)]
        async for i, out in outs:
            completion += len(out.new_token_ids)
            output_ids[i] += out.new_token_ids
            deltas = parsers[i].feed(out.text_delta) if out.text_delta else []
            if out.finished:
                deltas += parsers[i].finish()
                cached = max(cached, out.cached_tokens)
            lp = _chat_logprobs(out.logprobs, state)
            c = chunk(i, deltas, logprobs=lp)
            if c:
                yield c
            if out.finished:
                reason = "tool_calls" if made_calls[i] and out.finish_reason == "stop" else out.finish_reason
                yield chunk(i, [], finish=reason)
        if include_usage:
            rt = sum(_reasoning_tokens(ids, state.think_end_id) for ids, p in zip(output_ids, parsers)
                     if p.result().reasoning_content)
            yield sse({**base, "choices": [], "usage": _usage(prompt_tokens, completion, cached, rt)})
    except (EngineRejected, EngineDead) as e:
        yield error_event(e)
    yield "data: [DONE]\n\n"
