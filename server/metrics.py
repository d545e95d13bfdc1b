"""Prometheus metrics with vLLM-style names (`plm:` prefix): engine gauges and counters read at
scrape time, latency histograms recorded by the routes."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)

CACHED_RATIO_BUCKETS = (0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)


class _EngineCollector:
    """Reads the engine's stats object when Prometheus scrapes."""

    def __init__(self, state):
        self.state = state

    def collect(self):
        yield GaugeMetricFamily(
            "plm:server_ready",
            "1 when the server takes requests (loaded, not draining, engine alive)",
            value=float(self.state.ready),
        )
        yield GaugeMetricFamily(
            "plm:pending_http_requests",
            "Chat requests admitted by the HTTP layer",
            value=self.state.live.pending,
        )
        yield self._media_ref_lookups()
        if self.state.engine is None:  # still loading: no engine figures yet
            return
        s = self.state.engine.stats()
        yield GaugeMetricFamily(
            "plm:num_requests_running", "Sequences in the running batch", value=s.num_running
        )
        yield GaugeMetricFamily(
            "plm:num_requests_waiting", "Sequences waiting to be scheduled", value=s.num_waiting
        )
        yield GaugeMetricFamily(
            "plm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use", value=s.kv_usage
        )
        yield CounterMetricFamily(
            "plm:prompt_tokens", "Prompt tokens admitted", value=s.prompt_tokens
        )
        yield CounterMetricFamily(
            "plm:generation_tokens", "Tokens generated", value=s.generation_tokens
        )
        yield CounterMetricFamily(
            "plm:num_preemptions", "Sequences preempted", value=s.num_preemptions
        )
        prefix = s.prefix_cache or {}
        yield CounterMetricFamily(
            "plm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            value=prefix.get("queries", 0),
        )
        yield CounterMetricFamily(
            "plm:prefix_cache_hits",
            "Prompt tokens found in the prefix cache",
            value=prefix.get("hits", 0),
        )
        enc = s.encoder_cache or {}
        yield CounterMetricFamily(
            "plm:encoder_cache_hits",
            "Media items whose encoder output was cached",
            value=enc.get("hits", 0),
        )
        yield CounterMetricFamily(
            "plm:encoder_cache_misses", "Media items encoded", value=enc.get("misses", 0)
        )
        shared = s.prefix_sharing or {}
        yield CounterMetricFamily(
            "plm:prefix_sharing_tokens",
            "Prompt tokens taken from another request in flight (waited for, not recomputed)",
            value=shared.get("shared_tokens", 0),
        )

    def _media_ref_lookups(self) -> CounterMetricFamily:
        refs = self.state.media_refs
        lookups = CounterMetricFamily(
            "plm:media_ref_lookups",
            "Media parts sent as a uuid alone: hit (the server held the media) or miss "
            "(400 media_not_cached)",
            labels=["result"],
        )
        lookups.add_metric(["hit"], refs.hits)
        lookups.add_metric(["miss"], refs.misses)
        return lookups


class Metrics:
    """One registry per app: latency histograms, rejection counter, and the engine collector."""

    def __init__(self, state):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(state))
        self.ttft = Histogram(
            "plm:time_to_first_token_seconds",
            "Time to first token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "plm:inter_token_latency_seconds",
            "Time between tokens of a stream",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "plm:e2e_request_latency_seconds",
            "Request latency, arrival to last token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.cached_ratio = Histogram(
            "plm:request_cached_prompt_ratio",
            "Per finished request: the share of its prompt tokens served from the prefix cache "
            "(0: a miss; near 1: the conversation's replica held its media and history)",
            buckets=CACHED_RATIO_BUCKETS,
            registry=self.registry,
        )
        self.rejected = Counter(
            "plm:request_rejected",
            "Requests refused before running, by reason",
            ["reason"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
