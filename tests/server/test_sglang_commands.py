"""Every `sglang serve` command line of SGLang's DeepSeek-V3.2 docs (tests/server/data/sglang_v32_commands.txt, 44
lines) given to `dsv32 serve`, with a tiny model and local addresses: each either starts (its configuration checks
out, exactly as `dsv32 serve` checks it before starting any process) or stops with a message that names one of its
flags and says why — never argparse's generic "unrecognized arguments". Two lines are then really served (8 ranks
with DP attention; 8 ranks with EP) and answer a chat request."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys

import pytest

from _tiny import make_mtp_checkpoint

HERE = os.path.dirname(__file__)
COMMANDS = os.path.join(HERE, "data", "sglang_v32_commands.txt")


def _lines() -> list[str]:
    with open(COMMANDS, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny V3.2 that splits over 16 ranks (16 heads, 16 experts, vocab 512), with an MTP layer (as the real
    checkpoints: the lines with --speculative-* start) and the demo tokenizer."""
    from dsv32.core.demo import make_demo_checkpoint

    root = tmp_path_factory.mktemp("sglang-cmds")
    demo = make_demo_checkpoint(str(root / "demo"))
    path = root / "tiny16"
    make_mtp_checkpoint(str(path), seed=5, vocab_size=512, num_attention_heads=16, num_key_value_heads=16,
                    n_routed_experts=16, n_group=4, topk_group=2, intermediate_size=128, moe_intermediate_size=32,
                    max_position_embeddings=163840)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(demo, f), path / f)
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def localize(line: str, model: str, port: int, dist_port: int) -> list[str]:
    """The documented line with the tiny model, local addresses and the doc's shell placeholders filled in."""
    line = line.replace("```", "")
    line = re.sub(r"\$dp_config|\$cp_config", "", line)  # placeholders for flags shown elsewhere in the doc
    for pat in (r"\$MASTER_ADDR:\$MASTER_PORT", r"\$\{HOST\}:\$\{DIST_PORT\}", r"<HEAD_NODE_IP>:\d+",
                r"<PREFILL_HEAD_IP>:\d+"):
        line = re.sub(pat, f"127.0.0.1:{dist_port}", line)
    line = line.replace("$RANK", "0").replace("$LOCAL_IP", "127.0.0.1").replace("$PORT", str(port))
    args = shlex.split(line)
    out = []
    for i, a in enumerate(args):
        prev = args[i - 1] if i else ""
        if prev in ("--model", "--model-path"):
            a = model
        elif prev == "--port":
            a = str(port)
        out.append(a)
    return out


def _check(argv: list[str]) -> str | None:
    """None if `dsv32 serve argv` would start; else its error message (FlagError), as `serve` prints it."""
    import argparse

    from dsv32.server import serve

    p = argparse.ArgumentParser(prog="dsv32 serve", exit_on_error=False)
    serve.add_serve_args(p)
    try:
        args = p.parse_args(argv)
    except (argparse.ArgumentError, SystemExit) as e:  # argparse's own errors: never acceptable here
        raise AssertionError(f"argparse refused {argv}: {e}") from None
    try:
        serve._checked_config(args)
    except serve.FlagError as e:
        return serve.as_flags(e.message)
    return None


def test_every_documented_command_line(model):
    lines = _lines()
    assert len(lines) == 44
    started, refused = [], []
    for line in lines:
        argv = localize(line, model, _free_port(), _free_port())
        msg = _check(argv)
        if msg is None:
            started.append(line)
            continue
        named = [f for f in re.findall(r"--[a-z0-9-]+", msg) if f in argv]
        assert named, f"the refusal names none of the line's flags:\n{line}\n→ {msg}"
        assert "unrecognized" not in msg
        refused.append((line, msg))
    print(f"{len(started)} start, {len(refused)} refused with a reason")
    for line, msg in refused:
        print(f"  {line[:90]}…\n    → {msg.splitlines()[-1][:160]}")
    # what must start: the plain TP / DP-attention / EP lines, with parsers, SGLang's template files, hosts, fp8 KV,
    # context length, --attention-backend nsa, --allow-auto-truncate, --watchdog-timeout, ...
    for must in ("--model deepseek-ai/DeepSeek-V3.2-Exp --tp 8", "--tp 8 --ep 8 --dp 8 --enable-dp-attention",
                 "--kv-cache-dtype fp8_e4m3",
                 "--chat-template ./tool_chat_template_deepseekv32.jinja --tp-size 8 --dp-size 8 --enable-dp-attention --ep",
                 "--tp 8 --speculative-algorithm EAGLE --speculative-num-steps 3 --speculative-eagle-topk 1",
                 "--enable-dp-attention --speculative-algorithm EAGLE"):
        assert any(must in line for line in started), must
    assert len(started) == 28 and len(refused) == 16, (len(started), len(refused))


