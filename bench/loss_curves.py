"""Loss curves of one small real task (generated sums, "12+35=" -> "47") trained by coserve and by a PEFT training
loop from the same initial adapter, with the same data order, optimizer, learning rate and steps (issue 11).

    python bench/loss_curves.py                  # fp32 on the CPU with the demo model, ~1 minute
    python bench/loss_curves.py --steps 12 --out-dir /tmp/curves

coserve trains through the engine's job API (build_job + add, as the admin API does) while inference requests
run in the same iterations; PEFT writes the initial adapter (save_pretrained, safetensors) that the job starts
from (`init_from`). Writes loss_curves-<device>-<date>.json and .png to the output folder (default
bench/results/) and prints the JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import import_coserve, run_header  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TASK = "two-digit sums: prompt 'a+b=', completion 'a+b' (loss on the completion)"


@dataclass
class CurveConfig:
    """The training both sides run; each field is also a command-line flag."""

    steps: int = 60
    rows: int = 64
    sequences_per_step: int = 4
    lr: float = 3e-3
    r: int = 8
    alpha: float = 16.0
    targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    seed: int = 0
    inference_requests: int = 8      # served in the same iterations as coserve's training


def arithmetic_rows(n: int, seed: int) -> list[dict]:
    """`n` sums of two numbers below 50, in a seeded random order."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(50), rng.randrange(50)
        rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
    return rows


def write_initial_adapter(model_dir: Path, out: Path, cfg: CurveConfig) -> None:
    """PEFT's own initialisation (seeded), saved as a PEFT folder: the one starting point of both sides."""
    from peft import get_peft_model

    torch.manual_seed(cfg.seed)
    model = get_peft_model(hf_model(model_dir), lora_config(cfg))
    model.save_pretrained(str(out), safe_serialization=True)


def hf_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                attn_implementation="eager")


def lora_config(cfg: CurveConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=cfg.targets.split(","))


def coserve_losses(model_dir: Path, root: Path, cfg: CurveConfig) -> list[float]:
    """Train through the engine's job API with inference requests in the same iterations; the loss of each step."""
    from coserve.engine.config import EngineConfig
    from coserve.engine.engine import LLMEngine
    from coserve.engine.finetune.manager import build_job
    from coserve.engine.finetune.spec import JobSpec
    from coserve.engine.sampling import SamplingParams

    engine = LLMEngine(EngineConfig(model=str(model_dir), data_root=str(root), device="cpu", tpot_slo_ms=1e4))
    spec = JobSpec.model_validate({
        "id": "curve", "dataset": {"path": "task.jsonl", "format": "prompt_completion"}, "output": "curve",
        "init_from": "init", "lora": {"r": cfg.r, "alpha": cfg.alpha, "target_modules": cfg.targets.split(",")},
        "training": {"optimizer": "adamw", "lr": cfg.lr, "max_steps": cfg.steps, "shuffle": False,
                     "epochs": -(-cfg.steps * cfg.sequences_per_step // cfg.rows), "seed": cfg.seed,
                     "sequences_per_step": cfg.sequences_per_step}})
    job = build_job(engine, spec)
    engine.finetune.add(job)
    prompts = [engine.tokenizer(f"{a} plus {a} is").input_ids for a in range(cfg.inference_requests)]
    sent = 0
    while engine.has_work():
        if sent < len(prompts) and len(engine.scheduler.running) < 2:
            engine.add_request(f"inf{sent}", prompts[sent], SamplingParams(max_tokens=8, temperature=0.7, seed=sent))
            sent += 1
        engine.step()
    if job.state.value != "succeeded":
        raise RuntimeError(f"the coserve job ended {job.state.value}: {job.error}")
    return list(job.losses)


def peft_losses(model_dir: Path, root: Path, rows: list[dict], cfg: CurveConfig) -> list[float]:
    """The loop a PEFT user writes: the saved initial adapter, batches of `sequences_per_step` right-padded
    examples in file order, loss on the completion tokens, torch AdamW with the job's settings."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = PeftModel.from_pretrained(hf_model(model_dir), str(root / "init"), is_trainable=True).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.999),
                            eps=1e-8, weight_decay=0.0)
    examples = []
    for row in rows:
        prompt = tok(row["prompt"], add_special_tokens=False).input_ids
        completion = tok(row["completion"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        examples.append((prompt + completion, [-100] * len(prompt) + completion))
    losses = []
    sps = cfg.sequences_per_step
    for step in range(cfg.steps):
        batch = [examples[(step * sps + i) % len(examples)] for i in range(sps)]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([i + [tok.eos_token_id] * (width - len(i)) for i, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def compare(ours: list[float], peft: list[float]) -> dict:
    diffs = [abs(a - b) / abs(b) for a, b in zip(ours, peft)]
    return {"max_rel_diff": max(diffs), "mean_rel_diff": sum(diffs) / len(diffs), "steps_compared": len(diffs)}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    steps = range(1, len(result["coserve"]) + 1)
    ax.plot(steps, result["coserve"], label="coserve (job API, co-served with inference)", linewidth=2.2)
    ax.plot(steps, result["peft"], label="transformers + PEFT + torch AdamW", linestyle="--", marker=".")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean over completion tokens)")
    ax.set_title(f"{result['task_short']}: same initial adapter, data order and optimizer\n"
                 f"{result['device']}, {result['date']}, max relative difference "
                 f"{result['agreement']['max_rel_diff']:.1e}", fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: CurveConfig, out_dir: Path) -> dict:
    from coserve.engine.demo_model import write_tiny_model

    if cfg.rows % cfg.sequences_per_step:
        raise ValueError("rows must be a multiple of sequences_per_step, so every step holds as many sequences")
    rows = arithmetic_rows(cfg.rows, cfg.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = write_tiny_model(root / "model")
        (root / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        write_initial_adapter(model_dir, root / "init", cfg)
        ours = coserve_losses(model_dir, root, cfg)
        peft = peft_losses(model_dir, root, rows, cfg)
    result = {**run_header("loss_curves", "cpu"), "task": TASK, "task_short": "two-digit sums",
              "model": "the demo model (coserve demo-model), fp32", "settings": dataclasses.asdict(cfg),
              "coserve": ours, "peft": peft, "agreement": compare(ours, peft)}
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"loss_curves-cpu-{result['date']}"
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot(result, out_dir / f"{stem}.png")
    result["files"] = [f"{stem}.json", f"{stem}.png"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    for f in dataclasses.fields(CurveConfig):
        default = getattr(CurveConfig, f.name)
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(default), default=default)
    args = parser.parse_args()
    import_coserve()
    cfg = CurveConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(CurveConfig)})
    print(json.dumps(run(cfg, args.out_dir), indent=2))


if __name__ == "__main__":
    main()
