"""Checkpoints: a PEFT adapter folder plus optimizer state (safetensors) and the data position, written to a
temporary folder and renamed into place, so a reader never sees half a checkpoint."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from coserve.engine.finetune.adapter import TrainAdapter
from coserve.engine.lora import read_adapter, write_adapter
from coserve.engine.paths import file_under


@dataclass
class Checkpoint:
    step: int
    path: str          # relative to the data root
    sha256: str        # of adapter_model.safetensors
    time: float
    loss: float | None = None   # of the optimizer step that produced it

    def to_dict(self) -> dict:
        return asdict(self)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(output: Path, data_root: Path, step: int, adapter: TrainAdapter,
                    optimizer: torch.optim.Optimizer, trainer_state: dict, base_model: str) -> Checkpoint:
    final = output / f"checkpoint-{step}"
    tmp = output / f".tmp-checkpoint-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    spec = adapter.spec
    write_adapter(tmp, adapter.weights(), spec.r, spec.alpha, base_model, spec.use_rslora, spec.dropout)
    state = optimizer.state_dict()
    tensors = {f"{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
               for i, s in state["state"].items() for k, v in s.items()}
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step,
                                                        "param_groups": state["param_groups"]}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    losses = trainer_state.get("losses") or []
    return Checkpoint(step, str(final.relative_to(data_root)), sha256_file(final / "adapter_model.safetensors"),
                      time.time(), losses[step - 1] if 0 < step <= len(losses) else None)


def load_checkpoint(folder: Path) -> tuple[dict, dict, dict]:
    """(adapter modules, optimizer state_dict, trainer state) of a checkpoint folder; we write its files as plain
    files, so each must resolve inside the folder (no symlink leads elsewhere)."""
    _, modules = read_adapter(folder)
    trainer = json.loads(file_under(folder, folder / "trainer_state.json").read_text())
    flat = load_file(str(file_under(folder, folder / "optimizer.safetensors")))
    state: dict[int, dict] = {}
    for key, value in flat.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return modules, {"state": state, "param_groups": trainer.pop("param_groups")}, trainer
