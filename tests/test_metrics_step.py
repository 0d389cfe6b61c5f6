"""Each engine iteration's counts reach the series that the dashboard and the benchmarks read."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from coserve.engine.engine import StepStats
from coserve.engine.metrics import Metrics


def samples(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}


def test_an_iteration_counts_tokens_units_captures_its_time_by_what_it_held_and_standing_aside():
    metrics = Metrics()
    metrics.observe_step(StepStats(prefill_tokens=7, decode_tokens=3, finetune_tokens=40, backward_units=5,
                                   duration_s=0.031, unit_captures=2))
    metrics.observe_step(StepStats(decode_tokens=4, duration_s=0.009, finetune_yielded=True))
    metrics.observe_step(StepStats())   # an iteration that ran nothing is not timed
    got = samples(metrics)
    assert got[("coserve_tokens_total", (("kind", "prompt"),))] == 7
    assert got[("coserve_tokens_total", (("kind", "generation"),))] == 7
    assert got[("coserve_tokens_total", (("kind", "finetune"),))] == 40
    assert got[("coserve_finetune_backward_units_total", ())] == 5
    assert got[("coserve_finetune_unit_captures_total", ())] == 2
    assert got[("coserve_finetune_aside_iterations_total", ())] == 1
    assert got[("coserve_iteration_seconds_count", (("holds", "both"),))] == 1
    assert got[("coserve_iteration_seconds_sum", (("holds", "both"),))] == 0.031
    assert got[("coserve_iteration_seconds_count", (("holds", "inference"),))] == 1
    assert ("coserve_iteration_seconds_count", (("holds", "finetune"),)) not in got
