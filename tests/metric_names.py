"""The metric names the engine exports and the names a PromQL expression queries, so dashboards and alerts can be
checked against what a scrape of the engine holds."""
from __future__ import annotations

import re

from coserve.engine.metrics import Metrics

# The Gateway API Inference Extension's model-server protocol, under vLLM's names (what its endpoint picker reads
# by default); the engine's own tests check that /metrics exports them.
PROTOCOL_METRICS = {"vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                    "vllm:lora_requests_info"}
_SAMPLE_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                    "gauge": ("",), "summary": ("_count", "_sum", "_created", "")}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "sum", "avg", "min", "max", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
             "count_values", "group", "inf", "nan"}


def exported_metric_names() -> set[str]:
    """Every sample name a scrape of the engine can hold (a histogram's _bucket/_count/_sum, a counter's _total)."""
    names = set()
    for family in Metrics().registry.collect():
        names.update(family.name + suffix for suffix in _SAMPLE_SUFFIXES[family.type])
    return names


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: what is left once strings, label matchers, ranges, grouping
    labels, Grafana variables, function calls and keywords are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                      # string literals
    expr = re.sub(r"\{[^{}]*\}", " ", expr)                               # label matchers
    expr = re.sub(r"\[[^\[\]]*\]", " ", expr)                             # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", expr)
    expr = re.sub(r"\$\w+", " ", expr)                                     # Grafana variables
    expr = re.sub(r"\blabel_values\s*\(([^(),]*),\s*\w+\s*\)", r"(\1)", expr)   # Grafana's (metric, label)
    names = set()
    for match in re.finditer(r"(?<![\w:.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", expr):
        name, call = match.group(1), match.group(2)
        if not call and name.lower() not in _KEYWORDS:
            names.add(name)
    return names
