"""One GEMM for several Hugging Face projections (q/k/v, gate/up), with stacked LoRA slots per slice. Outside the
engine every name stays a Hugging Face/PEFT name: the loader and adapters address slices by those names."""
from __future__ import annotations

import torch
from torch import nn

from coserve.engine.layers.lora_batch import LoRABatch
from coserve.engine.layers.ops import linear, use_kernels
from coserve.kernels.lora import lora_expand_torch, lora_shrink_torch
from coserve.kernels.lora_triton import lora_expand, lora_shrink


class MergedLoRALinear(nn.Module):
    """Rows of `weight` are the slices' weights stacked in order; LoRA stacks are per slot and slice.

    lora_a: [S, n, R, in]; lora_b: [S, out, R] with each slice's scaling folded in (zero-padded ranks)."""

    def __init__(self, in_features: int, slices: dict[str, int], bias: bool, fast: bool = False):
        super().__init__()
        self.slice_names = list(slices)            # short Hugging Face names, e.g. ["q_proj", "k_proj", "v_proj"]
        self.sizes = list(slices.values())
        self.offsets = [0]
        for size in self.sizes:
            self.offsets.append(self.offsets[-1] + size)
        self.names: list[str] = []                 # full Hugging Face module names, set by CausalLM
        self.in_features, self.out_features = in_features, self.offsets[-1]
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None
        self.lora_a: torch.Tensor | None = None
        self.lora_b: torch.Tensor | None = None
        self.fast = fast

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        """Views of the merged parameters under each slice's Hugging Face tensor name (the loader copies into them)."""
        views = {}
        for name, lo, hi in zip(self.names, self.offsets, self.offsets[1:]):
            views[f"{name}.weight"] = self.weight[lo:hi]
            if self.bias is not None:
                views[f"{name}.bias"] = self.bias[lo:hi]
        return views

    def forward(self, x: torch.Tensor, lora: LoRABatch | None) -> torch.Tensor:
        y = linear(x, self.weight, self.bias, self.fast)
        if lora is None:
            return y
        if lora.any_slot and self.lora_a is not None:
            if use_kernels(self.fast, x):
                buf = torch.empty(x.shape[0], len(self.sizes), self.lora_a.shape[2], dtype=torch.float32,
                                  device=x.device)
                meta = lora.kernel_meta()
                lora_shrink(x, self.lora_a, meta, buf)
                lora_expand(buf, self.lora_b, meta, self.offsets, y)
            else:
                buf = lora_shrink_torch(x, self.lora_a, lora.token_lora)
                lora_expand_torch(buf, self.lora_b, lora.token_lora, self.offsets, y)
        for group in lora.dropped:
            xs = x.index_select(0, group.rows)
            delta = torch.cat([group.dropout(name, xs) @ self.lora_a[group.slot, i].T for i, name in
                               enumerate(self.names)], dim=1)
            y.index_add_(0, group.rows, self._expand_slot(delta, group.slot).to(y.dtype))
        for trainable in lora.trainable:
            delta = trainable.delta(self.names, self.sizes, x, lora.train_dropout)
            if delta is not None:
                y = y + delta
        return y

    def _expand_slot(self, shrunk: torch.Tensor, slot: int) -> torch.Tensor:
        """B of one slot applied slice by slice to [rows, n * R] shrunk inputs."""
        r = self.lora_a.shape[2]
        return torch.cat([shrunk[:, i * r:(i + 1) * r] @ self.lora_b[slot, lo:hi].T
                          for i, (lo, hi) in enumerate(zip(self.offsets, self.offsets[1:]))], dim=1)
