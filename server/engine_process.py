"""The engine core in its own process, and the client the HTTP process uses to talk to it.

Wire protocol over a multiprocessing Pipe (pickled tuples):
  HTTP → engine: ("add", rid, prompt_ids, SamplingParams) · ("abort", rid) · ("stop",)
  engine → HTTP: ("ready", info dict) · ("failed", message) · ("outputs", [StepOutput, ...], stats dict) ·
                 ("rejected", rid, message)
The engine loop drains all pending messages, runs one step, and sends that step's outputs in one message,
so a request is answered exactly once per step and never lost: every add gets either outputs ending in a
finished one, or a "rejected".
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import threading
import time
import traceback
from dataclasses import dataclass

log = logging.getLogger("dsv32.server")


@dataclass
class EngineArgs:
    """Everything the engine process needs to build the model (picklable)."""

    model: str
    dtype: str = "auto"
    device: str | None = None
    backend: str | None = None
    kv_cache_dtype: str = "auto"
    indexer_precision: str = "auto"
    page_size: int = 64
    max_model_len: int | None = None
    num_kv_pages: int | None = None
    max_running_requests: int = 64
    chunked_prefill_size: int = 8192
    enable_prefix_caching: bool = True
    kv_cache_memory_gib: float = 1.0
    mem_fraction_static: float | None = None
    kernels: dict | None = None  # kernel slot → requested kernel (--dsa-*-backend, --moe-runner-backend)
    load_format: str = "auto"
    cuda_graph_max_bs: int | None = None
    disable_cuda_graph: bool = False
    disable_overlap_schedule: bool = False


def _engine_main(conn, args: EngineArgs, log_level: int) -> None:
    logging.basicConfig(level=log_level, format="[dsv32 engine] %(message)s")
    try:
        from dsv32.core.llm import LLM

        llm = LLM(model=args.model, dtype=args.dtype, device=args.device, backend=args.backend,
                  kv_cache_dtype=args.kv_cache_dtype, indexer_precision=args.indexer_precision,
                  page_size=args.page_size, max_model_len=args.max_model_len, num_kv_pages=args.num_kv_pages,
                  max_num_seqs=args.max_running_requests, chunked_prefill_size=args.chunked_prefill_size,
                  enable_prefix_caching=args.enable_prefix_caching, kv_cache_memory_gib=args.kv_cache_memory_gib,
                  mem_fraction_static=args.mem_fraction_static, kernels=args.kernels,
                  load_format=args.load_format, cuda_graph_max_bs=args.cuda_graph_max_bs,
                  disable_cuda_graph=args.disable_cuda_graph, disable_overlap_schedule=args.disable_overlap_schedule)
    except Exception as e:
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    engine = llm.engine
    conn.send(("ready", {"max_model_len": llm.max_model_len, "vocab_size": llm.config.vocab_size,
                         "eos_token_ids": list(llm.config.eos_token_ids), "backend": llm.backend.name,
                         "device": str(llm.model.device), "num_kv_pages": llm.kv_cache.allocator.num_pages,
                         "page_size": llm.kv_cache.page_size}))
    try:
        _serve_loop(conn, engine)
    except (EOFError, OSError, KeyboardInterrupt):
        return  # the HTTP process went away: nothing left to serve


def _serve_loop(conn, engine) -> None:
    while True:
        if not engine.has_work():
            conn.poll(None)  # idle: block until a message arrives
        while conn.poll(0):
            msg = conn.recv()
            if msg[0] == "stop":
                return
            if msg[0] == "abort":
                engine.abort(msg[1])
            elif msg[0] == "add":
                _, rid, prompt_ids, params = msg
                try:
                    engine.add_request(prompt_ids, params, request_id=rid)
                except (ValueError, RuntimeError) as e:
                    conn.send(("rejected", rid, str(e)))
        try:
            outputs = engine.step()
        except Exception:  # a bug in a step must not wedge every client: fail the running requests loudly
            msg = traceback.format_exc()
            log.error("engine step failed:\n%s", msg)
            engine.abort_all()
            outputs = engine.step()
        if outputs:
            pc = engine.prefix_cache
            conn.send(("outputs", outputs, {
                "running": len(engine.running), "waiting": len(engine.waiting), "kv_usage": engine.kv_usage,
                "prefix_hit_tokens": pc.hit_tokens if pc else 0, "prefix_query_tokens": pc.query_tokens if pc else 0,
                "num_preemptions": engine.num_preemptions}))


class EngineRejected(Exception):
    """The engine refused a request (e.g. prompt too long for the KV cache); the message says why."""


class EngineDead(RuntimeError):
    pass


class EngineClient:
    """Starts the engine process and multiplexes requests over its pipe for asyncio callers."""

    def __init__(self, args: EngineArgs, startup_timeout_s: float = 600.0):
        ctx = mp.get_context("spawn")  # never fork a process that may hold accelerator state
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_engine_main, args=(child, args, logging.getLogger().level), daemon=True,
                                name="dsv32-engine")
        self.proc.start()
        child.close()
        t0 = time.monotonic()
        while not self._conn.poll(1.0):
            if not self.proc.is_alive():
                raise EngineDead(f"engine process exited with code {self.proc.exitcode} while loading")
            if time.monotonic() - t0 > startup_timeout_s:
                raise EngineDead("engine did not become ready in time")
        kind, payload = self._conn.recv()
        if kind == "failed":
            self.proc.join(5)
            raise EngineDead(f"engine failed to start: {payload}")
        self.info: dict = payload
        self.stats: dict = {"running": 0, "waiting": 0, "kv_usage": 0.0, "prefix_hit_tokens": 0,
                            "prefix_query_tokens": 0, "num_preemptions": 0}
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._send_lock = threading.Lock()
        self._ids = itertools.count()
        self._reader = threading.Thread(target=self._read_loop, daemon=True, name="dsv32-engine-reader")
        self._reader.start()

    @property
    def alive(self) -> bool:
        return self.proc.is_alive() and self._reader.is_alive()

    def _send(self, msg) -> None:
        with self._send_lock:
            self._conn.send(msg)

    def _read_loop(self) -> None:
        try:
            while True:
                msg = self._conn.recv()
                if msg[0] == "outputs":
                    self.stats = msg[2]
                    for out in msg[1]:
                        self._deliver(out.request_id, out)
                elif msg[0] == "rejected":
                    self._deliver(msg[1], EngineRejected(msg[2]))
        except (EOFError, OSError):
            for rid in list(self._queues):
                self._deliver(rid, EngineDead("engine process died"))

    def _deliver(self, rid: str, item) -> None:
        entry = self._queues.get(rid)
        if entry is not None:
            loop, queue = entry
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}"

    async def generate(self, rid: str, prompt_ids: list[int], params):
        """Yields StepOutputs for one request until it finishes. Cancelling the consumer aborts the request."""
        if not self.alive:
            raise EngineDead("engine process is not running")
        if rid in self._queues:
            raise EngineRejected(f"request id '{rid}' is already in use by a running request")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = (asyncio.get_running_loop(), queue)
        finished = False
        try:
            self._send(("add", rid, prompt_ids, params))
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._queues.pop(rid, None)
            if not finished and self.alive:
                self._send(("abort", rid))

    def shutdown(self) -> None:
        try:
            if self.proc.is_alive():
                self._send(("stop",))
                self.proc.join(10)
        finally:
            if self.proc.is_alive():
                self.proc.terminate()
