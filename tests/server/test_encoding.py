"""Chat encoding (protocol.md sections 3-4): dsv32 gold vectors, thinking/chat suffixes, reasoning retention,
tool calls and results, V3.2-Exp (V3.1-family) encoding, Jinja templates, resolve_thinking, error paths."""

import json
import os
import re

import pytest

from dsv32.server.encoding import (ChatTemplateError, DSV32ChatEncoder, JinjaChatTemplate, MessageFormatError,
                                   V31ChatEncoder, build_prompt, encode_messages, get_chat_encoder,
                                   resolve_thinking)
from dsv32.server.encoding import v31

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLD_DIR = os.path.join(REPO_ROOT, "..", "shared", "testdata", "dsv32_encoding")

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
U, A = "<｜User｜>", "<｜Assistant｜>"

GOLD = [
    ("test_input.json", "test_output.txt"),
    ("english_test_input.json", "english_test_output.txt"),
    ("test_input_search_w_date.json", "test_output_search_w_date.txt"),
    ("test_input_search_wo_date.json", "test_output_search_wo_date.txt"),
]

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]},
        "days": {"type": "integer"}}, "required": ["location"]}}}


def _gold(inp, out):
    if not os.path.isdir(GOLD_DIR):
        pytest.skip(f"gold vectors not found at {os.path.normpath(GOLD_DIR)}")
    with open(os.path.join(GOLD_DIR, inp), encoding="utf-8") as f:
        data = json.load(f)
    with open(os.path.join(GOLD_DIR, out), encoding="utf-8") as f:
        gold = f.read()
    return data, gold


def _call(name, args, call_id=None):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


# --------------------------------------------------------------------------------------------- gold vectors

@pytest.mark.parametrize("inp,out", GOLD)
def test_gold_vectors_byte_exact(inp, out):
    data, gold = _gold(inp, out)
    messages = data["messages"]
    if "tools" in data:
        messages[0]["tools"] = data["tools"]
    got = encode_messages(messages, thinking_mode="thinking", drop_thinking=True, add_default_bos_token=True)
    assert got == gold.strip()
    assert got.encode("utf-8") == gold.strip().encode("utf-8")


@pytest.mark.parametrize("inp,out", GOLD[:2])
def test_gold_vectors_with_request_level_tools(inp, out):
    """Top-level tools passed as a request field attach to messages[0] exactly like the official harness."""
    data, gold = _gold(inp, out)
    assert encode_messages(data["messages"], "thinking", tools=data["tools"]) == gold.strip()
    assert build_prompt(data["messages"], tools=data["tools"], thinking=True) == gold.strip()
    assert "tools" not in data["messages"][0]  # the request is not mutated


def test_gold_vector_chat_mode_differs_only_in_markers():
    data, gold = _gold(*GOLD[0])
    messages = data["messages"]
    messages[0]["tools"] = data["tools"]
    chat = encode_messages(messages, thinking_mode="chat")
    # Chat mode: no reasoning anywhere, the last user turn closes with </think>.
    assert "用户现在问后天的天气" not in chat and "<think>" not in chat.split("</functions>")[1]
    assert f"谢谢！那后天呢？{A}</think>\n\n<｜DSML｜function_calls>" in chat
    assert gold.strip().startswith(chat.split("谢谢！")[0])


# ---------------------------------------------------------------------------------- dsv32: worked examples

EXAMPLE_A = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "Hello! I am DeepSeek.", "reasoning_content": "thinking..."},
    {"role": "user", "content": "1+1=?"},
]


def test_worked_example_a_thinking_and_chat():
    base = f"{BOS}You are a helpful assistant.{U}hello{A}</think>Hello! I am DeepSeek.{EOS}{U}1+1=?{A}"
    assert encode_messages(EXAMPLE_A, thinking_mode="thinking") == base + "<think>"
    assert encode_messages(EXAMPLE_A, thinking_mode="chat") == base + "</think>"
    assert build_prompt(EXAMPLE_A, thinking=True) == base + "<think>"
    assert build_prompt(EXAMPLE_A, thinking=False) == base + "</think>"


