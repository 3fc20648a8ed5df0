"""`/metrics` in Prometheus's text format, through prometheus_client: the server's own counters and
histograms, and the engine's gauges read at each scrape. One registry per app, so two servers in one
process (tests) keep their counts apart."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

disable_created_metrics()  # the *_created series: noise for a server that counts from its own start

GAUGES = {  # engine stats key -> (metric, help)
    "running": ("flatstack_num_requests_running", "sequences in the running batch"),
    "waiting": ("flatstack_num_requests_waiting", "sequences waiting for admission"),
    "kv_blocks_used": ("flatstack_kv_blocks_used", "KV cache blocks held by sequences"),
    "kv_blocks_free": ("flatstack_kv_blocks_free", "KV cache blocks free (cached prefixes included)"),
    "prefix_cache_hit_rate": ("flatstack_prefix_cache_hit_rate", "prompt tokens served from the prefix cache"),
}


class EngineCollector:
    """The engine's state as of its last step, read when scraped."""

    def __init__(self, stats: Callable[[], dict], pending: Callable[[], int], path: Callable[[], str]):
        self.stats, self.pending, self.path = stats, pending, path

    def collect(self):
        s = self.stats()
        for key, (name, doc) in GAUGES.items():
            yield GaugeMetricFamily(name, doc, value=s[key])
        yield CounterMetricFamily("flatstack_preemptions", "sequences preempted for KV blocks",
                                  value=s["preemptions"])
        yield GaugeMetricFamily("flatstack_queue_sequences", "sequences accepted and not yet ended (the queue "
                                "limit counts these)", value=self.pending())
        serving = GaugeMetricFamily("flatstack_decode_path", "the decode path serving now", labels=["path"])
        serving.add_metric([self.path()], 1)
        yield serving


class Metrics:
    def __init__(self, stats: Callable[[], dict], pending: Callable[[], int], path: Callable[[], str]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("flatstack_requests", "HTTP requests by status", ["status"], registry=r)
        self.prompt_tokens = Counter("flatstack_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("flatstack_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("flatstack_time_to_first_token_seconds", "time to each choice's first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("flatstack_inter_token_latency_seconds", "time between a choice's tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        r.register(EngineCollector(stats, pending, path))

    def count(self, status: int) -> None:
        self.requests.labels(status=str(status)).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
