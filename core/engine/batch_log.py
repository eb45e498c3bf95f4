"""SGLang's batch log lines, so that log-scraping tools and eyes used to SGLang read dsv32's the same way:

  Prefill batch, #new-seq: N, #new-token: N, #cached-token: N, token usage: X.XX, #running-req: N, #queue-req: N
  Decode batch, #running-req: N, #token: N, token usage: X.XX, <device> graph: B, gen throughput (token/s): X.XX, #queue-req: N

one prefill line per step that computes prompt tokens, one decode line every `interval` steps that decode (SGLang's
--decode-log-interval, 40); <device> is the torch device type, so on NVIDIA and AMD GPUs the field reads as SGLang's.
The generation throughput (tokens sampled per second over the last window) is kept for
/server_info and /metrics even when the lines are off (interval 0).
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("dsv32.engine")

WINDOW_STEPS = 40  # decode steps per throughput window when the log lines are off


class BatchLog:
    def __init__(self, interval: int, enabled: bool = True, device_type: str = "cpu"):
        self.graph_label = f"{device_type} graph"
        self.interval = interval if interval > 0 else WINDOW_STEPS
        self.enabled = enabled and interval > 0
        self.decode_steps = 0
        self.tokens = 0  # tokens sampled since the window started
        self.window_start = time.monotonic()
        self.gen_throughput = 0.0  # tokens/s over the last complete window

    def sampled(self, n: int) -> None:
        self.tokens += n

    def prefill(self, new_seq: int, new_tokens: int, cached: int, usage: float, running: int, queued: int) -> None:
        if self.enabled:
            log.info("Prefill batch, #new-seq: %d, #new-token: %d, #cached-token: %d, token usage: %.2f, "
                     "#running-req: %d, #queue-req: %d", new_seq, new_tokens, cached, usage, running, queued)

    def decode(self, running: int, tokens: int, usage: float, graph: bool, queued: int) -> None:
        self.decode_steps += 1
        if self.decode_steps % self.interval:
            return
        now = time.monotonic()
        self.gen_throughput = self.tokens / max(now - self.window_start, 1e-9)
        self.tokens, self.window_start = 0, now
        if self.enabled:
            log.info("Decode batch, #running-req: %d, #token: %d, token usage: %.2f, %s: %s, "
                     "gen throughput (token/s): %.2f, #queue-req: %d", running, tokens, usage, self.graph_label, graph,
                     self.gen_throughput, queued)