def test_worked_example_b_append_only_within_turn():
    b1 = [{"role": "system", "content": "You are a helpful assistant.", "tools": [WEATHER_TOOL]},
          {"role": "user", "content": "What's the weather in Paris for the next 2 days?"}]
    p1 = build_prompt(b1, thinking=True)
    schema = json.dumps(WEATHER_TOOL["function"], ensure_ascii=False)
    assert p1.startswith(f"{BOS}You are a helpful assistant.\n\n## Tools\n\nYou have access to a set of tools")
    assert p1.endswith(f"<functions>\n{schema}\n</functions>\n{U}What's the weather in Paris for the next 2 days?"
                       f"{A}<think>")
    c1 = ("The user wants a 2-day forecast for Paris. I should call get_weather.</think>\n\n"
          "<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
          "<｜DSML｜parameter name=\"location\" string=\"true\">Paris</｜DSML｜parameter>\n"
          "<｜DSML｜parameter name=\"days\" string=\"false\">2</｜DSML｜parameter>\n"
          "</｜DSML｜invoke>\n</｜DSML｜function_calls>" + EOS)
    assistant = {"role": "assistant", "content": "",
                 "reasoning_content": "The user wants a 2-day forecast for Paris. I should call get_weather.",
                 "tool_calls": [_call("get_weather", '{"location": "Paris", "days": 2}', "call_1")]}
    result = '{"forecast": ["18°C sunny", "15°C rain"]}'
    b2 = b1 + [assistant, {"role": "tool", "tool_call_id": "call_1", "content": result}]
    p2 = build_prompt(b2, thinking=True)
    assert p2 == p1 + c1 + f"\n\n<function_results>\n<result>{result}</result>\n</function_results>\n\n<think>"
    c2 = "Mild, then rain.</think>Expect 18°C and sun, then rain." + EOS
    b3 = b2 + [{"role": "assistant", "reasoning_content": "Mild, then rain.",
                "content": "Expect 18°C and sun, then rain."}]
    assert encode_messages(b3, "thinking") == p2 + c2


# ------------------------------------------------------------------------------------- dsv32: suffixes

def _tool_turn():
    return [{"role": "user", "content": "q"},
            {"role": "assistant", "reasoning_content": "r", "tool_calls": [_call("f", "{}", "c1")]},
            {"role": "tool", "tool_call_id": "c1", "content": "out"}]


@pytest.mark.parametrize("thinking,marker", [(True, "<think>"), (False, "</think>")])
def test_suffix_after_tool_results(thinking, marker):
    p = build_prompt(_tool_turn(), thinking=thinking)
    assert p.endswith(f"<result>out</result>\n</function_results>\n\n{marker}")


@pytest.mark.parametrize("thinking,marker", [(True, "<think>"), (False, "</think>")])
def test_suffix_after_developer(thinking, marker):
    p = build_prompt([{"role": "developer", "content": "find it"}], thinking=thinking)
    assert p == f"{BOS}{U}\n\n# The user's message is: find it{A}{marker}"


def test_trailing_assistant_ends_with_eos_and_no_generation_prompt():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert build_prompt(msgs) == f"{BOS}{U}hi{A}</think>hello{EOS}"
    assert build_prompt(msgs, add_generation_prompt=False) == f"{BOS}{U}hi{A}</think>hello{EOS}"


def test_add_generation_prompt_false_drops_the_reply_opener():
    assert build_prompt(EXAMPLE_A, thinking=True, add_generation_prompt=False).endswith(f"{U}1+1=?")
    p = build_prompt(_tool_turn(), thinking=True, add_generation_prompt=False)
    assert p.endswith("<result>out</result>\n</function_results>")
    assert build_prompt(_tool_turn(), thinking=True) == p + "\n\n<think>"


# --------------------------------------------------------------------------- dsv32: reasoning retention

def _two_turns():
    return [{"role": "user", "content": "first"},
            {"role": "assistant", "reasoning_content": "OLD-R", "tool_calls": [_call("f", '{"x": 1}', "a")]},
            {"role": "tool", "tool_call_id": "a", "content": "r1"},
            {"role": "assistant", "reasoning_content": "OLD-R2", "content": "answer one"},
            {"role": "user", "content": "second"},
            {"role": "assistant", "reasoning_content": "NEW-R", "tool_calls": [_call("f", '{"x": 2}', "b")]},
            {"role": "tool", "tool_call_id": "b", "content": "r2"}]


