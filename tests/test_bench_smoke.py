"""The inference benchmark's script runs end to end on a CPU (`--small`) and prints every summary key issue 10
names as a number, so the harness cannot rot between GPU runs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"decode_8b_b1_x_floor", "decode_8b_b64_x_floor", "decode_8b_b64_x_hf", "decode_1p5b_b1_ms",
        "decode_1p5b_b64_ms", "prefill_8b_matmul_fraction", "multi_lora_32_over_base", "prefix_cache_ttft_speedup"}


def test_inference_bench_small_run_prints_its_summary(tmp_path):
    out = tmp_path / "inference.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "inference_bench.py"), "--small", "--out", str(out)],
                   check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert {"device", "date", "versions", "ceilings"} <= set(result)
    assert set(result["summary"]) == KEYS
    assert all(isinstance(v, float) and v > 0 for v in result["summary"].values())


def test_delivery_bench_times_the_engines_hand_over_against_one_wake_up_per_output(tmp_path):
    out = tmp_path / "delivery.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "delivery_bench.py"), "--outputs", "8,32",
                    "--iterations", "5", "--out", str(out)], check=True, capture_output=True, timeout=120)
    result = json.loads(out.read_text())
    assert {"device", "date", "versions"} <= set(result) and [r["outputs"] for r in result["runs"]] == [8, 32]
    for run in result["runs"]:
        assert set(run["engine_thread_us_per_iteration"]) == {"per_output", "one_wake_up"}
        assert all(v > 0 for v in run["engine_thread_us_per_iteration"].values())
