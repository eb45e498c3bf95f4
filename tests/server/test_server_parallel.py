"""`dsv32 serve --tp 2` (and with attention DP) as real processes: under concurrent requests, aborted streams and
preemption the outputs equal `--tp 1`'s; every page comes back; killing a rank ends the server with a message that
names the rank, and a request in flight gets an error instead of hanging."""

from __future__ import annotations

import concurrent.futures as cf
import os
import re
import signal
import time

import pytest
from _live import Server, complete, http, make_served_model, prompts

SMALL = ("--page-size", "8", "--num-kv-pages", "64", "--context-length", "256", "--enable-metrics",
         "--disable-radix-cache")


def _load(server, ps):
    """12 greedy requests plus 6 streams abandoned after a few chunks, all at once; returns the greedy texts."""
    with cf.ThreadPoolExecutor(18) as ex:
        greedy = [ex.submit(lambda p=p: complete(server.client, p, 24).choices[0].text) for p in ps]
        for p in prompts(6, seed=16):
            ex.submit(server.abandon_stream, p)
        return [f.result() for f in greedy]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_served_model(tmp_path_factory)


@pytest.fixture(scope="module")
def want(model_dir):
    ps = prompts(12, seed=15, lo=30, hi=40)
    one = Server(model_dir[0], "--page-size", "8")
    try:
        return ps, [complete(one.client, p, 24).choices[0].text for p in ps]
    finally:
        one.stop()


@pytest.mark.parametrize("flags", [("--tp", "2"), ("--tp", "2", "--dp", "2", "--enable-dp-attention")],
                         ids=["tp2", "dp2"])
def test_parallel_server_equals_one_rank_under_load(model_dir, want, flags):
    ps, texts = want
    s = Server(model_dir[0], *SMALL, *flags)
    try:
        assert _load(s, ps) == texts
        m = s.drained()
        assert m["sglang:num_running_reqs"] == 0 and m["sglang:token_usage"] == 0
        if flags[-1] != "--enable-dp-attention":  # two groups of 64 pages each hold the load without preempting
            assert m["dsv32_num_preemptions_total"] > 0
        assert http.get(s.url + "/get_model_info").json()["world_size"] == 2
    finally:
        s.stop()


def test_killed_rank_stops_the_server_naming_it(model_dir):
    s = Server(model_dir[0], "--tp", "2", "--page-size", "8")
    try:
        log = open(s.log.name).read()
        pid = int(re.search(r"rank 1/2 \(pid (\d+)\)", log).group(1))
        with http.stream("POST", s.url + "/v1/completions", json={
                "prompt": prompts(1, seed=17)[0], "max_tokens": 400, "stream": True, "temperature": 0,
                "ignore_eos": True}) as r:
            lines = r.iter_lines()
            next(lines)
            os.kill(pid, signal.SIGKILL)
            rest = list(lines)  # ends (with an error event) instead of hanging
        assert any("engine failed" in ln and "rank 1" in ln for ln in rest), rest[-3:]
        assert s.proc.wait(30) != 0
        log = open(s.log.name).read()
        assert f"rank 1 (pid {pid}) killed by signal SIGKILL" in log and "the server stopped" in log
    finally:
        s.stop()


def test_ranks_stop_when_the_server_process_dies(model_dir):
    """SIGKILL on the HTTP process (no cleanup at all): rank 0 sees its pipe close and every rank stops with it,
    instead of waiting --dist-timeout in a collective."""
    s = Server(model_dir[0], "--tp", "2")
    try:
        log = open(s.log.name).read()
        pids = [int(p) for p in re.findall(r"rank \d/2 \(pid (\d+)\)", log)]
        assert len(pids) == 2
        s.proc.kill()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        assert not any(_alive(p) for p in pids)
    finally:
        s.stop()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_two_nodes_on_one_host(model_dir, want):
    """--nnodes 2: node 1 (another `dsv32 serve`, no HTTP) runs rank 1 and meets node 0 at --dist-init-addr; the
    outputs equal one rank's; stopping node 0 stops node 1 cleanly (exit 0)."""
    import subprocess
    import sys

    from _live import _free_port

    ps, texts = want
    addr = f"127.0.0.1:{_free_port()}"
    flags = ("--tp", "2", "--nnodes", "2", "--dist-init-addr", addr, "--page-size", "8")
    log1 = open(os.path.join(model_dir[0], "node1.log"), "w")
    node1 = subprocess.Popen([sys.executable, "-m", "dsv32.server.launch_server", "--model", model_dir[0],
                              "--dtype", "float32", "--node-rank", "1", *flags], stdout=log1, stderr=subprocess.STDOUT)
    try:
        node0 = Server(model_dir[0], *flags)
        try:
            assert [complete(node0.client, p, 24).choices[0].text for p in ps[:4]] == texts[:4]
        finally:
            node0.stop()
        assert node1.wait(30) == 0, open(log1.name).read()[-2000:]
        assert "node 1: ranks 1-1 running" in open(log1.name).read()
    finally:
        if node1.poll() is None:
            node1.kill()
        log1.close()
