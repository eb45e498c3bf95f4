"""Prometheus metrics, with prometheus-client, under SGLang's names (so SGLang's Grafana dashboards and alerts work
unchanged), labelled model_name:

- counters: sglang:prompt_tokens_total, sglang:generation_tokens_total, sglang:num_requests_total,
  sglang:num_aborted_requests_total, and ours: dsv32_requests_finished_total{finish_reason},
  dsv32_num_preemptions_total (requests whose KV pages were taken back and which were recomputed);
- histograms: sglang:time_to_first_token_seconds, sglang:inter_token_latency_seconds,
  sglang:e2e_request_latency_seconds; with --collect-tokens-histogram sglang:prompt_tokens_histogram and
  sglang:generation_tokens_histogram;
- gauges, from the engine's latest stats at scrape time: sglang:num_running_reqs, sglang:num_queue_reqs,
  sglang:num_used_tokens, sglang:token_usage (share of KV pages held by requests), sglang:gen_throughput (tokens/s),
  sglang:cache_hit_rate (prefix-cache hits / prompt tokens looked up);
- with speculative decoding: sglang:spec_accept_length (average tokens emitted per verify step, SGLang's gauge) and
  dsv32_spec_accept_length, a histogram of the accept length of every verify step (buckets 1 .. draft tokens + 1).
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

prometheus_client.disable_created_metrics()  # no *_created samples (SGLang's exposition has none either)

# request sizes (--collect-tokens-histogram), SGLang's buckets
_TOKEN_BUCKETS = (100, 300, 500, 700, 1000, 1500, 2000, *range(3000, 10001, 1000), 12500, 15000, 20000, 25000, 30000,
                  35000, 40000, 66000, 99000, 132000, 300000, 600000, 900000, 1100000)
_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST


class _EngineGauges:
    """A collector reading the engine's latest stats when scraped."""

    def __init__(self, model_name: str, stats):
        self.model_name, self.stats = model_name, stats

    def collect(self):
        s = self.stats()
        hits, queries = s.get("prefix_hit_tokens", 0), s.get("prefix_query_tokens", 0)
        for name, doc, value in (
                ("sglang:num_running_reqs", "requests running", s.get("running", 0)),
                ("sglang:num_queue_reqs", "requests waiting to be admitted", s.get("waiting", 0)),
                ("sglang:num_used_tokens", "tokens in the KV cache held by running requests", s.get("num_tokens", 0)),
                ("sglang:token_usage", "share of KV cache pages held by requests", s.get("kv_usage", 0.0)),
                ("sglang:gen_throughput", "generated tokens per second (latest window)", s.get("gen_throughput", 0.0)),
                ("sglang:cache_hit_rate", "prefix-cache hit rate", hits / queries if queries else 0.0)):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([self.model_name], value)
            yield g
        c = CounterMetricFamily("dsv32_num_preemptions", "requests preempted to free KV pages", labels=["model_name"])
        c.add_metric([self.model_name], s.get("num_preemptions", 0))
        yield c
        if "spec_accept_histogram" in s:
            g = GaugeMetricFamily("sglang:spec_accept_length", "average accept length of speculative decoding "
                                  "(tokens emitted per verify step)", labels=["model_name"])
            g.add_metric([self.model_name], s.get("avg_spec_accept_length", 0.0))
            yield g
            h = HistogramMetricFamily("dsv32_spec_accept_length", "tokens emitted per speculative verify step",
                                      labels=["model_name"])
            counts, acc, buckets = s["spec_accept_histogram"], 0, []
            for length in range(1, len(counts)):
                acc += counts[length]
                buckets.append((str(float(length)), acc))
            buckets.append(("+Inf", acc))
            h.add_metric([self.model_name], buckets, sum_value=s.get("spec_emitted_tokens", 0))
            yield h


class Metrics:
    def __init__(self, model_name: str, token_histograms: bool = False, stats=dict):
        """stats: a callable returning the engine's latest stats (read at scrape time)."""
        self.model_name = model_name
        self.registry = r = CollectorRegistry()
        lab = ["model_name"]
        self.prompt_tokens = Counter("sglang:prompt_tokens", "prompt tokens processed", lab, registry=r)
        self.generation_tokens = Counter("sglang:generation_tokens", "tokens generated", lab, registry=r)
        self.requests = Counter("sglang:num_requests", "requests finished", lab, registry=r)
        self.aborted = Counter("sglang:num_aborted_requests", "requests aborted", lab, registry=r)
        self.finished = Counter("dsv32_requests_finished", "requests finished by finish reason",
                                [*lab, "finish_reason"], registry=r)
        self.ttft = Histogram("sglang:time_to_first_token_seconds", "time to first token", lab,
                              buckets=_LATENCY_BUCKETS_S, registry=r)
        self.itl = Histogram("sglang:inter_token_latency_seconds", "gap between streamed tokens", lab,
                             buckets=_LATENCY_BUCKETS_S, registry=r)
        self.e2e = Histogram("sglang:e2e_request_latency_seconds", "end-to-end request latency", lab,
                             buckets=_LATENCY_BUCKETS_S, registry=r)
        self.prompt_hist = self.generation_hist = None
        if token_histograms:
            self.prompt_hist = Histogram("sglang:prompt_tokens_histogram", "prompt tokens per request", lab,
                                         buckets=_TOKEN_BUCKETS, registry=r)
            self.generation_hist = Histogram("sglang:generation_tokens_histogram", "generated tokens per request",
                                             lab, buckets=_TOKEN_BUCKETS, registry=r)
        r.register(_EngineGauges(model_name, stats))

    def on_first_token(self, ttft_s: float) -> None:
        self.ttft.labels(self.model_name).observe(ttft_s)

    def on_token_gap(self, gap_s: float) -> None:
        self.itl.labels(self.model_name).observe(gap_s)

    def on_finish(self, prompt_tokens: int, completion_tokens: int, reason: str | None, e2e_s: float) -> None:
        m = self.model_name
        self.prompt_tokens.labels(m).inc(prompt_tokens)
        self.generation_tokens.labels(m).inc(completion_tokens)
        self.requests.labels(m).inc()
        if reason == "abort":
            self.aborted.labels(m).inc()
        self.finished.labels(m, reason or "unknown").inc()
        self.e2e.labels(m).observe(e2e_s)
        if self.prompt_hist is not None:
            self.prompt_hist.labels(m).observe(prompt_tokens)
            self.generation_hist.labels(m).observe(completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
