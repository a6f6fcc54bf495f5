"""Prometheus metrics of one gateway, rendered in the text exposition format.

Two families. The ``tessera:`` series carry the names vLLM users know (``vllm:`` there),
each with a ``model_name`` label, so that dashboards and alerts written for vLLM need
only the prefix changed (``deploy/grafana-dashboard.json`` is one):

    tessera:time_to_first_token_seconds     arrival at the gateway -> first token
    tessera:inter_token_latency_seconds     between two outputs of one stream
    tessera:time_per_output_token_seconds   a request's decode time / (its tokens - 1)
    tessera:request_queue_time_seconds      waiting in the scheduler (it reports it)
    tessera:request_prefill_time_seconds    sent to the scheduler -> first token, less the
                                            queue time (the prompt's computation)
    tessera:request_decode_time_seconds     first token -> last token
    tessera:e2e_request_latency_seconds     arrival -> last token
    tessera:request_prompt_tokens / tessera:request_generation_tokens (histograms)
    tessera:request_success_total{finished_reason}   stop | length | abort
    tessera:prompt_tokens_total, tessera:generation_tokens_total
    tessera:num_requests_running, tessera:num_requests_waiting, tessera:kv_cache_usage_perc
    tessera:prefix_cache_queries_total, tessera:prefix_cache_hits_total (tokens)

The ``tessera_`` series are the older names, kept for existing scrapes.

The gateway's own series (HTTP responses by route and status, prompt and generated
tokens, time to first token, end-to-end latency, open requests) live in a private
registry; the engine's (load, KV blocks, the scheduler's counters) are read from the
scheduler's status reply at scrape time, so a scrape always shows the current load
and several gateways sharing one scheduler each report the same engine numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from tessera.proto.tessera.v1 import engine_pb2

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                          1.0, 2.5, 5.0)
_LENGTH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000,
                   100000)
PREFIX = "tessera:"
SUCCESS_REASONS = ("stop", "length", "abort")
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
        self._engine = _EngineCollector(model_name)
        r.register(self._engine)
        self._init_vllm_names()

    def _init_vllm_names(self) -> None:
        r, label = self.registry, ["model_name"]

        def histogram(name: str, text: str, buckets: tuple) -> Histogram:
            return Histogram(PREFIX + name, text, label, buckets=buckets, registry=r
                             ).labels(self.model_name)

        self.v_ttft = histogram("time_to_first_token_seconds",
                                "Arrival at the gateway to the first token", _LATENCY_BUCKETS)
        self.v_itl = histogram("inter_token_latency_seconds",
                               "Time between two outputs of one stream", _TOKEN_LATENCY_BUCKETS)
        self.v_tpot = histogram("time_per_output_token_seconds",
                                "A request's decode time over its output tokens after the first",
                                _TOKEN_LATENCY_BUCKETS)
        self.v_queue = histogram("request_queue_time_seconds",
                                 "Time waiting in the scheduler before the first step",
                                 _LATENCY_BUCKETS)
        self.v_prefill = histogram("request_prefill_time_seconds",
                                   "Sent to the scheduler to the first token, less the queue time",
                                   _LATENCY_BUCKETS)
        self.v_decode = histogram("request_decode_time_seconds",
                                  "First token to last token", _LATENCY_BUCKETS)
        self.v_e2e = histogram("e2e_request_latency_seconds",
                               "Arrival at the gateway to the last token", _LATENCY_BUCKETS)
        self.v_prompt_len = histogram("request_prompt_tokens", "Prompt tokens of a request",
                                      _LENGTH_BUCKETS)
        self.v_gen_len = histogram("request_generation_tokens",
                                   "Generated tokens of a request", _LENGTH_BUCKETS)
        success = Counter(PREFIX + "request_success", "Finished sequences by finish reason",
                          ["model_name", "finished_reason"], registry=r)
        self.v_success = {reason: success.labels(self.model_name, reason)
                          for reason in SUCCESS_REASONS}
        self.v_prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished "
                                       "requests", label, registry=r).labels(self.model_name)
        self.v_generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens of "
                                           "finished requests", label, registry=r
                                           ).labels(self.model_name)

    def inter_token(self, seconds: float) -> None:
        self.v_itl.observe(seconds)

    def request_finished(self, t: RequestTimes) -> None:
        """The ``tessera:`` histograms of one request that ran (rejected ones never did)."""
        self.v_prompt_len.observe(t.prompt_tokens)
        self.v_gen_len.observe(t.generation_tokens)
        self.v_prompt_tokens.inc(t.prompt_tokens)
        self.v_generation_tokens.inc(t.generation_tokens)
        for reason in t.finish_reasons:
            if reason in self.v_success:
                self.v_success[reason].inc()
        if t.first_token_at is None:
            return
        self.v_ttft.observe(t.first_token_at - t.arrived_at)
        if t.queue_seconds is not None:
            self.v_queue.observe(t.queue_seconds)
            self.v_prefill.observe(max(0.0, t.first_token_at - t.sent_at - t.queue_seconds))
        if t.completed and t.last_token_at is not None:
            decode = t.last_token_at - t.first_token_at
            self.v_decode.observe(decode)
            self.v_e2e.observe(t.last_token_at - t.arrived_at)
            if t.generation_tokens > 1:
                self.v_tpot.observe(decode / (t.generation_tokens - 1))

    def track_open_requests(self, count: Callable[[], float]) -> None:
        self.open_requests.set_function(count)

    def track_replicas(self, views: Callable[[], list]) -> None:
        """Per engine replica series, labelled by its scheduler address, from the engine
        pool's views (services.engine_pool.ReplicaView) at each scrape."""
        self.registry.register(_ReplicaCollector(views))

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


