"""Checkpoints: a PEFT adapter folder plus optimizer state (safetensors), the data position and a SHA256SUMS
file, written to a temporary folder, flushed and renamed into place, so a reader never sees half a checkpoint.
Before a checkpoint is resumed from, its hashes, trainer state and tensors are verified."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from coserve.engine.finetune.adapter import TrainAdapter
from coserve.engine.finetune.record import fsync_tree
from coserve.engine.finetune.spec import LoRASpec, TrainingSpec
from coserve.engine.lora import read_adapter, write_adapter
from coserve.engine.paths import file_under

SUMS_FILE = "SHA256SUMS"
ADAPTER_FILE = "adapter_model.safetensors"
FILES = ("adapter_config.json", ADAPTER_FILE, "optimizer.safetensors", "trainer_state.json")
FOLDER = re.compile(r"^checkpoint-(\d+)$")
ADAMW_STATE = {"step", "exp_avg", "exp_avg_sq"}


class CheckpointError(ValueError):
    """A checkpoint that must not be resumed from; the message says what is wrong with it."""


class NonFiniteError(ValueError):
    """Weights or optimizer state that hold NaN or infinity: never written, never served."""


@dataclass
class Checkpoint:
    step: int
    path: str          # relative to the data root
    sha256: str        # of adapter_model.safetensors
    time: float
    loss: float | None = None   # of the optimizer step that produced it

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ResumeState:
    """A verified checkpoint, loaded: what a resumed job starts from."""

    folder: Path
    step: int
    tokens: int
    losses: list[float]
    modules: dict[str, dict[str, torch.Tensor]]
    optimizer: dict
    sha256: str


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def all_finite(tensors) -> bool:
    """A few launches and one sync per device for any number of tensors (the optimizer step checks hundreds)."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        if t.is_floating_point():
            groups.setdefault((t.device, t.dtype), []).append(t.detach().reshape(-1))
    return all(bool(torch.isfinite(torch.cat(group)).all()) for group in groups.values())


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    state = optimizer.state_dict()
    return {f"{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
            for i, s in state["state"].items() for k, v in s.items() if v is not None}


def save_checkpoint(output: Path, data_root: Path, step: int, adapter: TrainAdapter,
                    optimizer: torch.optim.Optimizer, trainer_state: dict, base_model: str) -> Checkpoint:
    """Write `<output>/checkpoint-<step>`; a folder of that step already there is replaced only once the new one
    is complete. Raises NonFiniteError (writing nothing) if the weights or optimizer state are not finite."""
    weights = adapter.weights()
    tensors = _optimizer_tensors(optimizer)
    if not all_finite([t for ab in weights.values() for t in ab] + list(tensors.values())):
        raise NonFiniteError(f"step {step}: the adapter or optimizer state holds NaN or infinity; "
                             "no checkpoint written")
    final = output / f"checkpoint-{step}"
    tmp = output / f".tmp-checkpoint-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    spec = adapter.spec
    write_adapter(tmp, weights, spec.r, spec.alpha, base_model, spec.use_rslora, spec.dropout)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step, "param_groups":
                                                        optimizer.state_dict()["param_groups"]}, indent=2))
    sums = {name: sha256_file(tmp / name) for name in FILES}
    (tmp / SUMS_FILE).write_text("".join(f"{h}  {name}\n" for name, h in sums.items()))
    fsync_tree(tmp)
    old = output / f".tmp-checkpoint-{step}-replaced-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    fd = os.open(output, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    losses = trainer_state.get("losses") or []
    return Checkpoint(step, str(final.relative_to(data_root)), sums[ADAPTER_FILE], time.time(),
                      losses[step - 1] if 0 < step <= len(losses) else None)


