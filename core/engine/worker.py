"""One process per rank: it joins the process groups, builds its engine (build.py) and runs the step loop.

Control plane. World rank 0 alone talks to the front end (a Pipe). Once per loop iteration every rank takes part in
one exchange of host objects over the gloo group of all ranks: rank 0 contributes the front end's new messages, each
new request tagged with the attention group that will run it (the one with the fewest unfinished requests); the
first rank of every other attention group contributes the outputs its engine produced since the last exchange,
which rank 0 passes on. Every rank of an attention group applies the same messages at the same point and runs an
identical engine, so all make the same scheduling decisions; the group's first rank samples and broadcasts the
tokens (engine.py). With attention data-parallelism the runner adds one synchronization per step, and a rank whose
group has nothing to do runs padding rows, so the dense-MLP / MoE collectives never wait for it (runner.py).

Wire protocol with the front end (pickled tuples over the Pipe):
  front end → rank 0: ("add", rid, prompt_ids, SamplingParams) · ("abort", rid) · ("flush", token) · ("stop",)
  rank 0 → front end: ("ready", info) · ("failed", message) · ("outputs", [StepOutput, ...], stats) ·
                      ("rejected", rid, message) · ("flushed", token, ok)
A flush goes to every attention group; rank 0 answers once all have (ok: every group's prefix cache was emptied,
which a group refuses while it has requests).
Every add ends in outputs that finish it, or in a "rejected". A rank writes the time of each iteration into its
heartbeat slot; the launcher (launcher.py) ends everything when a rank dies or stops beating.
"""

from __future__ import annotations

import logging
import os
import time
import traceback

import torch

log = logging.getLogger("dsv32.worker")

ALL_GROUPS = -1  # a message every attention group applies
IDLE_WAIT_S = 0.25  # rank 0 waits this long for the front end when no rank has work (the others wait on it)


def rank_main(rank: int, config, conn, heartbeat, errors, init_method: str, log_level: int) -> None:
    """Entry point of a rank process (spawned by launcher.RankProcesses); `errors` is a pipe for its last words."""
    logging.basicConfig(level=log_level, format=f"[dsv32 rank {rank}] %(message)s")
    p = config.parallel
    slot = rank - p.node_ranks().start
    try:
        core = _build(rank, config, init_method)
    except Exception as e:  # noqa: BLE001 - every startup error is reported, naming the rank
        message = f"rank {rank}: {type(e).__name__}: {e}"
        log.error("%s\n%s", message, traceback.format_exc())
        errors.send(message)
        if conn is not None:
            conn.send(("failed", message))
        raise SystemExit(1)
    infos = core.groups.all_gather_objects(core.info())  # every rank built: the engine is ready
    if conn is not None:
        info = dict(infos[0], memory_per_rank=[i["memory"] for i in infos])
        conn.send(("ready", info))
    try:
        RankLoop(core, conn, heartbeat, slot).run()
    except (EOFError, OSError, KeyboardInterrupt):
        return  # the front end went away: nothing left to serve
    except Exception as e:  # noqa: BLE001 - a failed step or exchange ends this rank, and the launcher ends the run
        message = f"rank {rank}: engine loop failed: {type(e).__name__}: {e}"
        log.error("%s\n%s", message, traceback.format_exc())
        errors.send(message)
        raise SystemExit(1)


def _build(rank: int, config, init_method: str):
    from dsv32.core.communicator import init_process_groups
    from dsv32.core.config import ModelConfig
    from dsv32.core.engine.build import build_engine_core, resolve, select_ops

    p = config.parallel
    layout = p.layout(rank)
    if p.ranks_per_node > 1:  # share the host's cores between the node's ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // p.ranks_per_node))
    cfg = ModelConfig.from_pretrained(config.model)
    backend, ops, _ = select_ops(config, cfg, resolve(config, cfg), layout.local_rank)
    if ops.device.type != "cpu" and hasattr(torch, "accelerator"):
        torch.accelerator.set_device_index(ops.device.index or 0)
    groups = init_process_groups(layout, ops.platform().collective_backend, init_method, p.dist_timeout_s)
    return build_engine_core(config, groups, backend, ops)


