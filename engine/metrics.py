"""Prometheus metrics: latency histograms observed per request, gauges read at scrape time."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


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