def test_reasoning_only_for_current_turn_in_thinking_mode():
    p = build_prompt(_two_turns(), thinking=True)
    assert "OLD-R" not in p
    assert f"{U}second{A}<think>NEW-R</think>\n\n<｜DSML｜function_calls>" in p
    # Earlier turn: tool results close with </think>, the answer follows directly.
    assert "<result>r1</result>\n</function_results>\n\n</think>answer one" + EOS in p
    assert p.endswith("<result>r2</result>\n</function_results>\n\n<think>")


def test_chat_mode_never_renders_reasoning():
    p = build_prompt(_two_turns(), thinking=False)
    assert "OLD-R" not in p and "NEW-R" not in p and "<think>" not in p
    assert f"{U}second{A}</think>\n\n<｜DSML｜function_calls>" in p


def test_drop_thinking_flag_does_not_change_the_rule():
    msgs = _two_turns()
    assert encode_messages(msgs, "thinking", drop_thinking=False) == encode_messages(msgs, "thinking")


def test_earlier_developer_message_is_kept():
    """DeepSeek's drop_thinking helper drops developer messages before the last user; the rule keeps them."""
    msgs = [{"role": "developer", "content": "dev task"}, {"role": "assistant", "reasoning_content": "r",
                                                         "content": "done"},
            {"role": "user", "content": "more"}]
    p = encode_messages(msgs, "thinking")
    assert p == f"{BOS}{U}\n\n# The user's message is: dev task{A}</think>done{EOS}{U}more{A}<think>"


def test_reasoning_alias_accepted():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "reasoning": "RR", "content": "a"}]
    assert encode_messages(msgs, "thinking") == f"{BOS}{U}q{A}<think>RR</think>a{EOS}"


def test_thinking_assistant_after_last_user_needs_reasoning_or_tool_calls():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(ValueError, match=r"^messages\[1\]\.reasoning_content: "):
        build_prompt(msgs, thinking=True)
    assert build_prompt(msgs, thinking=False) == f"{BOS}{U}q{A}</think>a{EOS}"


# -------------------------------------------------------------------------------- dsv32: tool calls

def test_tool_call_arguments_string_and_dict_render_identically():
    args = {"city": "Zürich", "days": 3, "metric": True, "tags": ["a", "b"], "opts": {"k": None},
            "text": "line1\n\"quoted\""}
    as_str = [{"role": "user", "content": "q"},
              {"role": "assistant", "content": "", "tool_calls": [_call("f", json.dumps(args))]}]
    as_dict = [{"role": "user", "content": "q"},
               {"role": "assistant", "content": "", "tool_calls": [_call("f", args)]}]
    p = build_prompt(as_str)
    assert p == build_prompt(as_dict)
    P = "<｜DSML｜parameter name="
    expected = ("\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"f\">\n"
                f"{P}\"city\" string=\"true\">Zürich</｜DSML｜parameter>\n"
                f"{P}\"days\" string=\"false\">3</｜DSML｜parameter>\n"
                f"{P}\"metric\" string=\"false\">true</｜DSML｜parameter>\n"
                f"{P}\"tags\" string=\"false\">[\"a\", \"b\"]</｜DSML｜parameter>\n"
                f"{P}\"opts\" string=\"false\">{{\"k\": null}}</｜DSML｜parameter>\n"
                f"{P}\"text\" string=\"true\">line1\n\"quoted\"</｜DSML｜parameter>\n"
                "</｜DSML｜invoke>\n</｜DSML｜function_calls>" + EOS)
    assert p == f"{BOS}{U}q{A}</think>" + expected


def test_empty_arguments_and_parallel_calls():
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [_call("f", "{}"), _call("g", "")]}]
    p = build_prompt(msgs)
    assert p.endswith("Checking.\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"f\">\n\n</｜DSML｜invoke>\n"
                      "<｜DSML｜invoke name=\"g\">\n\n</｜DSML｜invoke>\n</｜DSML｜function_calls>" + EOS)


