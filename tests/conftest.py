"""Shared fixtures: tiny Hugging Face model directories built by the project itself, and engines over them."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():   # Triton kernels run in Triton's interpreter on a CPU (set before they import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from coserve.engine.demo_model import TinyModelSpec, write_tiny_model  # noqa: E402

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