@dataclass(slots=True)
class RequestTimes:
    """What a request's metrics are made of (monotonic seconds)."""

    arrived_at: float  # at the gateway
    sent_at: float  # to the scheduler, after tokenization
    prompt_tokens: int
    generation_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    queue_seconds: float | None = None  # as the scheduler reported it
    finish_reasons: list[str] = field(default_factory=list)  # one per finished sequence
    completed: bool = False  # every sequence ran to its end
    rejected: bool = False  # the scheduler refused it: it never ran, nothing is counted


class _EngineCollector:
    """The scheduler's last status reply as gauges and counters."""

    def __init__(self, model_name: str = "") -> None:
        self.status: engine_pb2.StatusReply | None = None
        self.model_name = model_name

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
        for counter, name, text in _ENGINE_COUNTERS:
            yield CounterMetricFamily(name, text, value=float(getattr(status.counters, counter)))
        labels = ["model_name"]
        for name, text, value in (
            ("num_requests_running", "Sequences running", load.num_running),
            ("num_requests_waiting", "Sequences waiting", load.num_waiting),
            ("kv_cache_usage_perc", "Fraction of the KV pool owned by sequences (1 is full)",
             load.num_kv_blocks_used / max(1, info.num_kv_blocks)),
        ):
            gauge = GaugeMetricFamily(PREFIX + name, text, labels=labels)
            gauge.add_metric([self.model_name], float(value))
            yield gauge
        for counter, name, text in (
            ("num_prefix_cache_queries", "prefix_cache_queries",
             "Prompt tokens looked up in the prefix cache"),
            ("num_prefix_cache_hits", "prefix_cache_hits",
             "Prompt tokens found in the prefix cache"),
            ("num_preemptions", "num_preemptions", "Sequences preempted (recompute)"),
        ):
            family = CounterMetricFamily(PREFIX + name, text, labels=labels)
            family.add_metric([self.model_name], float(getattr(status.counters, counter)))
            yield family


class _ReplicaCollector:
    """Each engine replica's health, load and routing counts (issue 17)."""

    def __init__(self, views: Callable[[], list]) -> None:
        self.views = views

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        views = self.views()
        gauges = {
            "up": ("tessera_replica_up", "1 while the replica serves (answers, with an executor)"),
            "num_open": ("tessera_replica_open_sequences",
                         "Sequences of this gateway open on the replica"),
            "num_running": ("tessera_replica_requests_running", "Sequences running, last report"),
            "num_waiting": ("tessera_replica_requests_waiting", "Sequences waiting, last report"),
            "num_waiting_tokens": ("tessera_replica_waiting_tokens",
                                   "Tokens of the waiting sequences, last report"),
            "num_kv_blocks_used": ("tessera_replica_kv_blocks_used",
                                   "KV blocks owned by sequences, last report"),
        }
        counters = {
            "num_routed": ("tessera_replica_routed_requests",
                           "Requests this gateway routed to the replica"),
            "num_resumed": ("tessera_replica_resumed_sequences",
                            "Sequences resumed on the replica after another one was lost"),
        }
        families = {
            key: GaugeMetricFamily(name, text, labels=["replica"])
            for key, (name, text) in gauges.items()
        }
        families.update({
            key: CounterMetricFamily(name, text, labels=["replica"])
            for key, (name, text) in counters.items()
        })
        for v in views:
            load = v.status.load if v.status is not None else None
            values = {
                "up": float(v.serving),
                "num_open": v.num_open,
                "num_routed": v.num_routed,
                "num_resumed": v.num_resumed,
            }
            for key in ("num_running", "num_waiting", "num_waiting_tokens", "num_kv_blocks_used"):
                values[key] = getattr(load, key) if load is not None else 0
            for key, value in values.items():
                families[key].add_metric([v.address], float(value))
        yield from families.values()
