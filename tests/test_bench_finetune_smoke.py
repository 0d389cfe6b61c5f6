"""Issue 11's two benchmark scripts run on a CPU: the finetuning benchmark (`--small`) measures every part and
prints the summary keys the issue names, and the loss curves of coserve and PEFT, trained from the same initial
adapter on the same data, agree and fall."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"ft_8b_x_peft", "ft_8b_x_peft_ckpt", "ft_8b_mem_over_peft", "coserve_8b_tpot_p99_over_target",
        "coserve_8b_ft_kept", "ft_activation_x_less_than_peft"}


def test_finetune_bench_small_run_measures_every_part_and_prints_its_summary(tmp_path):
    out = tmp_path / "finetune.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "finetune_bench.py"), "--small", "--out", str(out)],
                   check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert {"device", "date", "versions", "settings", "ours", "hf_peft", "coserving", "ratios"} <= set(result)
    assert set(result["summary"]) == KEYS
    assert all(isinstance(v, float) and math.isfinite(v) for v in result["summary"].values())
    # memory needs a GPU; speeds, the co-served window and the activation bytes kept are measured here too
    for key in ("ft_8b_x_peft", "ft_8b_x_peft_ckpt", "coserve_8b_tpot_p99_over_target", "coserve_8b_ft_kept"):
        assert result["summary"][key] > 0, key
    assert result["ours"]["activation_bytes_per_token"] > 0
    assert {"plain", "checkpointing"} <= set(result["hf_peft"])
    co = result["coserving"]["with_finetuning"]
    assert co["finetune_steps"] >= 1 and co["decode_tokens_per_s"] > 0
    assert result["coserving"]["inference_alone"]["decode_tokens_per_s"] > 0


def test_loss_curves_of_coserve_and_peft_agree_from_the_same_initial_adapter(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "loss_curves.py"), "--out-dir", str(tmp_path),
                           "--steps", "8", "--rows", "8", "--sequences-per-step", "2",
                           "--inference-requests", "2"],
                          check=True, capture_output=True, text=True, timeout=600)
    result = json.loads(proc.stdout)
    ours, peft = result["coserve"], result["peft"]
    assert len(ours) == len(peft) == 8
    assert result["agreement"]["max_rel_diff"] <= 1e-4, (ours, peft)
    assert ours[-1] < 0.8 * ours[0]   # the task is learned, not just replayed
    json_file, png_file = (tmp_path / name for name in result["files"])
    assert json.loads(json_file.read_text())["coserve"] == ours
    assert png_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
