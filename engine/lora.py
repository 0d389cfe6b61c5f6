"""Adapter registry: PEFT-format LoRA adapters loaded into stacked slots, so one batch mixes many adapters.
A name can be reloaded while requests use it: the new weights take a fresh slot, the old slot retires
when its last request ends."""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from coserve.engine.model.llama import LORA_TARGETS, CausalLM
from coserve.engine.paths import PathError, file_under

MAX_CONFIG_BYTES = 1 << 20
MAX_SCALING = 1e4     # lora_alpha / r (or / sqrt(r)); real adapters stay far below
log = logging.getLogger("coserve.lora")
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


def read_adapter(adapter_dir: Path, root: Path | None = None) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """Read `adapter_config.json` and `adapter_model.safetensors` into {module: {"A": .., "B": ..}}, checking
    both before anything uses them; each file must resolve under `root` (default: the adapter folder)."""
    root = root or adapter_dir
    cfg = check_adapter_config(_read_config(_adapter_file(adapter_dir, root, "adapter_config.json")))
    weights_path = _adapter_file(adapter_dir, root, "adapter_model.safetensors",
                                 " (pickled adapters are refused)")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as f:
            for key in f.keys():
                m = _KEY.match(key)
                if m is None:
                    raise AdapterError(f"unexpected tensor {key!r} in adapter_model.safetensors")
                modules.setdefault(m["module"], {})[m["ab"]] = _check_tensor(key, f.get_tensor(key))
    except SafetensorError as exc:
        raise AdapterError(f"adapter_model.safetensors is not a valid safetensors file ({exc})") from exc
    if not modules:
        raise AdapterError("adapter_model.safetensors holds no LoRA tensors")
    return cfg, modules


def _adapter_file(adapter_dir: Path, root: Path, name: str, hint: str = "") -> Path:
    path = adapter_dir / name
    if not path.exists():
        raise AdapterError(f"the adapter folder has no {name}{hint}")
    try:
        return file_under(root, path)
    except PathError as exc:
        raise AdapterError(str(exc)) from exc