def test_tool_results_reordered_by_tool_call_id():
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "tool_calls": [_call("f", "{}", "A"), _call("g", "{}", "B")]},
            {"role": "tool", "tool_call_id": "B", "content": "second"},
            {"role": "tool", "tool_call_id": "A", "content": "first"}]
    assert "<result>first</result>\n<result>second</result>" in build_prompt(msgs)
    for m in msgs[2:]:
        m["tool_call_id"] = None  # no ids: taken by position
    assert "<result>second</result>\n<result>first</result>" in build_prompt(msgs)


def test_null_content_renders_empty():
    msgs = [{"role": "user", "content": None}, {"role": "assistant", "content": None,
                                                "tool_calls": [_call("f", "{}")]},
            {"role": "tool", "content": None}]
    p = build_prompt(msgs)
    assert "None" not in p
    assert p.startswith(f"{BOS}{U}{A}</think>\n\n<｜DSML｜function_calls>")
    assert "<result></result>" in p


def test_list_content_parts_joined():
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert build_prompt(msgs) == f"{BOS}{U}a\nb{A}</think>"


def test_system_response_format_and_developer_tools():
    rf = {"type": "json_object", "schema": {"a": "é"}}
    p = build_prompt([{"role": "system", "content": "S", "response_format": rf}, {"role": "user", "content": "u"}])
    assert p == (f"{BOS}S\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
                 f"{json.dumps(rf, ensure_ascii=False)}{U}u{A}</think>")
    p = build_prompt([{"role": "developer", "content": "task", "tools": [WEATHER_TOOL]}], thinking=True)
    assert p.startswith(f"{BOS}{U}\n\n## Tools\n\n")
    assert p.endswith("</functions>\n\n\n# The user's message is: task" + A + "<think>")


def test_request_tools_without_system_message_insert_an_empty_system():
    p = build_prompt([{"role": "user", "content": "u"}], tools=[WEATHER_TOOL])
    assert p.startswith(f"{BOS}\n\n## Tools\n\n") and p.endswith(f"</functions>\n{U}u{A}</think>")


def test_tools_in_both_places_rejected():
    msgs = [{"role": "system", "content": "S", "tools": [WEATHER_TOOL]}, {"role": "user", "content": "u"}]
    with pytest.raises(ValueError, match=r"^messages\[0\]\.tools: "):
        build_prompt(msgs, tools=[WEATHER_TOOL])


def test_unknown_thinking_mode_rejected():
    with pytest.raises(ValueError, match="thinking_mode"):
        encode_messages(EXAMPLE_A, thinking_mode="deep")


# ------------------------------------------------------------------------------ error field paths

# Shape errors: every built-in encoder rejects these.
BAD_SHAPES = [
    ([{"role": "user", "content": "q"}, {"role": "critic", "content": "x"}], r"messages\[1\]\.role"),
    ([{"content": "q"}], r"messages\[0\]\.role"),
    (["hello"], r"messages\[0\]"),
    ({"role": "user"}, r"messages"),
    ([], r"messages"),
    ([{"role": "user", "content": 5}], r"messages\[0\]\.content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     r"messages\[0\]\.content\[0\]\.type"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], r"messages\[0\]\.content\[0\]\.text"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": {"name": "f"}}],
     r"messages\[1\]\.tool_calls"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"type": "function"}]}],
     r"messages\[1\]\.tool_calls\[0\]\.function"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "c"},
      {"role": "assistant", "tool_calls": [_call("f", "{}"), {"function": {"arguments": "{}"}}]}],
     r"messages\[2\]\.tool_calls\[1\]\.function\.name"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [_call("f", 7)]}],
     r"messages\[1\]\.tool_calls\[0\]\.function\.arguments"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "reasoning_content": 1, "content": "a"}],
     r"messages\[1\]\.reasoning_content"),
    ([{"role": "user", "content": "q"}, {"role": "tool", "tool_call_id": 5, "content": "x"}],
     r"messages\[1\]\.tool_call_id"),
    ([{"role": "system", "content": "s", "tools": [{"type": "function", "function": {"description": "d"}}]}],
     r"messages\[0\]\.tools\[0\]\.function\.name"),
]