def test_serving_flags_take_effect(model):
    """The SGLang flags dsv32 implements reach the engine / server configuration."""
    import argparse

    from dsv32.server import serve

    p = argparse.ArgumentParser()
    serve.add_serve_args(p)
    args = p.parse_args(["--model", model, "--max-total-tokens", "1000", "--page-size", "16", "--random-seed", "7",
                         "--max-prefill-tokens", "512", "--watchdog-timeout", "45", "--tokenizer-path", model,
                         "--chat-template", "./examples/chat_template/tool_chat_template_deepseekv31.jinja"])
    config = serve._checked_config(args)
    assert config.cache.num_kv_pages == 63 and config.seed == 7 and config.tokenizer == model
    assert config.scheduler.max_prefill_tokens == 512 and config.parallel.progress_timeout_s == 45
    assert serve._auto_chat_template(args, model) == "v31"
    for bad, flag in ((["--schedule-policy", "lof"], "--schedule-policy"), (["--tokenizer-path", "/nonexistent"],
                      "--tokenizer-path"), (["--grammar-backend", "outlines"], "--grammar-backend"),
                      (["--chat-template", "/nonexistent/t.jinja"], "--chat-template")):
        with pytest.raises(serve.FlagError) as e:
            serve._checked_config(p.parse_args(["--model", model, *bad]))
        assert flag in e.value.message, (bad, e.value.message)
    with pytest.raises(serve.FlagError) as e:
        serve._checked_config(p.parse_args(["--model", "deepseek-ai/DeepSeek-V3.2"]))
    assert "does not download" in e.value.message


def test_unrecognized_flags_say_what_to_do(model):
    """A flag dsv32 does not know at all still gets argparse's error; known SGLang flags never do."""
    with pytest.raises(AssertionError, match="argparse refused"):
        _check(["--model", model, "--no-such-flag"])


@pytest.mark.parametrize("line,warmup", [
    ("--model-path deepseek-ai/DeepSeek-V3.2 --trust-remote-code --tp-size 8 --dp-size 8 --enable-dp-attention "
     "--tool-call-parser deepseekv32 --reasoning-parser deepseek-v3", True),
    ("--model-path deepseek-ai/DeepSeek-V3.2-Exp --tp 8 --ep 8 --dp 8 --enable-dp-attention --host 0.0.0.0 "
     "--port 30000", False),
], ids=["tp8-dp8-parsers", "tp8-ep8-dp8"])
def test_documented_lines_serve(model, line, warmup):
    """Really served: 8 rank processes on the CPU (gloo), a chat request through the OpenAI client; the warm-up
    generation runs before the server is ready unless --skip-server-warmup."""
    import openai

    port = _free_port()
    argv = [a if a != "0.0.0.0" else "127.0.0.1" for a in localize(line, model, port, _free_port())]
    if "--port" not in argv:
        argv += ["--port", str(port)]
    log = open(os.path.join(model, f"serve-{port}.log"), "w")
    extra = ["--dtype", "float32", "--context-length", "256", "--max-total-tokens", "1024", "--page-size", "16",
             "--allow-auto-truncate", "--stream-interval", "3", "--random-seed", "1",
             *([] if warmup else ["--skip-server-warmup"])]
    proc = subprocess.Popen([sys.executable, "-m", "dsv32.server.launch_server", *argv, *extra], stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        import time

        import httpx

        t0 = time.monotonic()
        while time.monotonic() - t0 < 300:
            assert proc.poll() is None, open(log.name).read()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        with open(log.name) as f:
            assert ("warm-up generation done" in f.read()) == warmup
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=120)
        name = client.models.list().data[0].id
        r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                           temperature=0)
        assert r.usage.completion_tokens == 4
        # --allow-auto-truncate: a 400-token prompt keeps its first 255 tokens, max_tokens cut to the 1 that fits
        r = client.completions.create(model=name, prompt=list(range(20, 420)), max_tokens=50, temperature=0)
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (255, 1)
        # --stream-interval 3: the first token alone, then chunks of 3 tokens (the last may be shorter)
        chunks = [c.choices[0].text for c in client.completions.create(
            model=name, prompt=[20, 30, 40], max_tokens=10, temperature=0, stream=True, extra_body={"ignore_eos": True})
            if c.choices]
        whole = client.completions.create(model=name, prompt=[20, 30, 40], max_tokens=10, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].text
        assert "".join(chunks) == whole and len([c for c in chunks if c]) <= 5
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
