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
    """Implements the model's `TrainableLoRA`: every row of a unit gets scaling * B @ A @ x. Every A and B is a
    view of one flat fp32 tensor, and every gradient a view of another: the optimizer step checks, clips and
    zeroes them in one launch each, where hundreds of tensors cost tens of milliseconds of host time."""

    def __init__(self, model: CausalLM, spec: LoRASpec, seed: int):
        self.spec = spec
        self.rank = spec.r
        self.scaling = spec.alpha / math.sqrt(spec.r) if spec.use_rslora else spec.alpha / spec.r
        g = torch.Generator().manual_seed(seed)
        device = model.lm_head.weight.device
        shapes = {name: ((spec.r, in_f), (out_f, spec.r)) for name, (in_f, out_f) in model.lora_targets().items()
                  if name.rsplit(".", 1)[-1] in spec.target_modules}
        self.flat = torch.zeros(sum(a[0] * a[1] + b[0] * b[1] for a, b in shapes.values()), device=device)
        self.flat_grad = torch.zeros_like(self.flat)   # at a fixed address: backward units' CUDA graphs add into it
        self.params: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        offset = 0
        for name, ab_shapes in shapes.items():
            pair = []
            for shape in ab_shapes:
                size = shape[0] * shape[1]
                p = self.flat[offset:offset + size].view(shape)
                p.grad = self.flat_grad[offset:offset + size].view(shape)
                pair.append(p.requires_grad_())
                offset += size
            a = torch.empty(ab_shapes[0])
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)   # PEFT's default init (B stays 0)
            with torch.no_grad():
                pair[0].copy_(a)
            self.params[name] = (pair[0], pair[1])
        self.by_layer: dict[int, list[torch.Tensor]] = {}
        for name, ab in self.params.items():   # names are model.layers.<i>.<block>.<projection>
            self.by_layer.setdefault(int(name.split(".")[2]), []).extend(ab)

    def grads_finite(self) -> torch.Tensor:
        """On the device, without a sync: every gradient is finite."""
        return torch.isfinite(self.flat_grad).all()

    def weights_finite(self) -> torch.Tensor:
        return torch.isfinite(self.flat).all()

    def clip_grad_norm_(self, max_norm: float) -> None:
        """torch's clip_grad_norm_ over all the adapter's gradients (one 2-norm of them all), without a sync."""
        coef = torch.clamp(max_norm / (torch.linalg.vector_norm(self.flat_grad) + 1e-6), max=1.0)
        self.flat_grad.mul_(coef)

    def zero_grad(self) -> None:
        self.flat_grad.zero_()

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