# Errors specific to the dsv32 format (argument parsing, developer content, pairing results with calls).
BAD_DSV32 = [
    ([{"role": "developer", "content": ""}], r"messages\[0\]\.content"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [_call("f", "{not json")]}],
     r"messages\[1\]\.tool_calls\[0\]\.function\.arguments"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [_call("f", "[1, 2]")]}],
     r"messages\[1\]\.tool_calls\[0\]\.function\.arguments"),
    ([{"role": "tool", "content": "orphan"}], r"messages\[0\]\.role"),
    ([{"role": "user", "content": "q"}, {"role": "tool", "content": "x"}], r"messages\[1\]\.role"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "tool", "content": "x"}],
     r"messages\[2\]\.role"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [_call("f", "{}"), _call("g", "{}")]},
      {"role": "tool", "content": "only one"}], r"messages\[1\]\.tool_calls"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [_call("f", "{}")]},
      {"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}], r"messages\[3\]"),
]


def _assert_path_error(fn, path):
    with pytest.raises(ValueError) as info:
        fn()
    assert isinstance(info.value, MessageFormatError), repr(info.value)
    assert re.match(path + r"(: |$)", str(info.value)), str(info.value)
    assert re.fullmatch(path, info.value.path), info.value.path


@pytest.mark.parametrize("messages,path", BAD_SHAPES)
@pytest.mark.parametrize("encoder", ["dsv32", "v31"])
def test_bad_message_shapes_name_the_field(messages, path, encoder):
    _assert_path_error(lambda: get_chat_encoder(encoder).render(messages, thinking=True), path)


@pytest.mark.parametrize("messages,path", BAD_DSV32)
def test_bad_dsv32_messages_name_the_field(messages, path):
    _assert_path_error(lambda: build_prompt(messages, thinking=False), path)


def test_request_level_tool_path():
    with pytest.raises(ValueError, match=r"^tools\[1\]\.function\.name: "):
        build_prompt([{"role": "user", "content": "u"}], tools=[WEATHER_TOOL, {"type": "function",
                                                                               "function": {"name": ""}}])
    with pytest.raises(ValueError, match=r"^tools\[0\]\.function\.parameters: "):
        build_prompt([{"role": "user", "content": "u"}], tools=[{"function": {"name": "f", "parameters": "x"}}])


# --------------------------------------------------------------------------------------- V3.1 / Exp

def test_v31_systems_hoisted_and_generation_prompt():
    msgs = [{"role": "system", "content": "S1"}, {"role": "user", "content": "hi"},
            {"role": "system", "content": "S2"}]
    assert v31.encode_messages(msgs) == f"{BOS}S1\n\nS2{U}hi{A}</think>"
    assert v31.encode_messages(msgs, thinking=True) == f"{BOS}S1\n\nS2{U}hi{A}<think>"
    assert v31.encode_messages(msgs, add_generation_prompt=False) == f"{BOS}S1\n\nS2{U}hi"


def test_v31_multi_turn_strips_reasoning_from_history():
    msgs = [{"role": "user", "content": "a"},
            {"role": "assistant", "content": "<think>hidden</think>visible", "reasoning_content": "RC"},
            {"role": "user", "content": "b"}]
    assert get_chat_encoder("v31").render(msgs, thinking=True) == \
        f"{BOS}{U}a{A}</think>visible{EOS}{U}b{A}<think>"


def test_v31_tool_calls_and_results():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "w?"},
            {"role": "assistant", "content": None, "tool_calls": [
                _call("get_weather", '{"location":"Paris"}'), _call("get_time", {"tz": "CET"})]},
            {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "noon"}]
    calls = ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"location\":\"Paris\"}"
             "<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{\"tz\": \"CET\"}<｜tool▁call▁end｜>"
             "<｜tool▁calls▁end｜>" + EOS)
    outs = "<｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜><｜tool▁output▁begin｜>noon<｜tool▁output▁end｜>"
    p = v31.encode_messages(msgs, thinking=True)
    assert p == f"{BOS}S{U}w?{A}</think>" + calls + outs  # no generation prompt after tool results
    # The answer after tool results: no assistant marker, content kept verbatim (even with </think>).
    p2 = v31.encode_messages(msgs + [{"role": "assistant", "content": "x</think>It is sunny."},
                                     {"role": "user", "content": "thanks"}])
    assert p2 == p + f"x</think>It is sunny.{EOS}{U}thanks{A}</think>"