def _read_sums(folder: Path) -> dict[str, str] | None:
    path = folder / SUMS_FILE
    if not path.is_file():
        return None
    sums = {}
    for line in path.read_text(errors="replace").splitlines():
        digest, _, name = line.partition("  ")
        if not re.fullmatch(r"[0-9a-f]{64}", digest) or name not in FILES:
            raise CheckpointError(f"{SUMS_FILE} has a malformed line {line[:80]!r}")
        sums[name] = digest
    if set(sums) != set(FILES):
        raise CheckpointError(f"{SUMS_FILE} does not list {sorted(set(FILES) - set(sums))}")
    return sums


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_trainer(trainer: object, folder_step: int, total_steps: int) -> dict:
    if not isinstance(trainer, dict):
        raise CheckpointError("trainer_state.json is not a JSON object")
    step = trainer.get("step")
    if not _is_int(step) or not 1 <= step <= total_steps:
        raise CheckpointError(f"trainer_state step {step!r} is not an integer in 1..{total_steps} (the job's steps)")
    if step != folder_step:
        raise CheckpointError(f"trainer_state step {step} differs from the folder's step {folder_step}")
    tokens, losses = trainer.get("tokens"), trainer.get("losses")
    if not _is_int(tokens) or tokens < 0:
        raise CheckpointError(f"trainer_state tokens {tokens!r} is not a non-negative integer")
    if not isinstance(losses, list) or len(losses) != step or not all(_finite_number(x) for x in losses):
        raise CheckpointError(f"trainer_state losses must be {step} finite numbers")
    groups = trainer.get("param_groups")
    if not isinstance(groups, list) or len(groups) != 1 or not isinstance(groups[0], dict):
        raise CheckpointError("trainer_state param_groups must hold one parameter group")
    for key, value in groups[0].items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(x, float) and not math.isfinite(x) for x in values):
            raise CheckpointError(f"trainer_state param_groups {key} is not finite")
    return trainer


def _check_optimizer(flat: dict[str, torch.Tensor], params: list[tuple[int, ...]], optimizer: str, group: dict,
                     step: int) -> dict:
    """The optimizer state must belong to this optimizer and these parameters, and be finite."""
    kind = "adamw" if "betas" in group else "sgd" if "momentum" in group else None
    if kind != optimizer:
        raise CheckpointError(f"the optimizer state is of {kind or 'an unknown optimizer'}; the job uses {optimizer}")
    if group.get("params") != list(range(len(params))):
        raise CheckpointError(f"the optimizer state covers other parameters than the job's {len(params)}")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        idx, _, name = key.partition(".")
        if not idx.isdigit() or int(idx) >= len(params):
            raise CheckpointError(f"unexpected optimizer tensor {key!r}")
        state.setdefault(int(idx), {})[name] = value
    expected = ADAMW_STATE if optimizer == "adamw" else ({"momentum_buffer"} if group["momentum"] else set())
    for i, shape in enumerate(params):
        entry = state.get(i, {})
        if set(entry) != expected:
            raise CheckpointError(f"optimizer state of parameter {i} holds {sorted(entry)}, expected "
                                  f"{sorted(expected)}")
        for name, t in entry.items():
            want = () if name == "step" else shape
            if tuple(t.shape) != want:
                raise CheckpointError(f"optimizer {name} of parameter {i} has shape {tuple(t.shape)}, expected {want}")
        if optimizer == "adamw" and (int(entry["step"]) != step or bool((entry["exp_avg_sq"] < 0).any())):
            raise CheckpointError(f"optimizer state of parameter {i} is inconsistent with step {step}")
    if not all_finite(flat.values()):
        raise CheckpointError("the optimizer state holds NaN or infinity")
    return {"state": state, "param_groups": [group]}


