"""Starting and watching the rank processes of this node (one per rank, spawned; worker.py runs in each).

On node 0 the launcher also holds the Pipe to world rank 0, the engine's front door (the server's EngineClient and
the offline LLM both talk through it). `check()` tells the truth about the ranks: a rank whose process ended (its
own error message when it reported one, else its exit code or signal) or that stopped beating for longer than
--dist-timeout (frozen, or stuck in a collective) ends the run with a message naming it; a front end polls it.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import socket
import time

log = logging.getLogger("dsv32.launcher")


class RankFailure(RuntimeError):
    """A rank died, stopped answering, or failed to start; the message names it and the cause."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _exit_cause(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class RankProcesses:
    """This node's rank processes. Blocks until the engine is ready (or raises RankFailure naming the rank that
    could not start)."""

    def __init__(self, config, log_level: int = logging.INFO, startup_timeout_s: float = 3600.0):
        from dsv32.core.engine.worker import rank_main

        ctx = mp.get_context("spawn")  # never fork a process that may hold accelerator state
        p = self.parallel = config.parallel
        init_method = f"tcp://{p.dist_init_addr}" if p.dist_init_addr else f"tcp://127.0.0.1:{free_port()}"
        self.ranks = list(p.node_ranks())
        self.heartbeat = ctx.Array("d", len(self.ranks), lock=False)
        self.errors = []  # per rank: the read end of a pipe that carries its last words
        self.reported: dict[int, str] = {}
        self.conn, child = ctx.Pipe() if p.node_rank == 0 else (None, None)
        self.procs = []
        for rank in self.ranks:
            read, write = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=rank_main, name=f"dsv32-rank{rank}", daemon=True,
                               args=(rank, config, child if rank == 0 else None, self.heartbeat, write,
                                     init_method, log_level))
            proc.start()
            write.close()
            self.errors.append(read)
            self.procs.append(proc)
        if child is not None:
            child.close()
        self.info: dict = {}
        self.stats: dict = {}  # the engine's latest stats (every attention group's combined)
        self.failure: str | None = None
        try:
            self._wait_ready(startup_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        t0 = time.monotonic()
        while True:
            if self.conn is not None and self.conn.poll(0.5):
                try:
                    kind, payload = self.conn.recv()
                except (EOFError, OSError):  # rank 0 ended without a word
                    raise RankFailure(self._describe_startup_failure(None)) from None
                if kind == "failed":
                    raise RankFailure(self._describe_startup_failure(payload))
                self.info = payload
                break
            if self.conn is None:
                time.sleep(0.5)
                if all(proc.is_alive() for proc in self.procs) and self._beating():
                    break  # another node's rank 0 holds the front door; ours are serving
            dead = [(r, proc) for r, proc in zip(self.ranks, self.procs) if not proc.is_alive()]
            if dead:
                raise RankFailure(self._describe_startup_failure(None))
            if time.monotonic() - t0 > timeout_s:
                raise RankFailure(f"the engine did not become ready within {timeout_s:.0f} s")
        now = time.monotonic()
        for i in range(len(self.ranks)):
            self.heartbeat[i] = max(self.heartbeat[i], now)

    def _beating(self) -> bool:
        return all(v > 0 for v in self.heartbeat)

    def _drain_errors(self) -> None:
        for rank, pipe in zip(self.ranks, self.errors):
            try:
                if rank not in self.reported and pipe.poll(0):
                    self.reported[rank] = pipe.recv()
            except (EOFError, OSError):
                pass  # ended without a word

    def _describe_startup_failure(self, message: str | None) -> str:
        time.sleep(0.2)  # let the failing rank's report arrive
        self._drain_errors()
        parts = [self.reported[r] for r in sorted(self.reported)]
        if message and message not in parts:
            parts.insert(0, message)
        for r, proc in zip(self.ranks, self.procs):
            if not proc.is_alive() and r not in self.reported:
                parts.append(f"rank {r} (pid {proc.pid}) {_exit_cause(proc.exitcode)} while starting")
        return "engine failed to start: " + ("; ".join(parts) or "a rank exited")

    def check(self) -> str | None:
        """None while every rank runs and beats; else why not, naming the ranks (and remembered: the run is over)."""
        if self.failure is not None:
            return self.failure
        self._drain_errors()
        dead = [(r, proc) for r, proc in zip(self.ranks, self.procs) if not proc.is_alive()]
        now = time.monotonic()
        stale = [r for i, r in enumerate(self.ranks) if now - self.heartbeat[i] > self.parallel.progress_timeout_s]
        if not dead and not stale:
            return None
        parts = []
        for r, proc in dead:
            cause = self.reported.get(r) or f"rank {r} (pid {proc.pid}) {_exit_cause(proc.exitcode)}"
            parts.append(cause)
        # A rank that is alive but has not beaten for a while is the likely cause when others died waiting on it
        # (their collectives time out at about the same moment its heartbeat goes stale): name it too.
        dead_ranks = {r for r, _ in dead}
        limit = self.parallel.progress_timeout_s
        threshold = limit if not dead else min(limit / 2, 30.0)
        for i, r in enumerate(self.ranks):
            age = now - self.heartbeat[i]
            if r not in dead_ranks and age > threshold:
                which = "--dist-timeout" if self.parallel.watchdog_timeout_s is None else "--watchdog-timeout"
                parts.append(f"rank {r} stopped answering (no progress for {age:.0f} s, {which} {limit:.0f} s)")
        self.failure = "; ".join(parts)
        return self.failure

    def send(self, msg) -> None:
        self.conn.send(msg)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Asks rank 0 to stop (every rank follows), then ends whatever still runs."""
        try:
            if self.conn is not None and self.failure is None and all(p.is_alive() for p in self.procs):
                self.conn.send(("stop",))
        except (OSError, ValueError):
            pass
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()

    # ---- a synchronous client (the offline LLM) ---------------------------------------------------------------------
    def _recv(self):
        """rank 0's next message, or RankFailure naming what went wrong with the ranks."""
        while True:
            failure = self.check()
            if failure:
                raise RankFailure(failure)
            if self.conn.poll(0.5):
                try:
                    return self.conn.recv()
                except (EOFError, OSError):  # rank 0 is gone: wait for the processes to tell why
                    deadline = time.monotonic() + 10
                    while not self.check() and time.monotonic() < deadline:
                        time.sleep(0.2)
                    raise RankFailure(self.check() or "rank 0 closed its connection") from None

    def generate(self, prompts: list[list[int]], params: list, with_text: bool) -> list:
        """Runs every prompt (n completions each) to the end; returns RequestOutputs in prompt order."""
        from dsv32.core.llm import CompletionOutput, RequestOutput, expand_n

        rids, texts, tokens, logprobs, reasons = [], {}, {}, {}, {}
        for i, (ids, p) in enumerate(zip(prompts, params)):
            group = []
            for j, child in enumerate(expand_n(p)):
                rid = f"{i}-{j}"
                self.send(("add", rid, list(ids), child))
                group.append(rid)
                texts[rid], tokens[rid], logprobs[rid] = [], [], []
            rids.append(group)
        unfinished = {r for g in rids for r in g}
        while unfinished:
            msg = self._recv()
            if msg[0] == "rejected":
                for rid in unfinished:
                    self.send(("abort", rid))
                raise ValueError(msg[2])
            self.stats = msg[2]
            for out in msg[1]:
                texts[out.request_id].append(out.text_delta)
                tokens[out.request_id].extend(out.new_token_ids)
                logprobs[out.request_id].extend(out.logprobs)
                if out.finished:
                    reasons[out.request_id] = out.finish_reason
                    unfinished.discard(out.request_id)
        return [RequestOutput(group[0], list(ids), [
            CompletionOutput(j, "".join(texts[r]) if with_text else None, tokens[r], reasons[r], logprobs[r] or None)
            for j, r in enumerate(group)]) for group, ids in zip(rids, prompts)]