def test_v31_assistant_content_before_tool_calls_and_only_system():
    msgs = [{"role": "system", "content": "S"},
            {"role": "assistant", "content": "Let me check.", "tool_calls": [_call("f", "{}")]}]
    assert v31.encode_messages(msgs, add_generation_prompt=False) == \
        f"{BOS}S{A}</think>Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{{}}" \
        f"<｜tool▁call▁end｜><｜tool▁calls▁end｜>{EOS}"


def test_v31_tools_block():
    tools = [{"type": "function", "function": {"name": "f", "description": "Does f.",
                                               "parameters": {"type": "object", "properties": {}}}}]
    p = v31.encode_messages([{"role": "system", "content": "S"}, {"role": "user", "content": "u"}], tools=tools)
    expected_tools = (
        "## Tools\nYou have access to the following tools:\n"
        "\n### f\nDescription: Does f.\n\nParameters: {\"type\": \"object\", \"properties\": {}}\n"
        "\nIMPORTANT: ALWAYS adhere to this exact format for tool use:\n"
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>tool_call_name<｜tool▁sep｜>tool_call_arguments"
        "<｜tool▁call▁end｜>{{additional_tool_calls}}<｜tool▁calls▁end｜>\n\nWhere:\n\n"
        "- `tool_call_name` must be an exact match to one of the available tools\n"
        "- `tool_call_arguments` must be valid JSON that strictly follows the tool's Parameters Schema\n"
        "- For multiple tool calls, chain them directly without separators or spaces\n")
    assert p == f"{BOS}S\n\n{expected_tools}{U}u{A}</think>"


@pytest.mark.parametrize("name", ["v31", "deepseek-v3.1", "exp", "V31"])
def test_v31_aliases(name):
    assert isinstance(get_chat_encoder(name), V31ChatEncoder)


@pytest.mark.parametrize("name", ["dsv32", "deepseek-v3.2"])
def test_dsv32_aliases(name):
    enc = get_chat_encoder(name)
    assert isinstance(enc, DSV32ChatEncoder)
    assert enc.render(EXAMPLE_A, thinking=True) == build_prompt(EXAMPLE_A, thinking=True)


def test_unknown_encoder_name():
    with pytest.raises(ValueError, match="not a built-in encoder"):
        get_chat_encoder("llama3")


# ------------------------------------------------------------------------------------------- Jinja

