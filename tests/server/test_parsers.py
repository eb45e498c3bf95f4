"""Output parsers (dsv32.server.parsers): expected parse results for realistic model outputs, and streaming
that equals parse() for every chunking (whole, per character, per realistic token, every 2-way split, random).
"""
import json
import random
import re

import pytest

from dsv32.server.parsers import (Delta, OutputParser, ReasoningParser, ToolCallDelta, ToolCallParser,
                                  finish_reason)
from dsv32.server.parsers import dsml as dsml_mod
from dsv32.server.parsers import scan
from dsv32.server.parsers import v31 as v31_mod
from dsv32.server.parsers.types import ParsedOutput, ReasoningResult, ToolParseResult

D = "｜DSML｜"
CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
ID_RE = re.compile(r"call_[0-9a-f]{24}\Z")


def _fn(name, props):
    return {"type": "function", "function": {"name": name, "description": name.replace("_", " "),
                                             "parameters": {"type": "object", "properties": props}}}


TOOLS = [
    _fn("get_weather", {"location": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]},
                        "days": {"type": "integer"}, "date": {"type": "string"}}),
    _fn("search", {"query": {"type": "string"}, "filters": {"type": "object"}, "limit": {"type": "integer"},
                   "tags": {"type": "array", "items": {"type": "string"}}}),
    _fn("get_time", {}),
    _fn("write_file", {"path": {"type": "string"}, "content": {"type": "string"}}),
]


def inv(name, *params, d=D):
    return f'<{d}invoke name="{name}">\n' + "\n".join(params) + f"\n</{d}invoke>"


def par(key, value, string=True, d=D):
    flag = "true" if string else "false"
    return f'<{d}parameter name="{key}" string="{flag}">{value}</{d}parameter>'


def inv_sc(name, d=D, space=""):
    """Self-closing invoke tag: a call without parameters."""
    return f'<{d}invoke name="{name}"{space}/>'


def block(*invokes, d=D):
    return f"\n\n<{d}function_calls>\n" + "\n".join(invokes) + f"\n</{d}function_calls>"


def upto(text, sub):
    """`text` cut right after the first `sub` (a generation stopped by max_tokens)."""
    return text[:text.index(sub) + len(sub)]


def args(**kw):
    return json.dumps(kw, ensure_ascii=False)


# -- chunkings ---------------------------------------------------------------------------------------------
# a detokenizer-like split: special tokens whole (｜DSML｜ alone, so `<` and `invoke` are separate pieces as in
# DeepSeek's BPE), whitespace runs, words in pieces of up to 3 letters, every other character alone
TOKEN_RE = re.compile(r"｜DSML｜|<｜[^｜<>]{1,40}｜>|</?think>|\s+|[A-Za-z]{1,3}|\d|[^\sA-Za-z\d]")


def token_chunks(text):
    pieces = TOKEN_RE.findall(text)
    assert "".join(pieces) == text
    return pieces


def random_chunks(text, seed):
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(text):
        n = rng.randint(1, 9)
        out.append(text[i:i + n])
        i += n
    return out


def chunkings(text, exhaustive_splits=True):
    yield "whole", [text]
    yield "chars", list(text)
    yield "tokens", token_chunks(text)
    for seed in range(5):
        yield f"random{seed}", random_chunks(text, seed)
    if exhaustive_splits:
        for i in range(1, len(text)):
            yield f"split{i}", [text[:i], text[i:]]


def run(parser, chunks):
    deltas = []
    for c in chunks:
        out = parser.feed(c)
        assert isinstance(out, list)
        deltas += out
    deltas += parser.finish()
    return deltas


def summarize(deltas):
    """(content, reasoning or None, [(name, arguments)]) from deltas, checking each delta's shape."""
    content, reasoning, calls = [], [], []
    for d in deltas:
        assert isinstance(d, Delta)
        assert [d.content is not None, d.reasoning_content is not None, d.tool_call is not None].count(True) == 1
        if d.content is not None:
            assert d.content != ""
            content.append(d.content)
        elif d.reasoning_content is not None:
            assert d.reasoning_content != ""
            reasoning.append(d.reasoning_content)
        else:
            tc = d.tool_call
            if tc.index == len(calls):  # first delta of a new call: id, type, name, empty arguments
                assert ID_RE.match(tc.id) and tc.type == "function" and tc.name and tc.arguments == ""
                calls.append([tc.name, []])
            else:
                assert tc.index == len(calls) - 1, "deltas of an earlier call after a later one started"
                assert tc.id is None and tc.type is None and tc.name is None and tc.arguments != ""
                calls[tc.index][1].append(tc.arguments)
    return "".join(content), ("".join(reasoning) or None), [(n, "".join(a)) for n, a in calls]


