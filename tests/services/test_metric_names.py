"""The ``tessera:`` metrics (vLLM's names) as prometheus_client's own parser reads them,
and the Grafana dashboard in deploy/ against what is exported: every expression names a
metric the gateway serves (issue 20). In process: the served path is
tests/services/test_first_contact.py."""

from __future__ import annotations

import json
import re

from prometheus_client.parser import text_string_to_metric_families

from tessera.proto.tessera.v1 import engine_pb2
from tessera.services.metrics import Metrics, RequestTimes
from tests.services.launch import ROOT

MODEL = "smollm2-135m-instruct"
# Family names as the parser reports them (counters without _total).
EXPECTED = {
    "tessera:time_to_first_token_seconds": "histogram",
    "tessera:inter_token_latency_seconds": "histogram",
    "tessera:time_per_output_token_seconds": "histogram",
    "tessera:request_queue_time_seconds": "histogram",
    "tessera:request_prefill_time_seconds": "histogram",
    "tessera:request_decode_time_seconds": "histogram",
    "tessera:e2e_request_latency_seconds": "histogram",
    "tessera:request_prompt_tokens": "histogram",
    "tessera:request_generation_tokens": "histogram",
    "tessera:request_success": "counter",
    "tessera:prompt_tokens": "counter",
    "tessera:generation_tokens": "counter",
    "tessera:num_requests_running": "gauge",
    "tessera:num_requests_waiting": "gauge",
    "tessera:kv_cache_usage_perc": "gauge",
    "tessera:prefix_cache_queries": "counter",
    "tessera:prefix_cache_hits": "counter",
    "tessera:num_preemptions": "counter",
}


def _status() -> engine_pb2.StatusReply:
    status = engine_pb2.StatusReply()
    status.info.num_kv_blocks = 100
    status.load.num_kv_blocks_used = 25
    status.load.num_running = 3
    status.counters.num_prefix_cache_queries = 40
    status.counters.num_prefix_cache_hits = 16
    return status


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_every_vllm_named_metric_parses_with_the_model_label_and_right_values():
    metrics = Metrics(MODEL)
    # one request: arrived at 0, sent at 0.1, waited 0.2 in the scheduler, first token at
    # 0.5, then 4 more tokens, the last at 1.3; two sequences finished stop and length
    times = RequestTimes(arrived_at=0.0, sent_at=0.1, prompt_tokens=7, generation_tokens=5,
                         first_token_at=0.5, last_token_at=1.3, queue_seconds=0.2,
                         finish_reasons=["stop", "length"], completed=True)
    metrics.inter_token(0.2)
    metrics.request_finished(times)
    got = families(metrics.render(_status()).decode())
    for name, kind in EXPECTED.items():
        assert name in got, f"{name} is not exported"
        assert got[name].type == kind, name
        for sample in got[name].samples:
            assert sample.labels.get("model_name") == MODEL, sample

    def value(family: str, suffix: str = "", **labels) -> float:
        return next(s.value for s in got[family].samples
                    if s.name == family + suffix and all(s.labels.get(k) == v
                                                         for k, v in labels.items()))

    assert value("tessera:kv_cache_usage_perc") == 0.25
    assert value("tessera:num_requests_running") == 3
    assert value("tessera:prefix_cache_hits", "_total") == 16
    assert value("tessera:request_success", "_total", finished_reason="stop") == 1
    assert value("tessera:request_success", "_total", finished_reason="length") == 1
    assert value("tessera:request_success", "_total", finished_reason="abort") == 0
    assert abs(value("tessera:time_to_first_token_seconds", "_sum") - 0.5) < 1e-9
    assert abs(value("tessera:request_queue_time_seconds", "_sum") - 0.2) < 1e-9
    assert abs(value("tessera:request_prefill_time_seconds", "_sum") - 0.2) < 1e-9  # .5-.1-.2
    assert abs(value("tessera:request_decode_time_seconds", "_sum") - 0.8) < 1e-9
    assert abs(value("tessera:time_per_output_token_seconds", "_sum") - 0.2) < 1e-9  # .8 / 4
    assert abs(value("tessera:e2e_request_latency_seconds", "_sum") - 1.3) < 1e-9
    assert value("tessera:request_generation_tokens", "_sum") == 5
    assert value("tessera:inter_token_latency_seconds", "_count") == 1


def exported_names(text: str) -> set[str]:
    """Every series name a query may use: the sample names (``_bucket``, ``_total``...)."""
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def dashboard_metric_names() -> set[str]:
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    names = set()
    for expr in exprs:
        names |= set(re.findall(r"tessera:[a-z0-9_]+", expr))
    return names


def test_every_dashboard_expression_names_an_exported_metric():
    metrics = Metrics(MODEL)
    metrics.request_finished(RequestTimes(0.0, 0.1, 3, 2, 0.3, 0.4, 0.1, ["stop"], True))
    exported = exported_names(metrics.render(_status()).decode())
    used = dashboard_metric_names()
    assert len(used) >= 15  # the dashboard covers the set, not a token few
    assert used <= exported, f"the dashboard queries what is not exported: {used - exported}"
    # and each family of the set shows on the dashboard
    shown = {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in used}
    assert set(EXPECTED) <= shown, set(EXPECTED) - shown