def _write(tmp_path, text, name="tpl.jinja"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_jinja_template_renders_variables(tmp_path):
    path = _write(tmp_path, (
        "{{ bos_token }}{% for m in messages %}\n"
        "[{{ m.role }}]{{ m.content }}\n"
        "{% endfor %}"
        "{% if tools %}T={{ tools | map(attribute='function.name') | join(',') }}|{{ tools[0] | tojson }}{% endif %}"
        "{% if add_generation_prompt %}<gen think={{ thinking }} enable={{ enable_thinking }} x={{ x }}>{% endif %}"
        "{{ eos_token }}"))
    enc = get_chat_encoder(path)
    assert isinstance(enc, JinjaChatTemplate)
    tools = [{"type": "function", "function": {"name": "f", "description": "é"}}]
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    out = enc.render(msgs, tools=tools, thinking=True, chat_template_kwargs={"x": 7, "thinking": False})
    assert out == (f"{BOS}[user]a\nb\nT=f|" + json.dumps(tools[0], ensure_ascii=False)
                   + f"<gen think=True enable=True x=7>{EOS}")
    assert enc.render(msgs, add_generation_prompt=False) == f"{BOS}[user]a\nb\n{EOS}"
    assert msgs[0]["content"][0] == {"type": "text", "text": "a"}  # input untouched


def test_jinja_template_reproduces_v31_for_a_simple_chat(tmp_path):
    """A one-line V3.1-style template agrees with the built-in v31 encoder."""
    path = _write(tmp_path, (
        "{% set ns = namespace(sp='', last_user=false) %}{% for m in messages %}{% if m.role == 'system' %}"
        "{% set ns.sp = ns.sp + ('\\n\\n' if ns.sp else '') + m.content %}{% endif %}{% endfor %}"
        "{{ bos_token }}{{ ns.sp }}{% for m in messages %}{% if m.role == 'user' %}"
        "{% set ns.last_user = true %}{{ '<｜User｜>' + m.content }}{% elif m.role == 'assistant' %}"
        "{% if ns.last_user %}{{ '<｜Assistant｜></think>' }}{% endif %}{% set ns.last_user = false %}"
        "{{ m.content + eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<｜Assistant｜>' + ('<think>' if thinking else '</think>') }}{% endif %}"))
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    for thinking in (False, True):
        assert get_chat_encoder(path).render(msgs, thinking=thinking) == \
            get_chat_encoder("v31").render(msgs, thinking=thinking)


def test_jinja_syntax_error_names_file_and_line(tmp_path):
    path = _write(tmp_path, "ok\n{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    with pytest.raises(ChatTemplateError) as info:
        get_chat_encoder(path)
    assert str(info.value).startswith(f"chat template {path}, line 3: syntax error")
    assert isinstance(info.value, ValueError)


def test_jinja_render_error_names_file(tmp_path):
    path = _write(tmp_path, "x\n{% if messages[0].role != 'system' %}{{ raise_exception('need a system') }}"
                            "{% endif %}")
    enc = get_chat_encoder(path)
    with pytest.raises(ChatTemplateError, match=r"^chat template .*tpl\.jinja, line 2: .*need a system"):
        enc.render([{"role": "user", "content": "u"}])
    assert enc.render([{"role": "system", "content": "s"}]) == "x\n"


def test_jinja_sandbox_and_reserved_kwargs(tmp_path):
    enc = get_chat_encoder(_write(tmp_path, "{{ ''.__class__.__mro__ }}"))
    with pytest.raises(ChatTemplateError, match="unsafe"):
        enc.render([{"role": "user", "content": "u"}])
    enc = get_chat_encoder(_write(tmp_path, "{% set _ = messages.append(1) %}ok", "m.jinja"))
    with pytest.raises(ChatTemplateError, match="unsafe"):
        enc.render([{"role": "user", "content": "u"}])
    enc = get_chat_encoder(_write(tmp_path, "ok", "ok.jinja"))
    with pytest.raises(ValueError, match=r"^chat_template_kwargs\.messages: "):
        enc.render([{"role": "user", "content": "u"}], chat_template_kwargs={"messages": []})
    with pytest.raises(ValueError, match=r"^messages\[0\]\.role: "):
        enc.render([{"role": "robot", "content": "u"}])


def test_jinja_missing_file(tmp_path):
    path = str(tmp_path / "absent.jinja")
    with pytest.raises(ChatTemplateError, match=r"^chat template .*absent\.jinja: cannot read"):
        get_chat_encoder(path)


# --------------------------------------------------------------------------------------- thinking switch

@pytest.mark.parametrize("kwargs,obj,default,expected", [
    (None, None, False, False),
    (None, None, True, True),
    ({}, None, False, False),
    ({"thinking": True}, None, False, True),
    ({"thinking": False}, None, True, False),
    ({"enable_thinking": True}, None, False, True),
    ({"thinking": None, "enable_thinking": True}, None, False, True),
    (None, {"type": "enabled"}, False, True),
    (None, {"type": "disabled"}, True, False),
    ({"thinking": True}, {"type": "enabled"}, False, True),
    ({"other": 1}, None, False, False),
])
def test_resolve_thinking(kwargs, obj, default, expected):
    assert resolve_thinking(kwargs, obj, default=default) is expected


@pytest.mark.parametrize("kwargs,obj,path", [
    ({"thinking": "yes"}, None, "chat_template_kwargs.thinking"),
    ({"enable_thinking": 1}, None, "chat_template_kwargs.enable_thinking"),
    (None, {"type": "auto"}, "thinking.type"),
    (None, "enabled", "thinking"),
    ({"thinking": True}, {"type": "disabled"}, "chat_template_kwargs.thinking"),
    ({"thinking": True, "enable_thinking": False}, None, "chat_template_kwargs.thinking"),
])
def test_resolve_thinking_errors(kwargs, obj, path):
    with pytest.raises(ValueError) as info:
        resolve_thinking(kwargs, obj)
    assert str(info.value).startswith(path + ": ")