def normalize(result):
    if isinstance(result, ToolParseResult):
        return result.content, None, [(c.name, c.arguments_json) for c in result.tool_calls]
    if isinstance(result, ReasoningResult):
        return result.content, result.reasoning_content, []
    assert isinstance(result, ParsedOutput)
    return result.content, result.reasoning_content, [(c.name, c.arguments_json) for c in result.tool_calls]


def check_all_chunkings(make, text, expected, exhaustive_splits=True):
    parsed = normalize(make().parse(text))
    assert parsed == expected
    for label, chunks in chunkings(text, exhaustive_splits):
        assert "".join(chunks) == text
        parser = make()
        streamed = summarize(run(parser, chunks))
        assert streamed == parsed, f"chunking {label}: {chunks!r}"
        assert normalize(parser.result()) == parsed, label


# -- cases -------------------------------------------------------------------------------------------------
def v32(tools=TOOLS, **kw):
    return lambda: ToolCallParser("deepseekv32", tools=tools, **kw)


def v31(tools=TOOLS, **kw):
    return lambda: ToolCallParser("deepseekv31", tools=tools, **kw)


def think(thinking=True):
    return lambda: ReasoningParser("deepseek-v3", thinking=thinking)


def full(thinking=True, tool_parser="deepseekv32", tools=TOOLS, **kw):
    return lambda: OutputParser(reasoning=ReasoningParser("deepseek-v3", thinking=thinking),
                                tools=ToolCallParser(tool_parser, tools=tools, **kw))


NESTED_QUERY = 'weather "Paris"\nnext\tweek \\ C:\\tmp 多云 ☁ </b> a<b'
TAG_NAME = "f" * (scan.MAX_TAG_CHARS - len(f'<{D}invoke name="">'))  # open tag exactly MAX_TAG_CHARS long
UNKNOWN_INVOKE = inv("launch_rockets", par("count", "3", False))
C1 = ("The user wants a 2-day forecast for Paris. I should call get_weather.</think>\n\n"
      f"<{D}function_calls>\n<{D}invoke name=\"get_weather\">\n"
      f"<{D}parameter name=\"location\" string=\"true\">Paris</{D}parameter>\n"
      f"<{D}parameter name=\"days\" string=\"false\">2</{D}parameter>\n</{D}invoke>\n</{D}function_calls>")
TWO = block(inv("get_weather", par("location", "Hangzhou"), par("date", "2024-01-16")),
            inv("get_weather", par("location", "Beijing"), par("date", "2024-01-16")))
TWO_CALLS = [("get_weather", args(location="Hangzhou", date="2024-01-16")),
             ("get_weather", args(location="Beijing", date="2024-01-16"))]

