"""The HTTP process's client of the engine: the rank processes (core/engine/launcher.py; one per rank, even for a
single device) behind world rank 0's Pipe (the wire protocol is in core/engine/worker.py), multiplexed for asyncio
callers. A supervisor thread watches the ranks: when one dies or stops answering, every in-flight request fails with
EngineDead naming the rank and the cause, and `on_failure` is called (the server then exits non-zero)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import threading
import time

from dsv32.core.engine.launcher import RankFailure, RankProcesses

log = logging.getLogger("dsv32.server")


class EngineRejected(Exception):
    """The engine refused a request (e.g. prompt too long for the KV cache); the message says why."""


class EngineDead(RuntimeError):
    pass


def _merged(a, b):
    """Two consecutive outputs of one request as one (tokens, text and logprobs joined; b's state and counts)."""
    return dataclasses.replace(b, new_token_ids=a.new_token_ids + b.new_token_ids, text_delta=a.text_delta + b.text_delta,
                               logprobs=a.logprobs + b.logprobs,
                               prompt_logprobs=a.prompt_logprobs if b.prompt_logprobs is None else b.prompt_logprobs)


class EngineClient:
    """Starts the engine's rank processes and multiplexes requests over rank 0's pipe."""

    def __init__(self, config, on_failure=None, startup_timeout_s: float = 3600.0, stream_interval: int = 1):
        self.stream_interval = stream_interval  # tokens per yielded output (the first and the last always yielded)
        try:
            self.ranks = RankProcesses(config, logging.getLogger().level, startup_timeout_s)
        except RankFailure as e:
            raise EngineDead(str(e)) from None
        self.info: dict = self.ranks.info
        self.stats: dict = {"running": 0, "waiting": 0, "kv_usage": 0.0, "prefix_hit_tokens": 0,
                            "prefix_query_tokens": 0, "num_preemptions": 0}
        self.failure: str | None = None
        self.on_failure = on_failure
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._flushes: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._send_lock = threading.Lock()
        self._ids = itertools.count()
        self._stopping = False
        self._reader = threading.Thread(target=self._read_loop, daemon=True, name="dsv32-engine-reader")
        self._reader.start()
        self._watcher = threading.Thread(target=self._watch, daemon=True, name="dsv32-engine-watcher")
        self._watcher.start()

    @property
    def alive(self) -> bool:
        return self.failure is None and self._reader.is_alive()

    def heartbeat_age(self) -> float:
        """Seconds since the least recent of this node's ranks last went round its loop (it does while idle too)."""
        return time.monotonic() - min(self.ranks.heartbeat)

    def fail_all(self, message: str) -> None:
        """Ends every request in flight with EngineDead(message) (the server is going away)."""
        for rid in list(self._queues):
            self._deliver(rid, EngineDead(message))

    def _send(self, msg) -> None:
        with self._send_lock:
            self.ranks.send(msg)

    def _read_loop(self) -> None:
        try:
            while True:
                msg = self.ranks.conn.recv()
                if msg[0] == "outputs":
                    self.stats = msg[2]
                    for out in msg[1]:
                        self._deliver(out.request_id, out)
                elif msg[0] == "rejected":
                    self._deliver(msg[1], EngineRejected(msg[2]))
                elif msg[0] == "flushed":
                    loop, fut = self._flushes.pop(msg[1], (None, None))
                    if fut is not None:
                        loop.call_soon_threadsafe(lambda f=fut, ok=msg[2]: f.done() or f.set_result(ok))
        except (EOFError, OSError):
            if not self._stopping:
                time.sleep(0.5)  # let the watcher name the cause
                self._fail(self.ranks.check() or "engine process died")

    def _watch(self) -> None:
        while not self._stopping and self.failure is None:
            failure = self.ranks.check()
            if failure:
                self._fail(failure)
                return
            time.sleep(0.5)

    def _fail(self, message: str) -> None:
        if self.failure is not None or self._stopping:
            return
        self.failure = message
        log.error("engine failed: %s", message)
        for rid in list(self._queues):
            self._deliver(rid, EngineDead(f"engine failed: {message}"))
        for token in list(self._flushes):
            loop, fut = self._flushes.pop(token)
            loop.call_soon_threadsafe(lambda f=fut: f.done() or f.set_exception(EngineDead(f"engine failed: {message}")))
        if self.on_failure is not None:
            self.on_failure(message)

    def _deliver(self, rid: str, item) -> None:
        entry = self._queues.get(rid)
        if entry is not None:
            loop, queue = entry
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def requests(self) -> list[str]:
        """Ids of the engine requests in flight."""
        return list(self._queues)

    def abort(self, rids: list[str]) -> None:
        """Aborts engine requests by id: each ends with finish_reason "abort" (its consumer sees that output)."""
        for rid in rids:
            if rid in self._queues and self.alive:
                self._send(("abort", rid))

    async def flush_cache(self) -> bool:
        """Empties every attention group's prefix cache; False when a group had requests (nothing flushed there)."""
        if not self.alive:
            raise EngineDead(f"engine is not running: {self.failure or 'stopped'}")
        token = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._flushes[token] = (asyncio.get_running_loop(), fut)
        try:
            self._send(("flush", token))
            return await fut
        finally:
            self._flushes.pop(token, None)

    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}"

    async def generate(self, rid: str, prompt_ids: list[int], params):
        """Yields StepOutputs for one request until it finishes. Cancelling the consumer aborts the request."""
        if not self.alive:
            raise EngineDead(f"engine is not running: {self.failure or 'stopped'}")
        if rid in self._queues:
            raise EngineRejected(f"request id '{rid}' is already in use by a running request")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = (asyncio.get_running_loop(), queue)
        finished, held, first = False, None, True
        try:
            self._send(("add", rid, prompt_ids, params))
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                held = item if held is None else _merged(held, item)
                if not (first or held.finished or len(held.new_token_ids) >= self.stream_interval):
                    continue  # --stream-interval: hold the tokens until there are enough
                out, held, first = held, None, False
                yield out
                if out.finished:
                    finished = True
                    return
        finally:
            self._queues.pop(rid, None)
            if not finished and self.alive:
                self._send(("abort", rid))

    def shutdown(self) -> None:
        self._stopping = True
        self.ranks.shutdown()
