"""A finetuning job's LoRA parameters (fp32 masters), usable by backward units and written to a serving slot."""
from __future__ import annotations

import math

import torch

from coserve.engine.finetune.spec import LoRASpec
from coserve.engine.layers.lora_batch import Dropout
from coserve.engine.model.llama import CausalLM


def lora_shapes(model: CausalLM, spec: LoRASpec) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    """{module: (A shape, B shape)} of a job's adapter, in parameter order (what checkpoints must hold)."""
    shapes = {}
    for name, (in_f, out_f) in model.lora_targets().items():
        if name.rsplit(".", 1)[-1] in spec.target_modules:
            shapes[name] = ((spec.r, in_f), (out_f, spec.r))
    return shapes


class TrainAdapter:
    """Implements the model's `TrainableLoRA`: every row of a unit gets scaling * B @ A @ x."""

    def __init__(self, model: CausalLM, spec: LoRASpec, seed: int):
        self.spec = spec
        self.rank = spec.r
        self.scaling = spec.alpha / math.sqrt(spec.r) if spec.use_rslora else spec.alpha / spec.r
        g = torch.Generator().manual_seed(seed)
        device = model.lm_head.weight.device
        self.params: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, (in_f, out_f) in model.lora_targets().items():
            if name.rsplit(".", 1)[-1] not in spec.target_modules:
                continue
            a = torch.empty(spec.r, in_f)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)   # PEFT's default init
            self.params[name] = (a.to(device).requires_grad_(), torch.zeros(out_f, spec.r, device=device,
                                                                            requires_grad=True))
        self.by_layer: dict[int, list[torch.Tensor]] = {}
        for name, ab in self.params.items():   # names are model.layers.<i>.<block>.<projection>
            self.by_layer.setdefault(int(name.split(".")[2]), []).extend(ab)
        for p in self.parameters():   # gradients at fixed addresses: backward units' CUDA graphs add into them
            p.grad = torch.zeros_like(p)

    def layer_parameters(self, layer: int) -> list[torch.Tensor]:
        """The A and B tensors of one decoder layer's adapted projections."""
        return self.by_layer.get(layer, [])

    def parameters(self) -> list[torch.Tensor]:
        return [p for ab in self.params.values() for p in ab]

    def named_parameters(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, (a, b) in self.params.items():
            out[f"{name}.lora_A"], out[f"{name}.lora_B"] = a, b
        return out

    def delta(self, names: list[str], sizes: list[int], x: torch.Tensor,
              dropout: Dropout | None) -> torch.Tensor | None:
        """scaling * B @ A @ x for each adapted slice of a merged projection, in x's dtype (fp32 masters, cast in
        the graph; GEMMs accumulate in fp32); without dropout the slices share one A GEMM."""
        picked = [(i, self.params[n]) for i, n in enumerate(names) if n in self.params]
        if not picked:
            return None
        if dropout is None:
            shrunk = (x @ torch.cat([a for _, (a, _) in picked]).to(x.dtype).T).split(self.rank, dim=1)
        else:
            shrunk = [dropout(names[i], x) @ a.to(x.dtype).T for i, (a, _) in picked]
        parts = [x.new_zeros(x.shape[0], size) for size in sizes]
        for (i, (_, b)), s in zip(picked, shrunk):
            parts[i] = s @ (b * self.scaling).to(x.dtype).T
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def load(self, modules: dict[str, dict[str, torch.Tensor]]) -> None:
        """Start from saved weights (init_from / resume_from); they must fit this job's LoRA settings."""
        if set(modules) != set(self.params):
            raise ValueError(f"adapter targets {sorted(modules)[:3]}..., the job's lora settings target "
                             f"{sorted(self.params)[:3]}...")
        with torch.no_grad():
            for name, (a, b) in self.params.items():
                src = modules[name]
                if src["A"].shape != a.shape or src["B"].shape != b.shape:
                    raise ValueError(f"{name}: saved rank/shape {tuple(src['A'].shape)} differs from the job's "
                                     f"{tuple(a.shape)}")
                a.copy_(src["A"])
                b.copy_(src["B"])

    def weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {name: (a.detach(), b.detach()) for name, (a, b) in self.params.items()}