class RankLoop:
    def __init__(self, core, conn, heartbeat, slot: int):
        self.core, self.engine, self.groups = core, core.engine, core.groups
        self.layout = core.groups.layout
        self.conn, self.heartbeat, self.slot = conn, heartbeat, slot
        self.leader = self.layout.is_attn_leader
        self.to_front: list[tuple] = []  # a non-zero group leader's messages for the front end, sent at the exchange
        # rank 0's view of every attention group: which group runs a request, unfinished requests, latest stats
        n = self.layout.attn_dp_size
        self.assigned: dict[str, int] = {}
        self.load = [0] * n
        self.stats: list[dict] = [{} for _ in range(n)]
        self.flushes: dict[object, list[bool]] = {}  # flush token → the groups' answers so far
        self.busy_elsewhere = False

    # ---- the loop ---------------------------------------------------------------------------------------------------
    def run(self) -> None:
        while True:
            self.heartbeat[self.slot] = time.monotonic()
            msgs = self._exchange()
            if msgs is None:
                return
            self._apply(msgs)
            builds = self.core.runner.builds
            outputs = self.engine.step()  # a failure it cannot isolate ends the run (the launcher reports it)
            if self.groups.dp_attention and self.core.runner.builds == builds:
                self.engine.idle_step()
            if outputs and self.leader:
                self._to_front(("outputs", outputs, self._group_stats()))

    def _exchange(self) -> list | None:
        """This iteration's messages from the front end, as (group, message) pairs; None: stop."""
        msgs = self._read_front() if self.layout.rank == 0 else []
        if self.layout.world_size > 1:
            mine = ({"msgs": msgs} if self.layout.rank == 0 else
                    {"front": self.to_front, "busy": self.engine.has_work()} if self.leader else None)
            self.to_front = []
            payloads = self.groups.all_gather_objects(mine)
            msgs = payloads[0]["msgs"]
            if self.layout.rank == 0:
                others = [p for p in payloads[1:] if p is not None]
                self.busy_elsewhere = any(p["busy"] for p in others)
                for p in others:
                    for m in p["front"]:
                        self._to_front(m)
        if any(m[0] == "stop" for _, m in msgs):
            return None
        return msgs

    def _read_front(self) -> list:
        if not (self.engine.has_work() or self.busy_elsewhere):
            try:
                self.conn.poll(IDLE_WAIT_S)  # bounded: the heartbeat goes on while idle
            except (EOFError, OSError):
                return [(0, ("stop",))]
        msgs = []
        while self.conn.poll(0):
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):  # the front end went away: every rank stops with rank 0
                return msgs + [(0, ("stop",))]
            if msg[0] == "add":
                g = min(range(len(self.load)), key=lambda i: self.load[i])
                self.assigned[msg[1]] = g
                self.load[g] += 1
                msgs.append((g, msg))
            elif msg[0] == "abort":
                if msg[1] in self.assigned:
                    msgs.append((self.assigned[msg[1]], msg))
            elif msg[0] == "flush":
                msgs.append((ALL_GROUPS, msg))
            else:
                msgs.append((0, msg))
        return msgs

    def _apply(self, msgs: list) -> None:
        g = self.layout.attn_dp_rank
        for group, msg in msgs:
            if group not in (g, ALL_GROUPS):
                continue
            if msg[0] == "add":
                _, rid, prompt_ids, params = msg
                try:
                    self.engine.add_request(prompt_ids, params, request_id=rid)
                except (ValueError, RuntimeError) as e:
                    if self.leader:
                        self._to_front(("rejected", rid, str(e)))
            elif msg[0] == "abort":
                self.engine.abort(msg[1])
            elif msg[0] == "flush":
                ok = self.engine.flush_cache()
                if self.leader:
                    self._to_front(("flushed", msg[1], ok))

    # ---- to the front end -------------------------------------------------------------------------------------------
    def _group_stats(self) -> dict:
        return dict(engine_stats(self.core), group=self.layout.attn_dp_rank)

    def _to_front(self, msg: tuple) -> None:
        if self.layout.rank != 0:
            self.to_front.append(msg)
            return
        if msg[0] == "rejected":
            self._forget(msg[1])
        elif msg[0] == "flushed":
            answers = self.flushes.setdefault(msg[1], [])
            answers.append(msg[2])
            if len(answers) < len(self.stats):
                return
            msg = ("flushed", msg[1], all(self.flushes.pop(msg[1])))
        else:
            for out in msg[1]:
                if out.finished:
                    self._forget(out.request_id)
            self.stats[msg[2]["group"]] = msg[2]
            msg = ("outputs", msg[1], self._all_stats())
        self.conn.send(msg)

    def _forget(self, rid: str) -> None:
        g = self.assigned.pop(rid, None)
        if g is not None:
            self.load[g] -= 1

    def _all_stats(self) -> dict:
        """Every attention group's latest stats combined: counts summed, KV usage averaged."""
        known = [s for s in self.stats if s]
        out = {k: sum(s[k] for s in known) for k in ("running", "waiting", "prefix_hit_tokens", "prefix_query_tokens",
                                                     "num_preemptions", "graph_replays", "overlapped_steps",
                                                     "gen_throughput", "num_tokens")}
        out["kv_usage"] = sum(s["kv_usage"] for s in known) / max(len(known), 1)
        if known and "spec_verify_steps" in known[0]:
            for k in ("spec_verify_steps", "spec_emitted_tokens", "spec_drafted_tokens"):
                out[k] = sum(s[k] for s in known)
            out["spec_num_steps"] = known[0]["spec_num_steps"]
            out["spec_accept_histogram"] = [sum(col) for col in zip(*(s["spec_accept_histogram"] for s in known))]
            out["avg_spec_accept_length"] = out["spec_emitted_tokens"] / max(out["spec_verify_steps"], 1)
        return out


def engine_stats(core) -> dict:
    """One engine's counters (an attention group's: its first rank's engine), as the front end and LLM.stats() read
    them."""
    e, pc = core.engine, core.engine.prefix_cache
    out = {"running": len(e.running), "waiting": len(e.waiting), "kv_usage": e.kv_usage,
           "prefix_hit_tokens": pc.hit_tokens if pc else 0, "prefix_query_tokens": pc.query_tokens if pc else 0,
           "num_preemptions": e.num_preemptions, "graph_replays": core.runner.replays,
           "overlapped_steps": e.overlapped_steps, "gen_throughput": e.batch_log.gen_throughput,
           "num_tokens": sum(r.num_cached for r in e.running)}
    if e.spec is not None:
        out.update(e.spec.stats.as_dict())
    return out
