"""Prometheus metrics of one gateway, rendered in the text exposition format.

The gateway's own series (HTTP responses by route and status, prompt and generated
tokens, time to first token, end-to-end latency, open requests) live in a private
registry; the engine's (load, KV blocks, the scheduler's counters) are read from the
scheduler's status reply at scrape time, so a scrape always shows the current load
and several gateways sharing one scheduler each report the same engine numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from tessera.proto.tessera.v1 import engine_pb2

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ENGINE_COUNTERS = (
    ("num_steps", "tessera_engine_steps", "Scheduler steps run"),
    ("num_preemptions", "tessera_engine_preemptions", "Sequences preempted (recompute)"),
    ("num_requests_added", "tessera_engine_requests_added", "Sequences admitted"),
    ("num_requests_finished", "tessera_engine_requests_finished", "Sequences finished"),
    ("num_requests_aborted", "tessera_engine_requests_aborted", "Sequences aborted"),
    ("num_requests_failed", "tessera_engine_requests_failed", "Sequences failed"),
    ("num_requests_rejected", "tessera_engine_requests_rejected", "Sequences rejected"),
    ("num_prompt_tokens", "tessera_engine_prompt_tokens", "Prompt tokens admitted"),
    ("num_generated_tokens", "tessera_engine_generated_tokens", "Tokens generated"),
    ("num_executor_restarts", "tessera_engine_executor_restarts",
     "Executors started to replace one that died or hung"),
    # vLLM's names (vllm:prefix_cache_queries / _hits), counted in tokens
    ("num_prefix_cache_queries", "tessera_prefix_cache_queries",
     "Prompt tokens looked up in the prefix cache at admission"),
    ("num_prefix_cache_hits", "tessera_prefix_cache_hits",
     "Prompt tokens found in the prefix cache at admission"),
)


class Metrics:
    def __init__(self, model_name: str = "") -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_responses = Counter(
            "tessera_http_responses", "HTTP responses by route and status", ["route", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "tessera_prompt_tokens", "Prompt tokens of admitted requests", registry=r
        )
        self.generation_tokens = Counter(
            "tessera_generation_tokens", "Tokens streamed to clients", registry=r
        )
        self.requests = Counter(
            "tessera_requests", "Admitted requests by outcome", ["outcome"], registry=r
        )
        self.time_to_first_token = Histogram(
            "tessera_time_to_first_token_seconds",
            "From arrival at the gateway to the first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            "tessera_e2e_request_latency_seconds",
            "From arrival at the gateway to the last token, requests that ran to the end",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.open_requests = Gauge(
            "tessera_gateway_open_requests", "Requests open on this gateway", registry=r
        )
        self._engine = _EngineCollector()
        r.register(self._engine)

    def track_open_requests(self, count: Callable[[], float]) -> None:
        self.open_requests.set_function(count)

    def first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)

    def request_done(
        self, seconds: float, prompt_tokens: int, generated_tokens: int, completed: bool
    ) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated_tokens)
        self.requests.labels("completed" if completed else "aborted").inc()
        if completed:
            self.e2e_latency.observe(seconds)

    def http_response(self, route: str, status: int) -> None:
        self.http_responses.labels(route, str(status)).inc()

    def render(self, status: engine_pb2.StatusReply | None) -> bytes:
        """The exposition text; ``status`` None means the scheduler did not answer."""
        self._engine.status = status
        return generate_latest(self.registry)


class _EngineCollector:
    """The scheduler's last status reply as gauges and counters."""

    def __init__(self) -> None:
        self.status: engine_pb2.StatusReply | None = None

    def describe(self) -> list[Metric]:
        return []  # names depend on nothing; collected fresh at every scrape

    def collect(self) -> Iterator[Metric]:
        status = self.status
        yield GaugeMetricFamily(
            "tessera_engine_up", "1 when the scheduler answered", value=float(status is not None)
        )
        if status is None:
            return
        load, info = status.load, status.info
        for name, text, value in (
            ("tessera_num_requests_running", "Sequences running", load.num_running),
            ("tessera_num_requests_waiting", "Sequences waiting", load.num_waiting),
            ("tessera_kv_blocks_used", "KV blocks owned by sequences", load.num_kv_blocks_used),
            ("tessera_kv_blocks_free", "KV blocks free", load.num_kv_blocks_free),
            ("tessera_kv_blocks_total", "KV blocks in the pool", info.num_kv_blocks),
            ("tessera_kv_blocks_cached", "KV blocks the prefix cache holds, used or evictable",
             load.num_kv_blocks_cached),
        ):
            yield GaugeMetricFamily(name, text, value=float(value))
        yield GaugeMetricFamily(  # vLLM's vllm:kv_cache_usage_perc: a fraction, 1 is full
            "tessera_kv_cache_usage_perc",
            "Fraction of the KV pool owned by sequences (evictable cached blocks are free)",
            value=load.num_kv_blocks_used / max(1, info.num_kv_blocks),
        )
        for field, name, text in _ENGINE_COUNTERS:
            yield CounterMetricFamily(name, text, value=float(getattr(status.counters, field)))
