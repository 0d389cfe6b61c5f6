"""Load a Hugging Face model directory (config.json + single or sharded safetensors). Never unpickles."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from coserve.engine.model.config import ModelConfig
from coserve.engine.model.llama import CausalLM
from coserve.engine.paths import file_under, is_under

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files, from the shard index when there is one."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        bad = [n for n in names if not isinstance(n, str) or Path(n).name != n or n in ("", ".", "..")]
        if bad:
            raise ValueError(f"{index.name}: shard names must be file names in the model folder, got {bad[:3]}")
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt")]
        hint = f" (found {pickled}: pickle checkpoints are refused; convert them to safetensors)" if pickled else ""
        raise FileNotFoundError(f"no .safetensors weights in {model_dir}{hint}")
    return files


def check_under_root(model_dir: Path, files: list[Path], data_root: str | Path | None) -> None:
    """A model folder inside the data root may not reach files outside it through symlinks."""
    if data_root is None or not is_under(model_dir.resolve(), Path(data_root).resolve()):
        return
    for file in files:
        file_under(data_root, file)


def load_model(model_dir: str | Path, device: str = "cpu", dtype: str = "float32", fast: bool = False,
               data_root: str | Path | None = None) -> CausalLM:
    """Build the decoder for the directory's config and copy every checkpoint tensor into it by its Hugging Face
    name (q/k/v and gate/up land in their slices of the merged projections)."""
    model_dir = Path(model_dir)
    check_under_root(model_dir, [model_dir / "config.json"], data_root)
    cfg = ModelConfig.from_dir(model_dir)
    files = safetensors_files(model_dir)
    check_under_root(model_dir, files, data_root)
    with torch.device("meta"):
        model = CausalLM(cfg, fast)
    model = model.to_empty(device=device).to(DTYPES[dtype])
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_rotary()
    params = model.hf_tensors()
    loaded: set[str] = set()
    for file in files:
        try:
            loaded |= _copy_tensors(file, params, cfg)
        except SafetensorError as exc:
            raise ValueError(f"{file.name} is not a valid safetensors file ({exc})") from exc
    missing = set(params) - loaded
    if missing:
        raise ValueError(f"checkpoint in {model_dir} lacks tensors: {sorted(missing)[:5]}")
    model.eval().requires_grad_(False)
    return model


def _copy_tensors(file: Path, params: dict[str, torch.Tensor], cfg: ModelConfig) -> set[str]:
    """Copy one weight file's tensors into the model by name; returns the names copied."""
    loaded = set()
    with safe_open(str(file), framework="pt", device="cpu") as f:
        for name in f.keys():
            if name not in params:
                if "rotary_emb" in name or (cfg.tie_word_embeddings and name == "lm_head.weight"):
                    continue
                raise ValueError(f"{file.name}: unexpected tensor {name!r} for a {cfg.arch} model")
            tensor = f.get_tensor(name)
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise ValueError(f"{file.name}: {name} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(params[name].shape)}")
            with torch.no_grad():
                params[name].copy_(tensor)
            loaded.add(name)
    return loaded
