"""Structured output through xgrammar: the grammars themselves (DSML framing equals the encoder's rendering), the
token mask every backend applies, and a live server whose model has random weights, where every constrained
answer must still parse and validate (property-style over generated JSON schemas, checked with jsonschema)."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest
import torch
from _live import Server, http

xgr = pytest.importorskip("xgrammar")

from dsv32.core.grammar import GrammarError, GrammarRequest, build_grammar, dsml_tools_grammar  # noqa: E402
from dsv32.core.sampling import apply_token_bitmask  # noqa: E402
from dsv32.server.encoding.common import ToolCall  # noqa: E402
from dsv32.server.encoding.dsv32 import render_tool_calls  # noqa: E402


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A JSON schema of the kinds tools and response formats use: objects with required and optional properties,
    integers and numbers with bounds, booleans, string enums, bounded and plain strings, arrays, nesting."""
    kinds = ["integer", "number", "boolean", "enum", "short_string", "string", "array"] + (["object"] if depth < 2 else [])
    props = {}
    for i in range(rng.randint(1, 4)):
        k = rng.choice(kinds)
        name = f"{rng.choice(['city', 'days', 'unit', 'note', 'count', 'flag', 'items', 'meta'])}_{i}"
        if k == "integer":
            lo = rng.randint(-50, 50)
            props[name] = {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 100)}
        elif k == "number":
            props[name] = {"type": "number"}
        elif k == "boolean":
            props[name] = {"type": "boolean"}
        elif k == "enum":
            props[name] = {"type": "string", "enum": rng.sample(["celsius", "fahrenheit", "kelvin", "a b", "x"], 3)}
        elif k == "short_string":
            props[name] = {"type": "string", "maxLength": rng.randint(1, 10)}
        elif k == "string":
            props[name] = {"type": "string"}
        elif k == "array":
            props[name] = {"type": "array", "items": {"type": "integer"}, "maxItems": rng.randint(1, 3)}
        else:
            props[name] = random_schema(rng, depth + 1)
    required = [n for n in props if rng.random() < 0.7]
    return {"type": "object", "properties": props, "required": required}


# ---- grammars and masks, no server ---------------------------------------------------------------------------------

def test_bad_constraints_name_the_problem():
    for req, needle in ((GrammarRequest("json_schema", '{"type": "objec"}'), "objec"),
                        (GrammarRequest("regex", "([a-z"), "regex"),
                        (GrammarRequest("ebnf", "root ::= missing_rule"), "ebnf")):
        with pytest.raises(GrammarError, match=needle):
            build_grammar(req)


def test_token_bitmask_matches_xgrammar_on_random_masks():
    torch.manual_seed(0)
    for vocab in (31, 32, 33, 512, 1000):
        logits = torch.randn(5, vocab)
        bitmask = torch.randint(-(2**31), 2**31 - 1, (5, (vocab + 31) // 32), dtype=torch.int32)
        ref = logits.clone()
        xgr.apply_token_bitmask_inplace(ref, bitmask)
        assert torch.equal(apply_token_bitmask(logits, bitmask), ref)


def test_dsml_grammar_accepts_the_encoders_rendering_and_nothing_looser():
    """The forced-call grammar (after the named invoke's open tag) accepts exactly what the chat encoder renders for
    valid arguments, and refuses arguments that break the schema."""
    tools = [{"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}, "hourly": {"type": "boolean"}},
        "required": ["city", "days"]}}]
    info = xgr.TokenizerInfo([chr(c) for c in range(32, 127)] + ["｜DSML｜", "\n", "<", "/"])
    compiler = xgr.GrammarCompiler(info)

    def accepts(text: str, named: str | None) -> bool:
        m = xgr.GrammarMatcher(compiler.compile_grammar(dsml_tools_grammar(tools, named)))
        return m.accept_string(text) and m.is_completed()

    for args in ({"city": "Paris", "days": 2}, {"city": "Rome", "days": 7, "hourly": True}):
        block = render_tool_calls([ToolCall("get_weather", args, None, "t")])
        after_named = block.split('<｜DSML｜invoke name="get_weather">\n', 1)[1]
        assert accepts(after_named, "get_weather"), after_named
        assert accepts(block.split("<｜DSML｜function_calls>\n", 1)[1], None)
    for bad in ({"city": "Paris"}, {"city": "Paris", "days": 0}, {"city": "Paris", "days": "2"}):
        block = render_tool_calls([ToolCall("get_weather", bad, None, "t")])
        assert not accepts(block.split('<｜DSML｜invoke name="get_weather">\n', 1)[1], "get_weather"), bad


# ---- a live server with a random-weights model -------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from dsv32.core.demo import make_demo_checkpoint

    model = make_demo_checkpoint(str(tmp_path_factory.mktemp("demo") / "demo"))  # random weights: grammars decide
    s = Server(model, "--reasoning-parser", "deepseek-v3", "--tool-call-parser", "deepseekv32",
               "--max-running-requests", "16")
    yield s
    s.stop()


def chat(server, **kw):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
            "max_tokens": 1500, "temperature": 1.0, **kw}
    return http.post(server.url + "/v1/chat/completions", json=body)


