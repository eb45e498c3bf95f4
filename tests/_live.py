"""Helpers for tests that run `dsv32 serve` as a real process: the Server wrapper (start, wait for /health, stop,
read /metrics), the tiny served checkpoint (transformers-made, vocab 512, with the demo tokenizer), prompts and a
greedy completion through the official openai client."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time

import httpx
import openai
from _tiny import make_checkpoint

GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}
http = httpx.Client(timeout=120)  # CPU CI is slow and shared: generous timeouts, never a flaky failure


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str | None, *flags: str, api_key: str | None = None, log_dir: str | None = None):
        """model None: `dsv32 serve` without --model (the built-in demo; log_dir then names where the log goes)."""
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "dsv32.server.launch_server", *(["--model", model] if model else []),
               "--port", str(self.port), "--dtype", "float32", "--served-model-name", "tiny", *flags,
               *(["--api-key", api_key] if api_key else [])]
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.log = open(os.path.join(log_dir or model, f"server-{self.port}.log"), "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 120:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {open(self.log.name).read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            raise RuntimeError("server did not start")
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=api_key or "unused", max_retries=0,
                                    timeout=120)

    def pid_of_rank(self, rank: int) -> int:
        return int(re.search(rf"rank {rank}/\d+ \(pid (\d+)\)", open(self.log.name).read()).group(1))

    def rss_mib(self, pid: int | None = None) -> float:
        """Resident memory of the server process (or of pid) in MiB."""
        with open(f"/proc/{pid or self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()

    def drained(self, timeout_s: float = 30) -> dict:
        """The metrics once no request runs and no KV page is in use (or whatever they are after timeout_s)."""
        deadline = time.monotonic() + timeout_s
        while True:
            http.get(self.url + "/health_generate", headers=self.headers)  # a step refreshes the engine stats
            m = self.metrics()
            if (m["sglang:num_running_reqs"] == 0 and m["sglang:token_usage"] == 0) \
                    or time.monotonic() > deadline:
                return m
            time.sleep(0.3)

    def abandon_stream(self, prompt: list[int], after_chunks: int = 3) -> None:
        """A streaming completion whose client goes away after a few chunks."""
        with http.stream("POST", self.url + "/v1/completions", json={
                "prompt": prompt, "max_tokens": 400, "stream": True, "temperature": 0, "ignore_eos": True}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i >= after_chunks:
                    break

    def metrics(self) -> dict:
        out = {}
        for line in http.get(self.url + "/metrics", headers=self.headers).text.splitlines():
            if line and not line.startswith("#") and "_bucket" not in line:
                name, value = line.rsplit(" ", 1)
                out[name.split("{")[0]] = out.get(name.split("{")[0], 0.0) + float(value)  # sum over labels
        return out


def make_served_model(tmp_path_factory):
    from dsv32.core.demo import make_demo_checkpoint

    root = tmp_path_factory.mktemp("served")
    demo = make_demo_checkpoint(str(root / "demo"))
    path = root / "tiny"
    hf = make_checkpoint(str(path), seed=31, vocab_size=512, index_topk=24)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(demo, f), path / f)
    return str(path), hf


def prompts(n, seed=0, lo=5, hi=60):
    import random

    rng = random.Random(seed)
    return [[rng.randrange(16, 500) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def complete(client, prompt, n_tokens=16, **kw):
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=n_tokens, **{**GREEDY, **kw})
    return r
