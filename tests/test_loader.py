"""The loader reads single and sharded safetensors, refuses pickles and mismatched checkpoints."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from coserve.engine.demo_model import TinyModelSpec, write_tiny_model
from coserve.engine.model.config import ModelConfig
from coserve.engine.model.loader import load_model


def test_sharded_checkpoint_loads_the_same_weights(llama_dir, tmp_path):
    sharded = tmp_path / "sharded"
    shutil.copytree(llama_dir, sharded)
    weights = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    names = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in halves.items():
        save_file({k: weights[k] for k in keys}, str(sharded / file))
    index = {"weight_map": {k: f for f, keys in halves.items() for k in keys}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    a, b = load_model(llama_dir), load_model(sharded)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name


def test_pickle_only_directory_is_refused(llama_dir, tmp_path):
    shutil.copy(llama_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="pickle checkpoints are refused"):
        load_model(tmp_path)


def test_mismatched_checkpoint_is_refused(llama_dir, tmp_path):
    shutil.copytree(llama_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m/config.json").read_text())
    cfg["hidden_size"] = 32
    (tmp_path / "m/config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        load_model(tmp_path / "m")


def test_unsupported_architecture_is_named(tmp_path):
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        ModelConfig.from_hf_dict({"architectures": ["GPT2LMHeadModel"]})


def test_tiny_model_is_deterministic(tmp_path):
    a = write_tiny_model(tmp_path / "a", TinyModelSpec(seed=3))
    b = write_tiny_model(tmp_path / "b", TinyModelSpec(seed=3))
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