def test_response_format_json_schema_always_validates(server):
    rng = random.Random(2026)
    cases = [(random_schema(rng), seed) for seed in range(12)]
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda c: chat(server, seed=c[1], response_format={
            "type": "json_schema", "json_schema": {"name": "answer", "schema": c[0], "strict": True}}), cases))
    for (schema, _), r in zip(cases, results):
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop", (schema, choice)
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)


def test_json_object_n_streaming_and_thinking(server):
    r = chat(server, seed=1, n=3, response_format={"type": "json_object"})
    for c in r.json()["choices"]:
        assert c["finish_reason"] == "stop" and isinstance(json.loads(c["message"]["content"]), dict)
    schema = {"type": "object", "properties": {"unit": {"type": "string", "enum": ["c", "f"]},
                                               "temp": {"type": "integer"}}, "required": ["unit", "temp"]}
    rf = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}
    with http.stream("POST", server.url + "/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "Temperature?"}], "max_tokens": 800,
            "seed": 4, "stream": True, "response_format": rf}) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    jsonschema.validate(json.loads(text), schema)
    # thinking: the reasoning is free, the grammar holds from </think> on
    r = chat(server, seed=9, response_format=rf, chat_template_kwargs={"thinking": True}, max_tokens=3000)
    msg = r.json()["choices"][0]
    if msg["finish_reason"] == "stop" and msg["message"]["content"]:
        jsonschema.validate(json.loads(msg["message"]["content"]), schema)
    assert msg["finish_reason"] in ("stop", "length")


def test_forced_tool_calls_parse_and_validate(server):
    rng = random.Random(7)
    for k in range(6):
        schemas = [random_schema(rng) for _ in range(2)]
        tools = [{"type": "function", "function": {"name": f"tool_{i}", "description": "t", "parameters": s}}
                 for i, s in enumerate(schemas)]
        choice = {"type": "function", "function": {"name": "tool_1"}} if k % 2 else "required"
        r = chat(server, seed=k, tools=tools, tool_choice=choice, parallel_tool_calls=bool(k % 3))
        assert r.status_code == 200, r.text
        c = r.json()["choices"][0]
        assert c["finish_reason"] == "tool_calls", c
        calls = c["message"]["tool_calls"]
        assert calls and (k % 3 or len(calls) == 1)
        for call in calls:
            name = call["function"]["name"]
            assert name == "tool_1" or choice == "required"
            jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[int(name[-1])])


def test_forced_call_with_refs_to_definitions(server):
    """Tool schemas as pydantic writes them ($defs and $ref, enums, optional fields): each property's sub-schema keeps
    the definitions it refers to."""
    schema = {"$defs": {"Day": {"type": "object", "properties": {"day": {"type": "integer"}, "summary": {
        "enum": ["sunny", "rainy"], "type": "string"}}, "required": ["day", "summary"], "additionalProperties": False}},
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "array", "items": {
            "$ref": "#/$defs/Day"}}, "note": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None}},
        "required": ["city", "days"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "report", "parameters": schema, "strict": True}}]
    for seed, choice in ((1, {"type": "function", "function": {"name": "report"}}), (2, "required")):
        r = chat(server, seed=seed, tools=tools, tool_choice=choice)
        assert r.status_code == 200, r.text
        for call in r.json()["choices"][0]["message"]["tool_calls"]:
            jsonschema.validate(json.loads(call["function"]["arguments"]), schema)


def test_generate_regex_ebnf_json_schema_and_completions(server):
    regex = r"[a-z]{2,5}-[0-9]{2}"
    r = http.post(server.url + "/generate", json={"text": "Code:", "sampling_params": {
        "max_new_tokens": 50, "regex": regex, "temperature": 1.0, "seed": 3, "n": 2}}).json()
    assert all(re.fullmatch(regex, x["text"]) and x["meta_info"]["finish_reason"]["type"] == "stop" for x in r)
    ebnf = 'root ::= "yes" | "no" | ("maybe " [0-9])'
    r = http.post(server.url + "/generate", json={"text": "Answer:", "sampling_params": {
        "max_new_tokens": 20, "ebnf": ebnf, "seed": 5}}).json()
    assert re.fullmatch(r"yes|no|maybe [0-9]", r["text"])
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    r = http.post(server.url + "/generate", json={"text": "JSON:", "sampling_params": {
        "max_new_tokens": 100, "json_schema": json.dumps(schema), "seed": 1}}).json()
    jsonschema.validate(json.loads(r["text"]), schema)
    r = http.post(server.url + "/v1/completions", json={"prompt": "JSON:", "max_tokens": 100, "seed": 2,
                                                        "response_format": {"type": "json_schema", "json_schema": {
                                                            "name": "n", "schema": schema}}}).json()
    jsonschema.validate(json.loads(r["choices"][0]["text"]), schema)


def test_bad_constraints_are_400s(server):
    cases = [({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}}},
              "response_format"),
             ({"response_format": {"type": "xml"}}, "response_format"),
             ({"regex": "([a-z"}, "regex"),
             ({"response_format": {"type": "json_object"}, "regex": "a+"}, "regex"),
             ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos"),
             ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objec"}}}],
               "tool_choice": "required"}, "tools")]
    for extra, param in cases:
        r = chat(server, max_tokens=5, **extra)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)
    r = http.post(server.url + "/generate", json={"text": "x", "sampling_params": {"regex": "a", "ebnf": "root ::= \"a\""}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "sampling_params.ebnf"
    assert http.get(server.url + "/health").status_code == 200