def _read_config(path: Path) -> object:
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterError(f"adapter_config.json is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        return json.loads(path.read_bytes().decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise AdapterError(f"adapter_config.json is not valid JSON ({exc})") from exc


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_adapter_config(cfg: object) -> dict:
    """The settings we honour, typed and finite: a PEFT config that is not an object, a rank that is not a
    positive integer, a non-numeric or non-finite alpha, etc. is refused, naming the key."""
    if not isinstance(cfg, dict):
        raise AdapterError("adapter_config.json must hold a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter_config.json: peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("use_dora"):
        raise AdapterError("DoRA adapters are not supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise AdapterError("rank_pattern/alpha_pattern are not supported")
    rank = cfg.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterError(f"adapter_config.json: r must be a positive integer, got {rank!r}")
    alpha = cfg.get("lora_alpha", rank)
    if not _number(alpha) or not math.isfinite(alpha):
        raise AdapterError(f"adapter_config.json: lora_alpha must be a finite number, got {alpha!r}")
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise AdapterError("adapter_config.json: use_rslora must be true or false")
    scaling = adapter_scaling(cfg)
    if not abs(scaling) <= MAX_SCALING:
        raise AdapterError(f"adapter_config.json: lora_alpha gives the scaling {scaling:g}, beyond "
                           f"{MAX_SCALING:g} in magnitude")
    return cfg


def adapter_scaling(cfg: dict) -> float:
    """PEFT's scaling of a checked config: alpha / r, or alpha / sqrt(r) with rslora."""
    rank, alpha = cfg["r"], float(cfg.get("lora_alpha", cfg["r"]))
    return alpha / math.sqrt(rank) if cfg.get("use_rslora", False) else alpha / rank


def _check_tensor(key: str, t: torch.Tensor) -> torch.Tensor:
    if not t.is_floating_point() or t.dim() != 2:
        raise AdapterError(f"{key} must be a 2-D floating-point tensor, got {t.dtype} of shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise AdapterError(f"{key} holds non-finite values (NaN or infinity)")
    return t


class SlotWriter:
    """`write_slot` with its slices taken once: a training job copies its adapter (whose tensors it updates in
    place) into its slot after every optimizer step, and hundreds of slicings each time cost milliseconds."""

    def __init__(self, registry: "LoRARegistry", slot: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 scaling: float):
        self.registry, self.slot, self.weights, self.scaling = registry, slot, weights, scaling
        self.version = -1

    def _slice(self) -> None:
        reg = self.registry
        rank = max(a.shape[0] for a, _ in self.weights.values())
        if rank > reg.rank:
            reg._grow(rank)
        self.zero, self.dst_a, self.src_a, self.dst_b, self.src_b = [], [], [], [], []
        for m in reg.linears:
            self.zero += [m.lora_a[self.slot], m.lora_b[self.slot]]
            for i, (name, lo, hi) in enumerate(zip(m.names, m.offsets, m.offsets[1:])):
                if name in self.weights:
                    a, b = self.weights[name]
                    self.dst_a.append(m.lora_a[self.slot, i, : a.shape[0]])
                    self.src_a.append(a)
                    self.dst_b.append(m.lora_b[self.slot, lo:hi, : a.shape[0]])
                    self.src_b.append(b if b.dtype == torch.float32 else b.float())
        self.version = reg.version

    def __call__(self) -> None:
        if self.version != self.registry.version:   # first use, or the stacks were widened since
            self._slice()
        with torch.no_grad():   # a few multi-tensor launches
            torch._foreach_zero_(self.zero)
            torch._foreach_copy_(self.dst_a, self.src_a)
            torch._foreach_copy_(self.dst_b, torch._foreach_mul(self.src_b, self.scaling))


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

    def load(self, name: str, adapter_dir: Path, display_path: str | None = None,
             root: Path | None = None) -> AdapterInfo:
        """Load (or reload) `name` from a PEFT adapter folder whose files resolve under `root`; answers show
        `display_path` (the path relative to the data root), never the server's own."""
        cfg, modules = read_adapter(adapter_dir, root)
        rank = cfg["r"]
        if rank > self.max_rank:
            raise AdapterError(f"adapter rank r={rank} is outside 1..{self.max_rank} (--max-lora-rank)")
        unknown = sorted({m.rsplit(".", 1)[-1] for m in modules} - set(LORA_TARGETS))
        if unknown:
            raise AdapterError(f"unsupported target modules {unknown}; supported: {list(LORA_TARGETS)}")
        dtype = self.linears[0].weight.dtype
        scaling = adapter_scaling(cfg)   # folded into B when written to a slot
        for module, ab in modules.items():
            if module not in self.modules:
                raise AdapterError(f"adapter targets {module!r}, which this base model does not have")
            if set(ab) != {"A", "B"}:
                raise AdapterError(f"{module} lacks lora_A or lora_B")
            in_f, out_f = self.modules[module]
            if ab["A"].shape != (rank, in_f) or ab["B"].shape != (out_f, rank):
                raise AdapterError(f"{module}: LoRA shapes {tuple(ab['A'].shape)}/{tuple(ab['B'].shape)} do not "
                                   f"fit a {(out_f, in_f)} projection with r={rank}")
            served = (ab["A"].to(dtype), (ab["B"].float() * scaling).to(dtype))
            if not all(torch.isfinite(t).all() for t in served):
                raise AdapterError(f"{module}: LoRA weights times the scaling overflow the serving dtype {dtype}")
        alpha = float(cfg.get("lora_alpha", rank))
        rslora = cfg.get("use_rslora", False)
        slot = self._free_slot()
        self.write_slot(slot, {k: (v["A"], v["B"]) for k, v in modules.items()}, scaling)
        old = self.adapters.get(name)
        if old is not None:
            self._retire(old.slot)
        targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
        self.loads += 1
        info = AdapterInfo(name, display_path or adapter_dir.name, slot, rank, alpha, scaling, rslora, targets,
                           self.loads)
        self.adapters[name] = info
        log.info("adapter %s %s from %s (rank %d)", name, "reloaded" if old else "loaded", info.path, rank,
                 extra={"event": "adapter_loaded", "adapter": name, "path": info.path})
        return info

    def write_slot(self, slot: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float) -> None:
        """Put {module: (A, B)} into a slot, the scaling folded into B; modules not named get no delta from it."""
        self.slot_writer(slot, weights, scaling)()

    def slot_writer(self, slot: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor]],
                    scaling: float) -> "SlotWriter":
        return SlotWriter(self, slot, weights, scaling)

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
        log.info("adapter %s unloaded", name, extra={"event": "adapter_unloaded", "adapter": name, "path": info.path})
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
