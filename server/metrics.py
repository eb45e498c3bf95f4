"""Prometheus metrics in the text exposition format (no client library needed).

Counters: prompt / generation tokens, requests by finish reason. Histograms: time to first token, inter-token
latency, end-to-end latency. Gauges (from the engine's latest stats): running / waiting requests, KV cache
usage, prefix-cache hit rate, preemptions.
"""

from __future__ import annotations

import bisect
import threading

# request sizes (--collect-tokens-histogram), SGLang's buckets
_TOKEN_BUCKETS = (100, 300, 500, 700, 1000, 1500, 2000, *range(3000, 10001, 1000), 12500, 15000, 20000, 25000, 30000,
                  35000, 40000, 66000, 99000, 132000, 300000, 600000, 900000, 1100000)
_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Histogram:
    def __init__(self, buckets):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.n += 1

    def render(self, name: str, labels: str) -> list[str]:
        lines, cum = [], 0
        for b, c in zip(self.buckets, self.counts):
            cum += c
            lines.append(f'{name}_bucket{{{labels},le="{b}"}} {cum}')
        lines.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.n}')
        lines += [f"{name}_sum{{{labels}}} {self.sum}", f"{name}_count{{{labels}}} {self.n}"]
        return lines


class Metrics:
    def __init__(self, model_name: str, token_histograms: bool = False):
        self.labels = f'model_name="{model_name}"'
        self.token_histograms = token_histograms
        self.prompt_hist = _Histogram(_TOKEN_BUCKETS)
        self.generation_hist = _Histogram(_TOKEN_BUCKETS)
        self._lock = threading.Lock()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}
        self.ttft = _Histogram(_LATENCY_BUCKETS_S)
        self.itl = _Histogram(_LATENCY_BUCKETS_S)
        self.e2e = _Histogram(_LATENCY_BUCKETS_S)

    def on_first_token(self, ttft_s: float) -> None:
        with self._lock:
            self.ttft.observe(ttft_s)

    def on_token_gap(self, gap_s: float) -> None:
        with self._lock:
            self.itl.observe(gap_s)

    def on_finish(self, prompt_tokens: int, completion_tokens: int, reason: str | None, e2e_s: float) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += completion_tokens
            self.prompt_hist.observe(prompt_tokens)
            self.generation_hist.observe(completion_tokens)
            self.finished[reason or "unknown"] = self.finished.get(reason or "unknown", 0) + 1
            self.e2e.observe(e2e_s)

    def render(self, stats: dict) -> str:
        L = self.labels
        with self._lock:
            lines = [
                "# TYPE dsv32_prompt_tokens_total counter", f"dsv32_prompt_tokens_total{{{L}}} {self.prompt_tokens}",
                "# TYPE dsv32_generation_tokens_total counter",
                f"dsv32_generation_tokens_total{{{L}}} {self.generation_tokens}",
                "# TYPE dsv32_requests_finished_total counter",
            ]
            lines += [f'dsv32_requests_finished_total{{{L},finish_reason="{r}"}} {n}' for r, n in sorted(self.finished.items())]
            for name, h, help_ in (("dsv32_time_to_first_token_seconds", self.ttft, "time to first token"),
                                   ("dsv32_inter_token_latency_seconds", self.itl, "gap between streamed tokens"),
                                   ("dsv32_e2e_request_latency_seconds", self.e2e, "end-to-end request latency")):
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"] + h.render(name, L)
            if self.token_histograms:
                for name, h, help_ in (("dsv32_request_prompt_tokens", self.prompt_hist, "prompt tokens per request"),
                                       ("dsv32_request_generation_tokens", self.generation_hist,
                                        "generated tokens per request")):
                    lines += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"] + h.render(name, L)
        hits, queries = stats.get("prefix_hit_tokens", 0), stats.get("prefix_query_tokens", 0)
        lines += [
            "# TYPE dsv32_num_requests_running gauge", f"dsv32_num_requests_running{{{L}}} {stats.get('running', 0)}",
            "# TYPE dsv32_num_requests_waiting gauge", f"dsv32_num_requests_waiting{{{L}}} {stats.get('waiting', 0)}",
            "# TYPE dsv32_kv_cache_usage_ratio gauge", f"dsv32_kv_cache_usage_ratio{{{L}}} {stats.get('kv_usage', 0.0):.6f}",
            "# TYPE dsv32_prefix_cache_hit_rate gauge",
            f"dsv32_prefix_cache_hit_rate{{{L}}} {hits / queries if queries else 0.0:.6f}",
            "# TYPE dsv32_num_preemptions_total counter",
            f"dsv32_num_preemptions_total{{{L}}} {stats.get('num_preemptions', 0)}",
        ]
        return "\n".join(lines) + "\n"
