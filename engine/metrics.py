"""Prometheus metrics: latency histograms observed per request, gauges read at scrape time. The gauges an
inference gateway's endpoint picker scrapes (Gateway API Inference Extension model server protocol) also
appear under vLLM's names, the picker's defaults, so a pool of engines needs no picker configuration."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from coserve.engine.engine import StepStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITERATION_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.045, 0.05, 0.06, 0.08, 0.1, 0.2, 0.5)


@dataclass
class GatewayState:
    """What the endpoint picker reads of one engine at a scrape."""

    model: str
    running: int
    waiting: int
    kv_usage: float                    # fraction of KV blocks in use, 0..1
    max_lora: int                      # adapter slots that serving can use (those training jobs hold excluded)
    running_adapters: list[str]        # loaded in a slot, so a request naming one is served at once
    waiting_adapters: list[str]        # named by queued requests
    block_size: int
    num_blocks: int


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("coserve_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.tpot = Histogram("coserve_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("coserve_request_latency_seconds", "End-to-end request latency",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("coserve_tokens", "Tokens processed, by kind", ["kind"], registry=r)
        self.requests = Counter("coserve_requests", "Finished requests, by finish reason", ["reason"], registry=r)
        self.running = Gauge("coserve_requests_running", "Requests being processed", registry=r)
        self.waiting = Gauge("coserve_requests_waiting", "Requests waiting for KV blocks or a batch slot",
                             registry=r)
        self.kv_usage = Gauge("coserve_kv_cache_usage_ratio", "Fraction of KV blocks in use", registry=r)
        self.backward_units = Counter("coserve_finetune_backward_units", "Finetuning backward units run",
                                      registry=r)
        self.iteration = Histogram("coserve_iteration_seconds", "Engine iterations' wall time, by what they held "
                                   "(inference, finetune or both): how full co-served iterations run against "
                                   "the latency target", ["holds"], buckets=ITERATION_BUCKETS, registry=r)
        self.unit_captures = Counter("coserve_finetune_unit_captures", "Finetuning backward units whose CUDA graph "
                                     "was captured (host time, once per unit shape and layer)", registry=r)
        self.finetune_aside = Counter("coserve_finetune_aside_iterations", "Iterations in which finetuning stood "
                                      "aside because requests waited for admission", registry=r)
        self.jobs = Gauge("coserve_finetune_jobs", "Finetuning jobs, by state", ["state"], registry=r)
        self.job_step = Gauge("coserve_finetune_step", "Optimizer steps done, by job", ["job"], registry=r)
        self.job_loss = Gauge("coserve_finetune_loss", "Loss of the last optimizer step, by job", ["job"],
                              registry=r)
        self.adapters = Gauge("coserve_adapters_loaded", "LoRA adapters loaded", registry=r)
        self.cost_error = Gauge("coserve_cost_model_relative_error", "Median |predicted - measured| / measured "
                                "iteration time over the cost model's recent window", registry=r)
        self.cost_margin = Gauge("coserve_cost_model_margin", "Factor the planner applies to predicted "
                                 "iteration times (the recent 99th percentile of measured / predicted)", registry=r)
        self._job_ids: set[str] = set()
        label = ["model_name"]
        self.vllm_waiting = Gauge("vllm:num_requests_waiting", "Requests waiting for KV blocks or a batch slot "
                                  "(model server protocol: TotalQueuedRequests)", label, registry=r)
        self.vllm_running = Gauge("vllm:num_requests_running", "Requests being processed (model server "
                                  "protocol: TotalRunningRequests)", label, registry=r)
        self.vllm_kv = Gauge("vllm:kv_cache_usage_perc", "Fraction of KV blocks in use, 0 to 1 (model server "
                             "protocol: KVCacheUtilization)", label, registry=r)
        self.vllm_gpu_kv = Gauge("vllm:gpu_cache_usage_perc", "Fraction of KV blocks in use, 0 to 1 (the name "
                                 "earlier pickers scrape)", label, registry=r)
        self.lora_info = Gauge("vllm:lora_requests_info", "LoRA adapters: loaded ones (running), those queued "
                               "requests name (waiting) and the slots serving can use (max_lora); the value is the "
                               "time of the scrape", ["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
                               registry=r)
        self.cache_info = Gauge("vllm:cache_config_info", "KV cache layout, in labels", ["block_size",
                                                                                         "num_gpu_blocks"],
                                registry=r)

    def observe_step(self, stats: StepStats) -> None:
        """One engine iteration: tokens by kind, backward units and graph captures, its wall time by what it held,
        and whether finetuning stood aside."""
        self.tokens.labels("prompt").inc(stats.prefill_tokens)
        self.tokens.labels("generation").inc(stats.decode_tokens)
        self.tokens.labels("finetune").inc(stats.finetune_tokens)
        self.backward_units.inc(stats.backward_units)
        self.unit_captures.inc(stats.unit_captures)
        if stats.holds is not None:
            self.iteration.labels(stats.holds).observe(stats.duration_s)
        if stats.finetune_yielded:
            self.finetune_aside.inc()

    def set_gateway(self, state: GatewayState) -> None:
        """The picker's gauges. The LoRA info keeps a single series (the picker takes the newest by value),
        replaced whenever its labels change."""
        self.vllm_waiting.labels(state.model).set(state.waiting)
        self.vllm_running.labels(state.model).set(state.running)
        self.vllm_kv.labels(state.model).set(state.kv_usage)
        self.vllm_gpu_kv.labels(state.model).set(state.kv_usage)
        self.lora_info.clear()
        self.lora_info.labels(str(state.max_lora), ",".join(state.running_adapters),
                              ",".join(state.waiting_adapters)).set(time.time())
        self.cache_info.clear()
        self.cache_info.labels(str(state.block_size), str(state.num_blocks)).set(1)

    def set_jobs(self, states: dict[str, int], jobs: dict[str, tuple[int, float | None]]) -> None:
        """Job counts by state and each listed job's (step, loss); a job no longer listed loses its series,
        so forgotten jobs do not pile up in every scrape."""
        for state, count in states.items():
            self.jobs.labels(state).set(count)
        for job_id in self._job_ids - jobs.keys():
            self.job_step.remove(job_id)
            self.job_loss.remove(job_id)
        for job_id, (step, loss) in jobs.items():
            self.job_step.labels(job_id).set(step)
            if loss is not None:
                self.job_loss.labels(job_id).set(loss)
        self._job_ids = set(jobs)

    def render(self) -> bytes:
        return generate_latest(self.registry)
