"""The HTTP server around the app: the listening socket bound before anything slow starts (a busy port fails at
once), connection timeouts, and a shutdown that drains.

- A connection that has not sent a complete request head within HEADER_TIMEOUT_S is closed (slow or silent
  clients); idle keep-alive connections close after KEEP_ALIVE_S (uvicorn); a request body that stalls gets a 408
  (app.read_json).
- SIGTERM / SIGINT: the server stops accepting at once and answers 503 to new requests on open connections, lets
  the requests in flight finish for up to --graceful-shutdown-timeout seconds, then ends each remaining one with an
  error (an error event and [DONE] for a stream, a 503 for the others) before it closes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("dsv32.server")

HEADER_TIMEOUT_S = 10.0
KEEP_ALIVE_S = 5.0


class ListenError(OSError):
    """The address cannot be listened on; the message says which and why."""


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (ListenError when it is busy or not ours to take)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or stop what "
                          "holds it") from None
    sock.set_inheritable(True)
    return sock


class _HeadTimeoutH11(H11Protocol):
    """h11 with a deadline for the first request head of a connection."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._no_request)

    def _no_request(self) -> None:
        if self.cycle is None and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self._head_timer.cancel()
        super().connection_lost(exc)


class DrainingServer(uvicorn.Server):
    def __init__(self, app, sock: socket.socket, state, engine, grace_s: float):
        super().__init__(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5,
                                        timeout_keep_alive=KEEP_ALIVE_S, http=_HeadTimeoutH11))
        self.sock, self.state, self.engine, self.grace_s = sock, state, engine, grace_s

    def serve_forever(self) -> None:
        self.run(sockets=[self.sock])

    async def shutdown(self, sockets=None) -> None:
        for server in self.servers:
            server.close()  # no new connections
        self.state.draining = True
        deadline = time.monotonic() + self.grace_s
        if self.state.in_flight:
            log.info("shutting down: waiting up to %.0f s for %d request(s)", self.grace_s, self.state.in_flight)
        while self.state.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.state.in_flight:
            log.warning("shutting down: ending %d request(s) still running after %.0f s", self.state.in_flight,
                        self.grace_s)
            self.engine.fail_all("the server is shutting down")
            end = time.monotonic() + 5
            while self.state.in_flight and time.monotonic() < end:  # their error responses go out
                await asyncio.sleep(0.05)
        await super().shutdown(sockets)
        # uvicorn re-raises the captured signal once it is done, which would kill the process before serve() stops
        # the engine's ranks: the shutdown is complete, so the signal has been handled
        getattr(self, "_captured_signals", []).clear()
