"""The Grafana dashboard shipped in the chart parses, and every metric it queries is one the engine exports (or
one of the Gateway API Inference Extension's protocol metrics); its SLO targets are the engine's bucket bounds."""
from __future__ import annotations

import json
from pathlib import Path

from coserve.engine.metrics import LATENCY_BUCKETS
from metric_names import PROTOCOL_METRICS, exported_metric_names, promql_metric_names

DASHBOARD = Path(__file__).resolve().parents[1] / "charts" / "coserve" / "dashboards" / "coserve.json"


def queries(dashboard: dict) -> list[str]:
    """Every PromQL expression of the dashboard: its panels' targets and its query variables."""
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_promql_names_are_read_as_a_scrape_would_hold_them():
    expr = ('histogram_quantile(0.95, sum by (le, pool) (rate(coserve_time_to_first_token_seconds_bucket'
            '{namespace=~"$namespace",le="0.05"}[$__rate_interval]))) / on (pod) group_left '
            'max by (pod, max_lora) (vllm:lora_requests_info) unless label_values(up, job)')
    assert promql_metric_names(expr) == {"coserve_time_to_first_token_seconds_bucket", "vllm:lora_requests_info",
                                         "up"}
    assert {"coserve_tokens_total", "coserve_time_per_output_token_seconds_count",
            "coserve_kv_cache_usage_ratio"} <= exported_metric_names()


def test_dashboard_queries_only_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = queries(dashboard)
    assert len(exprs) >= 15
    used = set().union(*(promql_metric_names(e) for e in exprs))
    assert used - (exported_metric_names() | PROTOCOL_METRICS) == set()
    # TTFT, TPOT, finetuning tokens/s and progress, KV, adapter slots, how full iterations run, standing aside
    for needed in ("coserve_time_to_first_token_seconds_bucket", "coserve_time_per_output_token_seconds_bucket",
                   "coserve_tokens_total", "coserve_finetune_step", "coserve_kv_cache_usage_ratio",
                   "vllm:lora_requests_info", "coserve_iteration_seconds_count",
                   "coserve_finetune_aside_iterations_total"):
        assert needed in used, needed
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_dashboard_slo_targets_are_histogram_bucket_bounds():
    bounds = {str(b) for b in LATENCY_BUCKETS}   # how prometheus_client writes `le`
    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    for name in ("tpot_slo", "ttft_slo"):
        values = {o["value"] for o in variables[name]["options"]}
        assert values and values <= bounds, (name, values - bounds)
