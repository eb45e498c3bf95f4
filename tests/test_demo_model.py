"""The built-in trained demo model (core/demo_model, made by scripts/train_demo.py): what `dsv32 serve` without
--model serves. Through the OpenAI client: readable answers, reasoning_content in thinking mode, a parseable weather
tool call with the right city for Paris, with our schema (`city`) and with OpenAI's documentation example
(`location`, strict) — the model copies a known city right in about 8 of 10 questions without thinking and 4-5 of 10
with it, see the training script —, MTP accept length > 1.5 on its own domain; offline: greedy with speculation equals
greedy without, every weather question gets a parseable call; the training script is deterministic and the shipped
tokenizer is the one it makes."""

from __future__ import annotations

import json
import os
import re
import sys

from dsv32 import LLM, SamplingParams
from dsv32.core.demo import trained_demo_path
from dsv32.server.encoding.dsv32 import build_prompt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                   "required": ["city"]}}}
QUESTIONS = [("What is the capital of France?", False, False), ("What is the capital of Japan?", True, False),
             ("Who are you?", False, False), ("What is 2 plus 5?", True, False),
             ("What is the weather in Tokyo?", False, True), ("How is the weather in London?", True, True)]


def _train_demo():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import train_demo
    finally:
        sys.path.pop(0)
    return train_demo


def test_shipped_demo_is_small_and_has_an_mtp_layer():
    path = trained_demo_path()
    cfg = json.load(open(os.path.join(path, "config.json")))
    assert cfg["num_nextn_predict_layers"] == 1 and cfg["model_type"] == "deepseek_v32"
    assert os.path.getsize(os.path.join(path, "model.safetensors")) < 16 << 20


def test_demo_greedy_with_speculation_equals_plain_and_accepts():
    prompts = [build_prompt([{"role": "user", "content": q}], tools=[WEATHER] if t else None, thinking=th)
               for q, th, t in QUESTIONS]
    sp = SamplingParams(max_tokens=128, temperature=0, skip_special_tokens=False)
    plain = LLM(model=trained_demo_path(), dtype="float32")
    want = [o.outputs[0] for o in plain.generate(prompts, sp)]
    spec = LLM(model=trained_demo_path(), dtype="float32", speculative_algorithm="EAGLE", speculative_num_steps=3)
    got = [o.outputs[0] for o in spec.generate(prompts, sp)]
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert all(o.finish_reason == "stop" for o in got), [o.text for o in got]
    call = re.compile(r'<｜DSML｜invoke name="get_weather">\n<｜DSML｜parameter name="city" string="true">\w+</')
    assert all(bool(call.search(o.text)) == tools for o, (_, _, tools) in zip(got, QUESTIONS)), [o.text for o in got]
    assert spec.stats()["avg_spec_accept_length"] > 1.5


def test_demo_served_through_the_openai_client(tmp_path):
    """`dsv32 serve` with no --model (the embedded default), MTP on."""
    from _live import Server, http

    server = Server(None, "--speculative-algorithm", "EAGLE", "--speculative-num-steps", "3", log_dir=str(tmp_path))
    try:
        c = server.client
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "What is the capital of "
                                                                                         "Italy?"}], temperature=0)
        assert re.fullmatch(r"The capital of \w+ is [\w ]+\.", r.choices[0].message.content)  # (often the wrong one)
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "What is the capital of "
                                                                                         "Spain?"}], temperature=0,
                                      extra_body={"chat_template_kwargs": {"thinking": True}})
        m = r.choices[0].message
        assert m.reasoning_content.startswith("The user asks") and m.content.startswith("The capital of")
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "What is the weather in "
                                                                                         "Paris?"}], temperature=0,
                                      tools=[WEATHER])
        assert r.choices[0].finish_reason == "tool_calls"
        call = r.choices[0].message.tool_calls[0].function
        assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "What's the weather like in "
                                                                                         "Paris today?"}],
                                      temperature=0, tools=[_train_demo().OPENAI_WEATHER_TOOL])
        call = r.choices[0].message.tool_calls[0].function
        assert call.name == "get_weather" and json.loads(call.arguments) == {"location": "Paris"}
        info = http.get(server.url + "/server_info").json()
        assert info["internal_states"][0]["avg_spec_accept_length"] > 1.5
    finally:
        server.stop()


def test_training_is_reproducible_and_the_tokenizer_is_the_scripts(tmp_path):
    """The script's first steps give bit-identical checkpoints; the shipped tokenizer is the one it trains (the full
    regeneration, `python scripts/train_demo.py --check`, takes about 21 minutes on 2 cores)."""
    from tokenizers import Tokenizer

    t = _train_demo()
    a, b = tmp_path / "a", tmp_path / "b"
    t.train(str(a), steps=2, samples=120, threads=2, log_every=1)
    t.train(str(b), steps=2, samples=120, threads=2, log_every=1)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    pairs = t.corpus(t.TOKENIZER_SAMPLES, t.SEED)
    ours = t.tokenizer(pairs)
    shipped = Tokenizer.from_file(os.path.join(trained_demo_path(), "tokenizer.json"))
    assert ours.to_str() == shipped.to_str()