CASES = {
    # --- deepseekv32 (DSML) ---
    "dsml_plain_text": (v32(), "Hello! How can I help you today?\n", ("Hello! How can I help you today?\n", None, [])),
    "dsml_plain_trailing_ws": (v32(), "Answer: 4  \n\n", ("Answer: 4  \n\n", None, [])),
    "dsml_one_call": (v32(), "Let me check the weather." + block(inv("get_weather", par("location", "Paris"),
                                                                       par("days", "2", False))),
                      ("Let me check the weather.", None, [("get_weather", '{"location": "Paris", "days": 2}')])),
    "dsml_two_calls": (v32(), TWO, ("", None, TWO_CALLS)),
    "dsml_nested_values": (
        v32(), "Searching." + block(inv("search", par("query", NESTED_QUERY),
                                        par("filters", '{"lang": "en", "range": {"from": 2020, "to": 2024}}', False),
                                        par("limit", "5", False), par("tags", '["a","b"]', False))),
        ("Searching.", None, [("search", args(query=NESTED_QUERY, filters={"lang": "en", "range": {"from": 2020, "to": 2024}},
                                                limit=5, tags=["a", "b"]))])),
    "dsml_no_params": (v32(), block(inv("get_time")), ("", None, [("get_time", "{}")])),
    "dsml_degraded_form": (v32(), "Checking." + block(inv("get_weather", par("location", "Oslo", d=""),
                                                              par("days", "1", False, d=""), d=""), d=""),
                           ("Checking.", None, [("get_weather", args(location="Oslo", days=1))])),
    "dsml_mixed_tags": (v32(), f'\n\n<{D}function_calls>\n<invoke name="get_weather">\n'
                               f'<{D}parameter name="location" string="true">Paris</parameter>\n</{D}invoke>\n</function_calls>',
                        ("", None, [("get_weather", args(location="Paris"))])),
    "dsml_attr_whitespace_order": (v32(), f'\n\n<{D}function_calls>\n<{D}invoke  name = "get_weather" >\n'
                                          f'<{D}parameter string="false" name="days">3</{D}parameter>\n</{D}invoke>\n</{D}function_calls>',
                                   ("", None, [("get_weather", args(days=3))])),
    "dsml_false_not_json": (v32(), block(inv("get_weather", par("location", "Paris", False)),
                                         inv("search", par("tags", "[1, 2", False))),
                            ("", None, [("get_weather", args(location="Paris")), ("search", args(tags="[1, 2"))])),
    "dsml_schema_coercion": (v32(), block(inv("get_weather", par("days", "3"), par("location", "123", False),
                                              par("unit", "c"))),
                             ("", None, [("get_weather", args(days=3, location="123", unit="c"))])),
    "dsml_no_schema_keeps_flags": (v32(tools=None), block(inv("get_weather", par("days", "3"), par("n", "123", False))),
                                   ("", None, [("get_weather", args(days="3", n=123))])),
    "dsml_missing_string_attr": (v32(), block(f'<{D}invoke name="get_weather">\n<{D}parameter name="days">4</{D}parameter>\n'
                                              f'<{D}parameter name="location">Rome</{D}parameter>\n</{D}invoke>'),
                                 ("", None, [("get_weather", args(days=4, location="Rome"))])),
    "dsml_self_closing": (v32(), block(inv_sc("get_time")), ("", None, [("get_time", "{}")])),
    "dsml_self_closing_space": (v32(), "Time?" + block(inv_sc("get_time", space=" ")) + "\n\nOk.",
                                ("Time?\n\nOk.", None, [("get_time", "{}")])),
    "dsml_self_closing_degraded": (v32(), block(inv_sc("get_time", d=""), d=""), ("", None, [("get_time", "{}")])),
    "dsml_self_closing_then_normal": (v32(), block(inv_sc("get_time"), inv("get_weather", par("location", "Paris"))),
                                      ("", None, [("get_time", "{}"), ("get_weather", args(location="Paris"))])),
    "dsml_normal_then_self_closing": (v32(), block(inv("get_weather", par("location", "Paris")),
                                                   inv_sc("get_time", d=""), inv_sc("get_time", space="  ")),
                                      ("", None, [("get_weather", args(location="Paris")), ("get_time", "{}"),
                                                  ("get_time", "{}")])),
    "dsml_self_closing_after_missing_close": (v32(), (f'\n\n<{D}function_calls>\n<{D}invoke name="get_weather">\n'
                                                      f'<{D}parameter name="days" string="false">2\n'
                                                      f'{inv_sc("get_time")}\n</{D}function_calls>'),
                                              ("", None, [("get_weather", args(days=2)), ("get_time", "{}")])),
    "dsml_self_closing_parallel_off": (v32(parallel_tool_calls=False), block(inv_sc("get_time"), inv("get_time")),
                                       ("", None, [("get_time", "{}")])),
    "dsml_self_closing_unknown": (v32(), "Ok." + block(inv_sc("launch_rockets"), inv("get_time")),
                                  ("Ok." + inv_sc("launch_rockets"), None, [("get_time", "{}")])),
    "dsml_self_closing_unknown_degraded": (v32(), "Ok." + block(inv_sc("nope", d=""), inv_sc("get_time", d=""), d=""),
                                           ("Ok." + inv_sc("nope", d=""), None, [("get_time", "{}")])),
    "dsml_self_closing_unknown_accepted_without_tools": (v32(tools=None), block(inv_sc("launch_rockets")),
                                                         ("", None, [("launch_rockets", "{}")])),
    "dsml_self_closing_truncated": (v32(), upto(block(inv("get_time"), inv_sc("get_time")), 'get_time"/'),
                                    ("", None, [("get_time", "{}")])),
    "dsml_json_body": (v32(), block(f'<{D}invoke name="get_weather">\n{{"location": "Oslo", "days":1}}\n</{D}invoke>'),
                       ("", None, [("get_weather", args(location="Oslo", days=1))])),
    "dsml_json_body_invalid": (v32(), "Text." + block(f'<{D}invoke name="get_weather">\n{{"location": Oslo}}\n</{D}invoke>'),
                               ('Text.{"location": Oslo}\n', None, [("get_weather", "{}")])),
    "dsml_value_with_lt": (v32(), block(inv("write_file", par("path", "a.html"),
                                            par("content", "<b>x</b> if a < b </para </parameter x"))),
                           ("", None, [("write_file", args(path="a.html", content="<b>x</b> if a < b </para </parameter x"))])),
    "dsml_text_after_block": (v32(), "Calling." + block(inv("get_time")) + "\n\nDone.\n",
                              ("Calling.\n\nDone.\n", None, [("get_time", "{}")])),
    "dsml_ws_after_block_dropped": (v32(), "Calling." + block(inv("get_time")) + "\n\n",
                                    ("Calling.", None, [("get_time", "{}")])),
    "dsml_missing_close_tags": (v32(), f'\n\n<{D}function_calls>\n<{D}invoke name="get_weather">\n'
                                       f'<{D}parameter name="location" string="true">Paris\n'
                                       f'<{D}parameter name="days" string="false">2\n<{D}invoke name="get_time">\n'
                                       f'</{D}function_calls>',
                                ("", None, [("get_weather", args(location="Paris\n", days=2)), ("get_time", "{}")])),
    "dsml_garbage_in_invoke": (v32(), "Ok." + block(inv("get_weather", par("location", "Paris"), "hmm, also",
                                                          par("days", "2", False))),
                               ("Ok.hmm, also\n", None, [("get_weather", args(location="Paris", days=2))])),
    "dsml_unknown_function": (v32(), "Ok." + block(UNKNOWN_INVOKE, inv("get_time")),
                              ("Ok." + UNKNOWN_INVOKE, None, [("get_time", "{}")])),
    "dsml_unknown_accepted_without_tools": (v32(tools=None), block(UNKNOWN_INVOKE),
                                            ("", None, [("launch_rockets", args(count=3))])),
    "dsml_unterminated_string_value": (v32(), upto("Sure." + block(inv("get_weather", par("location", "San Francisco"))),
                                                   "San Fran"),
                                       ("Sure.", None, [("get_weather", args(location="San Fran"))])),
    "dsml_unterminated_partial_end_tag": (v32(), upto(block(inv("get_weather", par("location", "Paris"))), f"</{D}para"),
                                          ("", None, [("get_weather", args(location="Paris"))])),
    "dsml_unterminated_nonstring": (v32(), upto(block(inv("get_weather", par("days", "12", False))), ">1"),
                                    ("", None, [("get_weather", args(days=1))])),
    "dsml_unterminated_in_tag": (v32(), upto(block(inv("get_weather", par("location", "Paris"))), f"</{D}parameter>")
                                 + f'\n<{D}parameter name="da',
                                 ("", None, [("get_weather", args(location="Paris"))])),
    "dsml_parallel_off": (v32(parallel_tool_calls=False), TWO, ("", None, TWO_CALLS[:1])),
    "dsml_required_and_named_parse_alike": (v32(tool_choice="required"), TWO, ("", None, TWO_CALLS)),
    "dsml_named_choice": (v32(tool_choice={"type": "function", "function": {"name": "get_weather"}}), TWO,
                          ("", None, TWO_CALLS)),
    # failures: nothing is lost
    "dsml_prose_marker": (v32(), "Wrap calls in <function_calls> tags, then </function_calls>.",
                          ("Wrap calls in <function_calls> tags, then </function_calls>.", None, [])),
    "dsml_block_then_prose": (v32(), f"Answer.\n\n<{D}function_calls>\nI changed my mind.",
                              (f"Answer.\n\n<{D}function_calls>\nI changed my mind.", None, [])),
    "dsml_truncated_before_invoke": (v32(), f'Sure.\n\n<{D}function_calls>\n<{D}invoke name="get_wea',
                                     (f'Sure.\n\n<{D}function_calls>\n<{D}invoke name="get_wea', None, [])),
    "dsml_marker_only": (v32(), f"x\n\n<{D}function_calls>", (f"x\n\n<{D}function_calls>", None, [])),
    "dsml_bad_invoke_tag": (v32(), f'\n\n<{D}function_calls>\n<{D}invoke nam="f">\n</{D}invoke>',
                            (f'\n\n<{D}function_calls>\n<{D}invoke nam="f">\n</{D}invoke>', None, [])),
    "dsml_choice_none": (v32(tool_choice="none"), "A." + TWO, ("A." + TWO, None, [])),
    # --- deepseekv31 (V3.2-Exp) ---
    "v31_one_call": (v31(), f'Let me look.{CALLS_BEGIN}{CALL_BEGIN}get_weather{SEP}{{"location": "Paris", "days": 2}}'
                            f"{CALL_END}{CALLS_END}",
                     ("Let me look.", None, [("get_weather", '{"location": "Paris", "days": 2}')])),
    "v31_two_calls": (v31(), f'{CALLS_BEGIN}{CALL_BEGIN}get_weather{SEP}{{"location": "Hangzhou"}}{CALL_END}'
                             f'{CALL_BEGIN}get_weather{SEP}{{"location": "Beijing"}}{CALL_END}{CALLS_END}',
                      ("", None, [("get_weather", '{"location": "Hangzhou"}'), ("get_weather", '{"location": "Beijing"}')])),
    "v31_invalid_json_kept_raw": (v31(), f'{CALLS_BEGIN}{CALL_BEGIN}get_weather{SEP}{{"location": Paris}}{CALL_END}{CALLS_END}',
                                  ("", None, [("get_weather", '{"location": Paris}')])),
    "v31_unterminated": (v31(), f'Hi.\n{CALLS_BEGIN}{CALL_BEGIN}get_weather{SEP}{{"location": "Par',
                         ("Hi.", None, [("get_weather", '{"location": "Par')])),
    "v31_unknown_function": (v31(), f"{CALLS_BEGIN}{CALL_BEGIN}launch{SEP}{{}}{CALL_END}{CALL_BEGIN}get_time{SEP}{{}}"
                                    f"{CALL_END}{CALLS_END}",
                             (f"{CALL_BEGIN}launch{SEP}{{}}{CALL_END}", None, [("get_time", "{}")])),
    "v31_prose_after_begin": (v31(), f"x {CALLS_BEGIN} not a call", (f"x {CALLS_BEGIN} not a call", None, [])),
    "v31_truncated_in_name": (v31(), f"x{CALLS_BEGIN}{CALL_BEGIN}get_wea", (f"x{CALLS_BEGIN}{CALL_BEGIN}get_wea", None, [])),
    "v31_no_outer_begin": (v31(), f'{CALL_BEGIN}get_time{SEP}{{"tz": "UTC"}}{CALL_END}',
                           ("", None, [("get_time", '{"tz": "UTC"}')])),
    "v31_args_whitespace_and_empty": (v31(tools=None), f'{CALLS_BEGIN}{CALL_BEGIN}f{SEP}\n {{"a": 1}} \n{CALL_END}'
                                                      f"{CALL_BEGIN}g{SEP}{CALL_END}{CALLS_END}",
                                      ("", None, [("f", '{"a": 1}'), ("g", "{}")])),
    # length caps (a name/tag may fill the window exactly; one more character and it is not a call)
    "v31_name_at_length_limit": (v31(tools=None), f"{CALL_BEGIN}{'n' * 256}{SEP}{{}}{CALL_END}",
                                 ("", None, [("n" * 256, "{}")])),
    "v31_name_over_length_limit": (v31(tools=None), f"{CALL_BEGIN}{'n' * 257}{SEP}{{}}{CALL_END}",
                                   (f"{CALL_BEGIN}{'n' * 257}{SEP}{{}}{CALL_END}", None, [])),
    "dsml_tag_at_length_limit": (v32(tools=None), block(inv(TAG_NAME)), ("", None, [(TAG_NAME, "{}")])),
    "dsml_tag_over_length_limit": (v32(tools=None), block(inv(TAG_NAME + "f")), (block(inv(TAG_NAME + "f")), None, [])),
    "v31_choice_none": (v31(tool_choice="none"), f"{CALLS_BEGIN}{CALL_BEGIN}f{SEP}{{}}{CALL_END}{CALLS_END}",
                        (f"{CALLS_BEGIN}{CALL_BEGIN}f{SEP}{{}}{CALL_END}{CALLS_END}", None, [])),
    # --- reasoning parser deepseek-v3 ---
    "think_answer": (think(), "Let me think: 1+1=2.</think>The answer is 2.",
                     ("The answer is 2.", "Let me think: 1+1=2.", [])),
    "think_content_unstripped": (think(), "hmm\n</think>\n\nAnswer\n", ("\n\nAnswer\n", "hmm\n", [])),
    "think_leading_think_tag": (think(), "<think>hmm</think>ok", ("ok", "hmm", [])),
    "think_truncated": (think(), "still thinking about <thi", ("", "still thinking about <thi", [])),
    "think_partial_end_at_eof": (think(), "almost</thi", ("", "almost</thi", [])),
    "think_empty_reasoning": (think(), "</think>Hi", ("Hi", None, [])),
    "think_second_marker_is_content": (think(), "a</think>b</think><think>c", ("b</think><think>c", "a", [])),
    "think_not_a_start_tag": (think(), "<thinking>x</think>y", ("y", "<thinking>x", [])),
    "think_off_plain": (think(False), "Hello <think>there</think>", ("Hello <think>there</think>", None, [])),
    "think_off_stray_end": (think(False), "</think>Hello", ("Hello", None, [])),
    "think_off_partial_prefix": (think(False), "</thi", ("</thi", None, [])),
    # --- combined (server path) ---
    "full_worked_example_b": (full(), C1, ("", "The user wants a 2-day forecast for Paris. I should call get_weather.",
                                           [("get_weather", '{"location": "Paris", "days": 2}')])),
    "full_think_answer": (full(), "Easy.</think>It is 4.", ("It is 4.", "Easy.", [])),
    "full_implicit_end": (full(), "I will call it." + block(inv("get_time")),
                          ("", "I will call it.\n\n", [("get_time", "{}")])),
    "full_plain_marker_in_reasoning": (full(), "use <function_calls> here</think>ok",
                                       ("ok", "use <function_calls> here", [])),
    "full_chat_mode": (full(False), "Sure thing." + TWO, ("Sure thing.", None, TWO_CALLS)),
    "full_v31": (full(tool_parser="deepseekv31"), f"hmm</think>Ok{CALLS_BEGIN}{CALL_BEGIN}get_time{SEP}{{}}{CALL_END}{CALLS_END}",
                 ("Ok", "hmm", [("get_time", "{}")])),
    "full_v31_implicit_end": (full(tool_parser="deepseekv31"), f"hmm{CALLS_BEGIN}{CALL_BEGIN}get_time{SEP}{{}}{CALL_END}",
                              ("", "hmm", [("get_time", "{}")])),
    # tool_choice="none": no block parsing, so the marker does not end reasoning either
    "full_choice_none_keeps_reasoning": (full(tool_choice="none"), "r" + block(inv("get_time")),
                                         ("", "r" + block(inv("get_time")), [])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parse_and_every_chunking_agree(case):
    make, text, expected = CASES[case]
    check_all_chunkings(make, text, expected)


# -- true incremental streaming -----------------------------------------------------------------------------
def _stream_prefix(make, text):
    p = make()
    return p, summarize(p.feed(text))


def test_dsml_streams_name_then_string_value_as_it_arrives():
    cut = C1.index(">Paris") + 4  # inside the string value "Par|is"
    p, (content, reasoning, calls) = _stream_prefix(full(), C1[:cut])
    assert reasoning.startswith("The user wants") and calls == [("get_weather", '{"location": "Par')]
    more = p.feed(C1[cut:C1.index(f"</{D}invoke>")])
    assert "".join(d.tool_call.arguments for d in more) == 'is", "days": 2'
    deltas = run(full()(), list(C1))
    kinds = [d.tool_call for d in deltas if d.tool_call is not None]
    assert kinds[0].name == "get_weather" and len(kinds) >= 5
    assert all(k.name is None for k in kinds[1:])


def test_dsml_argument_fragments_before_invoke_close():
    text = block(inv("get_weather", par("location", "Paris"), par("days", "2", False), par("unit", "c")))
    before_close = text.index(f"</{D}invoke>")
    p = v32()()
    streamed = summarize(p.feed(text[:before_close]))
    assert streamed[2] == [("get_weather", '{"location": "Paris", "days": 2, "unit": "c"')]
    rest = p.feed(text[before_close:]) + p.finish()
    assert [(d.tool_call.name, d.tool_call.arguments) for d in rest] == [(None, "}")]
    assert p.result().tool_calls[0].arguments_json == '{"location": "Paris", "days": 2, "unit": "c"}'


def test_dsml_self_closing_invoke_streams_name_then_empty_object():
    text = block(inv_sc("get_time"), inv("get_weather", par("location", "Paris")))
    tag_end = text.index("/>") + 2
    p = v32()()
    assert summarize(p.feed(text[:tag_end - 1])) == ("", None, [])  # `.../` is not a complete tag yet
    more = p.feed(text[tag_end - 1:tag_end])
    assert [(d.tool_call.index, d.tool_call.name, d.tool_call.arguments) for d in more] == [
        (0, "get_time", ""), (0, None, "{}")]
    for label, chunks in chunkings(text, exhaustive_splits=True):
        deltas = run(v32()(), chunks)
        fragments = [d.tool_call.arguments for d in deltas if d.tool_call is not None and d.tool_call.index == 0]
        assert fragments == ["", "{}"], label  # the name-carrying delta, then exactly "{}"


def test_nonstring_value_waits_for_its_end_tag():
    text = block(inv("search", par("filters", '{"a": [1, 2]}', False)))
    p = v32()()
    streamed = summarize(p.feed(text[:text.index("2]}") + 1]))
    assert streamed[2] == [("search", '{"filters": ')]


@pytest.mark.parametrize("case", sorted(k for k, v in CASES.items() if v[2][2]))
def test_name_is_emitted_before_the_last_argument_fragment(case):
    make, text, _ = CASES[case]
    for label, chunks in [("chars", list(text)), ("tokens", token_chunks(text))]:
        last_fragment_pos, first_pos = {}, {}
        position = 0
        p = make()
        for c in chunks + [None]:
            deltas = p.feed(c) if c is not None else p.finish()
            for d in deltas:
                if d.tool_call is not None:
                    tc = d.tool_call
                    if tc.name is not None:
                        first_pos[tc.index] = position
                    else:
                        assert tc.index in first_pos, label
                        last_fragment_pos[tc.index] = position
                position += 1
        for idx, pos in last_fragment_pos.items():
            assert first_pos[idx] < pos, (label, idx)


def test_v31_arguments_stream_as_they_grow():
    text = f'{CALLS_BEGIN}{CALL_BEGIN}get_weather{SEP}{{"location": "Paris", "days": 2}}{CALL_END}{CALLS_END}'
    p = v31()()
    assert summarize(p.feed(text[:text.index(SEP)]))[2] == []  # the name is not known before the separator
    assert summarize(p.feed(SEP))[2] == [("get_weather", "")]
    more = p.feed('{"location": "Par')
    assert [(d.tool_call.index, d.tool_call.name, d.tool_call.arguments) for d in more] == [(0, None, '{"location": "Par')]
    p2 = v31()()
    got = summarize(p2.feed(text[:text.index("Paris") + 3]))
    assert got[2] == [("get_weather", '{"location": "Par')]


def test_reasoning_never_emits_part_of_end_marker():
    p = think()()
    out = []
    for ch in "abc</think>def":
        out += p.feed(ch)
        assert all("<" not in (d.reasoning_content or "") for d in out)
    assert summarize(out + p.finish()) == ("def", "abc", [])


def test_in_reasoning_flag_flips_at_end_marker():
    p = think()()
    p.feed("abc</thi")
    assert p.in_reasoning
    p.feed("nk>x")
    assert not p.in_reasoning
    assert not think(False)().in_reasoning


# -- no text lost ----------------------------------------------------------------------------------------------
FAILURE_TEXTS = [
    "Wrap calls in <function_calls> tags.",
    f"A\n\n<{D}function_calls>\n",
    f"A\n\n<{D}function_calls>\n<{D}invoke>\n",
    f"A\n\n<{D}function_calls><{D}function_calls>",
    f'\n\n<{D}function_calls>\n<{D}invoke name="">x</{D}invoke>',
    "<function_calls><invoked>",
    f"{CALLS_BEGIN}",
    f"{CALLS_BEGIN}{CALL_BEGIN}{CALL_END}",
    f"{CALLS_BEGIN}{CALL_BEGIN}{SEP}{{}}{CALL_END}",
    f"x{CALL_BEGIN}{'n' * 300}{SEP}{{}}",
]


@pytest.mark.parametrize("text", FAILURE_TEXTS)
def test_failed_blocks_come_back_as_content(text):
    name = "deepseekv31" if "tool" in text else "deepseekv32"
    make = lambda: ToolCallParser(name, tools=TOOLS)  # noqa: E731
    check_all_chunkings(make, text, (text, None, []), exhaustive_splits=True)


# -- fuzz: random mixtures of markers and text --------------------------------------------------------------------
DSML_FRAGS = [f"<{D}function_calls>", "<function_calls>", f"</{D}function_calls>", f'<{D}invoke name="get_weather">',
              '<invoke name="search">', f'<{D}invoke name="nope">', f"</{D}invoke>", "</invoke>",
              f'<{D}invoke name="get_time"/>', '<invoke name="nope" />',
              f'<{D}parameter name="location" string="true">', f'<{D}parameter name="days" string="false">',
              '<parameter name="tags" string="false">', f'<{D}parameter name="x">', f"</{D}parameter>", "</parameter>",
              "<", ">", "</", '"', "{", "}", "[1, 2]", '{"k": "v"}', "2", "Paris", "hello world", "\n", "\n\n", " ",
              D, "<invoke", "</think>", "<think>", "多云", "\\", "\t"]
V31_FRAGS = [CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP, "get_weather", "nope", '{"a": 1}', "{", "}", '"',
             "<", "<｜", "text", " ", "\n", "</think>"]


def _random_text(rng, frags):
    return "".join(rng.choice(frags) for _ in range(rng.randint(0, 24)))


@pytest.mark.parametrize("name,frags", [("deepseekv32", DSML_FRAGS), ("deepseekv31", V31_FRAGS)])
def test_fuzz_stream_equals_parse(name, frags):
    rng = random.Random(1234)
    for i in range(400):
        text = _random_text(rng, frags)
        kwargs = dict(tools=TOOLS if i % 2 else None, parallel_tool_calls=bool(i % 3))
        make = lambda: ToolCallParser(name, **kwargs)  # noqa: E731
        expected = normalize(make().parse(text))
        for label, chunks in [("chars", list(text)), ("r", random_chunks(text, i)), ("t", token_chunks(text))]:
            assert summarize(run(make(), chunks)) == expected, (text, label)
        content, _, calls = expected
        if name == "deepseekv32":
            for _, a in calls:  # DSML arguments are built by the parser: always a JSON object
                assert isinstance(json.loads(a), dict), (text, a)
            if "invoke" not in text:
                assert content == text and calls == []
        elif SEP not in text:
            assert content == text and calls == []


def test_fuzz_reasoning_reconstructs_text():
    rng = random.Random(7)
    frags = ["<think>", "</think>", "<thi", "</th", "<", "/", "ink>", "a", "b c", "\n", f"<{D}function_calls>"]
    for i in range(400):
        text = _random_text(rng, frags)
        thinking = bool(i % 2)
        make = lambda: ReasoningParser("deepseek-v3", thinking=thinking)  # noqa: E731
        r = make().parse(text)
        for chunks in (list(text), random_chunks(text, i)):
            assert summarize(run(make(), chunks)) == (r.content, r.reasoning_content, [])
        reasoning = r.reasoning_content or ""
        if thinking:
            body = text[len("<think>"):] if text.startswith("<think>") else text
            assert body == reasoning + ("</think>" + r.content if "</think>" in body else r.content)
        else:
            assert reasoning == "" and (text == r.content or text == "</think>" + r.content)


def test_marker_sets_have_no_inner_markers():
    """find_first/partial_suffix_len rely on no marker occurring inside another except as a prefix."""
    from dsv32.server.parsers import reasoning as reasoning_mod
    sets = list(dsml_mod.MARKER_SETS) + list(v31_mod.MARKER_SETS)
    sets.append((reasoning_mod.THINK_END, dsml_mod.BLOCK_OPEN[0], v31_mod.CALLS_BEGIN))
    for markers in sets:
        for a in markers:
            for b in markers:
                if a != b:
                    pos = b.find(a)
                    assert pos in (-1, 0), (a, b)


# -- API surface -----------------------------------------------------------------------------------------------------
def test_unknown_parser_names_list_valid_ones():
    with pytest.raises(ValueError, match="deepseekv32.*deepseekv31"):
        ToolCallParser("hermes")
    with pytest.raises(ValueError, match="deepseek-v3"):
        ReasoningParser("qwen3")
    with pytest.raises(ValueError, match="tool_choice"):
        ToolCallParser("deepseekv32", tools=TOOLS, tool_choice="sometimes")


def test_constructors_and_ids():
    p = ToolCallParser("deepseekv32", tools=TOOLS)
    deltas = run(p, [TWO])
    firsts = [d.tool_call for d in deltas if d.tool_call is not None and d.tool_call.name]
    result = p.result()
    assert [c.id for c in result.tool_calls] == [f.id for f in firsts]
    assert len({c.id for c in result.tool_calls}) == 2 and all(ID_RE.match(c.id) for c in result.tool_calls)
    assert [c.index for c in result.tool_calls] == [0, 1]
    assert result.tool_calls[1].to_openai() == {"id": firsts[1].id, "index": 1, "type": "function",
                                                "function": {"name": "get_weather", "arguments": TWO_CALLS[1][1]}}
    assert firsts[0].to_openai() == {"index": 0, "id": firsts[0].id, "type": "function",
                                     "function": {"name": "get_weather", "arguments": ""}}
    assert ToolCallDelta(index=1, arguments="x").to_openai() == {"index": 1, "function": {"arguments": "x"}}
    with pytest.raises(RuntimeError):
        p.feed("more")
    assert ReasoningParser("deepseek-v3", thinking=True).thinking is True


def test_parse_does_not_disturb_streaming_state():
    p = ToolCallParser("deepseekv32", tools=TOOLS)
    first = p.feed("Hello")
    assert normalize(p.parse(TWO))[2] == TWO_CALLS
    assert summarize(first + p.feed(" there") + p.finish()) == ("Hello there", None, [])


def test_finish_reason():
    with_calls = ToolCallParser("deepseekv32", tools=TOOLS).parse(TWO)
    without = ToolCallParser("deepseekv32", tools=TOOLS).parse("hi")
    assert finish_reason("stop", with_calls) == "tool_calls"
    assert finish_reason("stop", without) == "stop"
    assert finish_reason("length", with_calls) == "length"  # a cut-off call is not presented as complete
    assert finish_reason("abort", with_calls) == "abort"
    assert finish_reason("stop", full()().parse(C1)) == "tool_calls"
    assert finish_reason("stop", []) == "stop" and finish_reason(None, True) == "tool_calls"


def test_output_parser_without_parts_passes_text_through():
    p = OutputParser()
    assert summarize(run(p, ["a", "b</think>"])) == ("ab</think>", None, [])
    q = OutputParser(reasoning=ReasoningParser("deepseek-v3", thinking=True))
    assert normalize(q.parse(C1))[:2] == (C1.split("</think>", 1)[1], C1.split("</think>", 1)[0])


def test_tool_calls_only_from_content_not_reasoning():
    # a DSML-less block inside reasoning is reasoning text (only the special-token marker ends reasoning)
    text = "plan: " + block(inv("get_time", d=""), d="") + "</think>done"
    assert normalize(full()().parse(text)) == ("done", "plan: " + block(inv("get_time", d=""), d=""), [])
