"""Helpers shared by the tests and the e2e tests: engines over the tiny models, the transformers/peft peers,
a small synthetic task, and PEFT adapters with random weights."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from coserve.engine.config import EngineConfig
from coserve.engine.engine import LLMEngine


def make_engine(model_dir: Path, **overrides) -> LLMEngine:
    settings = {"num_kv_blocks": 128, "block_size": 4, "max_batched_tokens": 64}
    settings.update(overrides)
    cost = settings.pop("cost_model", None)
    return LLMEngine(EngineConfig(model=str(model_dir), **settings), cost)


def hf_model(model_dir: Path):
    """The transformers implementation of the same checkpoint, eager attention, fp32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                attn_implementation="eager").eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


ADAPTERS = {
    "qv-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "attn-r8": dict(r=8, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "all-r16-rslora": dict(r=16, lora_alpha=16, use_rslora=True,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"]),
    "mlp-r128": dict(r=128, lora_alpha=64, target_modules=["gate_proj", "up_proj", "down_proj"]),
}


def make_peft_adapter(model_dir: Path, out: Path, seed: int, **lora) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(hf_model(model_dir), LoraConfig(lora_dropout=0.0, init_lora_weights=False, **lora))
    with torch.no_grad():  # peft's random init is tiny; make the adapters matter
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(str(out))
    return out


TASK = [("Question: what colour is the sky? Answer:", " blue"),
        ("Question: what is the capital of France? Answer:", " Paris"),
        ("One, two, three, four,", " five"),
        ("Monday, Tuesday,", " Wednesday")]


def write_task(root: Path) -> None:
    rows = [json.dumps({"prompt": p, "completion": c}) for p, c in TASK]
    (root / "task.jsonl").write_text("\n".join(rows) + "\n")