def verify_checkpoint(folder: Path, data_root: Path, recorded_sha256: str | None, lora: LoRASpec,
                      shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]], total_steps: int,
                      training: TrainingSpec) -> ResumeState:
    """Load a checkpoint only if it is what was written: its adapter hash equals the job record's (or, without
    a record, its SHA256SUMS), every file matches SHA256SUMS, the trainer state and optimizer state fit the job,
    and every tensor is finite with the job's shapes. Raises CheckpointError saying what failed."""
    m = FOLDER.match(folder.name)
    if m is None:
        raise CheckpointError(f"{folder.name!r} is not a checkpoint folder (checkpoint-<step>)")
    root = data_root.resolve()
    for name in FILES:
        path = folder / name
        real = path.resolve()
        if not real.is_file():
            raise CheckpointError(f"the checkpoint has no {name}")
        if real != root and root not in real.parents:
            raise CheckpointError(f"{name} is a link to outside the data root")
    sums = _read_sums(folder)
    if sums is None and recorded_sha256 is None:
        raise CheckpointError(f"the checkpoint has no {SUMS_FILE} and no job record lists it: its integrity "
                              "cannot be checked")
    actual = {name: sha256_file(folder / name) for name in FILES}
    if recorded_sha256 is not None and actual[ADAPTER_FILE] != recorded_sha256:
        raise CheckpointError(f"{ADAPTER_FILE} has sha256 {actual[ADAPTER_FILE][:12]}…, the job record says "
                              f"{recorded_sha256[:12]}…: it was changed after it was written")
    for name, digest in (sums or {}).items():
        if actual[name] != digest:
            raise CheckpointError(f"{name} does not match its sha256 in {SUMS_FILE}: it was changed after it was "
                                  "written")
    try:   # the files are untrusted until checked: any parse failure is a refusal, not a crash
        raw_trainer = json.loads((folder / "trainer_state.json").read_text())
        _, modules = read_adapter(folder)
        flat = load_file(str(folder / "optimizer.safetensors"))
    except Exception as exc:
        raise CheckpointError(f"unreadable checkpoint: {type(exc).__name__}: {exc}") from exc
    trainer = _check_trainer(raw_trainer, int(m[1]), total_steps)
    cfg, _ = read_adapter(folder)
    if (cfg.get("r"), cfg.get("lora_alpha"), bool(cfg.get("use_rslora"))) != (lora.r, lora.alpha, lora.use_rslora):
        raise CheckpointError(f"the adapter has r={cfg.get('r')!r}, lora_alpha={cfg.get('lora_alpha')!r}, "
                              f"use_rslora={cfg.get('use_rslora')!r}; the job's lora settings differ")
    if set(modules) != set(shapes):
        raise CheckpointError(f"the adapter targets {len(modules)} modules, the job's lora settings {len(shapes)}")
    for name, (a_shape, b_shape) in shapes.items():
        ab = modules[name]
        if set(ab) != {"A", "B"} or tuple(ab["A"].shape) != a_shape or tuple(ab["B"].shape) != b_shape:
            raise CheckpointError(f"{name}: the saved LoRA shapes do not match the job's rank and model")
    if not all_finite([t for ab in modules.values() for t in ab.values()]):
        raise CheckpointError("the adapter weights hold NaN or infinity")
    params = [s for a_shape, b_shape in shapes.values() for s in (a_shape, b_shape)]
    opt = _check_optimizer(flat, params, training.optimizer, trainer["param_groups"][0], trainer["step"])
    return ResumeState(folder, trainer["step"], trainer["tokens"], [float(x) for x in trainer["losses"]],
                       modules, opt, actual[ADAPTER_FILE])


def retained(checkpoints: list[Checkpoint], limit: int | None, final_step: int) -> set[int]:
    """Steps to keep: the last `limit`, the best loss and the final one (all when `limit` is None)."""
    steps = sorted(c.step for c in checkpoints)
    if limit is None:
        return set(steps)
    keep = set(steps[-limit:]) | ({final_step} & set(steps))
    scored = [c for c in checkpoints if c.loss is not None]
    if scored:
        keep.add(min(scored, key=lambda c: (c.loss, -c.step)).step)
    return keep
