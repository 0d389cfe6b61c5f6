"""Adapter registry: PEFT-format LoRA adapters loaded into stacked slots, so one batch mixes many adapters.
A name can be reloaded while requests use it: the new weights take a fresh slot, the old slot retires
when its last request ends."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from coserve.engine.model.llama import LORA_TARGETS, CausalLM

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter that cannot be loaded; the message says why."""


@dataclass
class AdapterInfo:
    name: str
    path: str
    slot: int
    rank: int
    alpha: float
    scaling: float
    use_rslora: bool
    target_modules: list[str]
    load_id: int = 0                   # distinguishes reloads of one name (prefix-cache salt)

    def to_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "rank": self.rank, "alpha": self.alpha,
                "scaling": self.scaling, "use_rslora": self.use_rslora, "target_modules": self.target_modules}


def read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """Read `adapter_config.json` and `adapter_model.safetensors` into {module: {"A": .., "B": ..}}."""
    cfg_path, weights_path = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise AdapterError(f"{adapter_dir} has no adapter_config.json")
    if not weights_path.is_file():
        raise AdapterError(f"{adapter_dir} has no adapter_model.safetensors (pickled adapters are refused)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("use_dora"):
        raise AdapterError("DoRA adapters are not supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise AdapterError("rank_pattern/alpha_pattern are not supported")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(weights_path), framework="pt", device="cpu") as f:
        for key in f.keys():
            m = _KEY.match(key)
            if m is None:
                raise AdapterError(f"unexpected tensor {key!r} in {weights_path.name}")
            modules.setdefault(m["module"], {})[m["ab"]] = f.get_tensor(key)
    return cfg, modules


class LoRARegistry:
    def __init__(self, model: CausalLM, max_loras: int, max_rank: int):
        self.model = model
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.modules = model.lora_targets()          # Hugging Face module name -> (in, out)
        self.linears = model.merged_linears()
        self.adapters: dict[str, AdapterInfo] = {}
        self.refs = [0] * max_loras        # requests holding each slot
        self.retired: set[int] = set()     # slots of replaced adapters, freed when unreferenced
        self.training: set[int] = set()    # slots that finetuning jobs write into
        self.rank = 0                      # current width of the stacks
        self.version = 0                   # bumped when the stacks are reallocated (captured graphs go stale)
        self.loads = 0

    def _free_slot(self) -> int:
        used = {a.slot for a in self.adapters.values()} | self.retired | self.training
        for slot in range(self.max_loras):
            if slot not in used:
                return slot
        raise AdapterError(f"all {self.max_loras} adapter slots are in use; unload an adapter first")

    def _grow(self, rank: int) -> None:
        """Widen every stack to `rank` (zero-padded), keeping what the slots hold."""
        for m in self.linears:
            p = m.weight
            a = torch.zeros(self.max_loras, len(m.sizes), rank, m.in_features, dtype=p.dtype, device=p.device)
            b = torch.zeros(self.max_loras, m.out_features, rank, dtype=p.dtype, device=p.device)
            if m.lora_a is not None:
                a[:, :, : self.rank] = m.lora_a
                b[:, :, : self.rank] = m.lora_b
            m.lora_a, m.lora_b = a, b
        self.rank = rank
        self.version += 1

    def load(self, name: str, adapter_dir: Path, display_path: str | None = None) -> AdapterInfo:
        """Load (or reload) `name` from a PEFT adapter folder."""
        cfg, modules = read_adapter(adapter_dir)
        rank = int(cfg.get("r", 0))
        if not 1 <= rank <= self.max_rank:
            raise AdapterError(f"adapter rank r={rank} is outside 1..{self.max_rank} (--max-lora-rank)")
        unknown = sorted({m.rsplit(".", 1)[-1] for m in modules} - set(LORA_TARGETS))
        if unknown:
            raise AdapterError(f"unsupported target modules {unknown}; supported: {list(LORA_TARGETS)}")
        for module, ab in modules.items():
            if module not in self.modules:
                raise AdapterError(f"adapter targets {module!r}, which this base model does not have")
            if set(ab) != {"A", "B"}:
                raise AdapterError(f"{module} lacks lora_A or lora_B")
            in_f, out_f = self.modules[module]
            if ab["A"].shape != (rank, in_f) or ab["B"].shape != (out_f, rank):
                raise AdapterError(f"{module}: LoRA shapes {tuple(ab['A'].shape)}/{tuple(ab['B'].shape)} do not "
                                   f"fit a {(out_f, in_f)} projection with r={rank}")
        alpha = float(cfg.get("lora_alpha", rank))
        rslora = bool(cfg.get("use_rslora", False))
        scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        slot = self._free_slot()
        self.write_slot(slot, {k: (v["A"], v["B"]) for k, v in modules.items()}, scaling)
        old = self.adapters.get(name)
        if old is not None:
            self._retire(old.slot)
        targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
        self.loads += 1
        info = AdapterInfo(name, display_path or str(adapter_dir), slot, rank, alpha, scaling, rslora, targets,
                           self.loads)
        self.adapters[name] = info
        return info

    def write_slot(self, slot: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float) -> None:
        """Put {module: (A, B)} into a slot, the scaling folded into B; modules not named get no delta from it."""
        rank = max(a.shape[0] for a, _ in weights.values())
        if rank > self.rank:
            self._grow(rank)
        with torch.no_grad():
            for m in self.linears:
                m.lora_a[slot].zero_()
                m.lora_b[slot].zero_()
                for i, (name, lo, hi) in enumerate(zip(m.names, m.offsets, m.offsets[1:])):
                    if name in weights:
                        a, b = weights[name]
                        m.lora_a[slot, i, : a.shape[0]] = a.to(m.lora_a.dtype)
                        m.lora_b[slot, lo:hi, : a.shape[0]] = (b.float() * scaling).to(m.lora_b.dtype)

    def reserve_training_slot(self) -> int:
        slot = self._free_slot()
        self.training.add(slot)
        return slot

    def release_training_slot(self, slot: int) -> None:
        self.training.discard(slot)

    def _retire(self, slot: int) -> None:
        if self.refs[slot]:
            self.retired.add(slot)

    def unload(self, name: str) -> AdapterInfo:
        info = self.adapters.pop(name)
        self._retire(info.slot)
        return info

    def acquire(self, name: str) -> int:
        slot = self.adapters[name].slot
        self.refs[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        self.refs[slot] -= 1
        if not self.refs[slot]:
            self.retired.discard(slot)

    def free_slots(self) -> int:
        return self.max_loras - len(self.adapters) - len(self.retired) - len(self.training)


def write_adapter(out_dir: Path, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int, alpha: float,
                  base_model: str, use_rslora: bool = False, dropout: float = 0.0) -> Path:
    """Save {module: (A, B)} as a PEFT LoRA adapter folder that `peft.PeftModel.from_pretrained` loads."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    targets = sorted({m.rsplit(".", 1)[-1] for m in weights})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
           "lora_dropout": dropout, "target_modules": targets, "use_rslora": use_rslora, "bias": "none",
           "base_model_name_or_path": base_model, "fan_in_fan_out": False, "inference_mode": True,
           "init_lora_weights": True, "modules_to_save": None, "use_dora": False}
    (out_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    tensors = {}
    for module, (a, b) in weights.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.detach().float().contiguous().cpu()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.detach().float().contiguous().cpu()
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir
