"""Shared fixtures: tiny Hugging Face model directories built by the project itself, and engines over them."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coserve.engine.config import EngineConfig
from coserve.engine.demo_model import TinyModelSpec, write_tiny_model
from coserve.engine.engine import LLMEngine

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": write_tiny_model(root / "llama", TinyModelSpec(arch="llama", seed=0)),
        "qwen2": write_tiny_model(root / "qwen2", TinyModelSpec(arch="qwen2", seed=1, tie_word_embeddings=True)),
        "mistral": write_tiny_model(root / "mistral", TinyModelSpec(arch="mistral", seed=2, num_kv_heads=4)),
    }


@pytest.fixture(scope="session")
def llama_dir(model_dirs: dict[str, Path]) -> Path:
    return model_dirs["llama"]


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
