"""Token-level backward of one finetuning sequence, as small units that fit into any iteration.

The forward ran in chunks inside the serving batches and kept, per chunk, each layer's input and the final
hidden state; keys and values sit in the paged KV cache. Backward then runs units top layer first and, within
a layer, last chunk first. Unit (l, k) recomputes layer l for chunk k with autograd, attending to the cached
keys of earlier tokens as leaves: their gradients go to dK/dV accumulators, which are complete for chunk k's
own keys when its unit runs, because every later chunk has already run. Exact, with no autograd graph kept
between units."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from coserve.engine.finetune.adapter import TrainAdapter
from coserve.engine.finetune.dataset import IGNORE
from coserve.engine.model.llama import CausalLM, LoRAGroup
from coserve.kernels.paged_attention import causal_attention, gather_kv


@dataclass
class SavedChunk:
    start: int
    length: int
    inputs: list[torch.Tensor]   # each layer's input, then the final hidden state: [length, hidden] each
    dropout: Callable | None = None  # the chunk's LoRA dropout, drawn again identically here


@dataclass
class SequenceBackward:
    """Backward progress of one sequence; `run_unit` advances it by one (layer, chunk) unit."""

    model: CausalLM
    adapter: TrainAdapter
    chunks: list[SavedChunk]
    labels: list[int]
    block_table: torch.Tensor
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    loss_scale: float                     # 1 / (targets in the optimizer step)
    layer: int = -1                       # -1: the head (loss) units; then num_layers-1 .. 0
    chunk: int = -1                       # index into chunks of the next unit
    grad_out: dict[int, torch.Tensor] = field(default_factory=dict)
    grad_in: dict[int, torch.Tensor] = field(default_factory=dict)
    dk: torch.Tensor | None = None
    dv: torch.Tensor | None = None
    loss_sum: float = 0.0
    targets: int = 0

    def __post_init__(self) -> None:
        self.chunk = len(self.chunks) - 1

    @property
    def done(self) -> bool:
        return self.layer == -2

    def next_unit_tokens(self) -> int:
        return self.chunks[self.chunk].length

    def run_unit(self) -> None:
        with torch.enable_grad():
            if self.layer == -1:
                self._head_unit(self.chunks[self.chunk])
            else:
                self._layer_unit(self.layer, self.chunk, self.chunks[self.chunk])
        self.chunk -= 1
        if self.chunk < 0:
            self._next_layer()

    def _next_layer(self) -> None:
        if self.layer == -1:
            self.layer = self.model.cfg.num_layers - 1
        else:
            self.grad_out, self.grad_in = self.grad_in, {}
            self.layer = self.layer - 1 if self.layer > 0 else -2
        self.chunk = len(self.chunks) - 1
        self.dk = self.dv = None
        if self.done:
            self.chunks.clear()
            self.grad_out.clear()

    def _head_unit(self, c: SavedChunk) -> None:
        """Loss of the chunk's positions (labels shifted over the whole sequence) and dL/d(final hidden)."""
        h = c.inputs[-1].detach().clone().requires_grad_()
        logits = self.model.lm_head(self.model.model.norm(h)).float()
        targets = self.labels[c.start + 1:c.start + c.length + 1]
        targets = torch.tensor(targets + [IGNORE] * (c.length - len(targets)), device=h.device)
        loss = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
        (loss * self.loss_scale).backward()
        self.loss_sum += float(loss.detach())
        self.targets += int((targets != IGNORE).sum())
        self.grad_out[self.chunk] = h.grad

    def _layer_unit(self, layer_idx: int, k: int, c: SavedChunk) -> None:
        model, cfg = self.model, self.model.cfg
        layer = model.model.layers[layer_idx]
        k_cache, v_cache = self.kv_caches[layer_idx]
        if self.dk is None:
            total = self.chunks[-1].start + self.chunks[-1].length
            self.dk = torch.zeros(total, cfg.num_kv_heads, cfg.head_dim, device=k_cache.device)
            self.dv = torch.zeros_like(self.dk)
        x = c.inputs[layer_idx].detach().clone().requires_grad_()
        past_k, past_v = gather_kv(k_cache, v_cache, self.block_table, c.start)
        past_k, past_v = past_k.float().requires_grad_(), past_v.float().requires_grad_()
        own: dict[str, torch.Tensor] = {}

        def attend(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            own["k"], own["v"] = key, value
            keys = torch.cat([past_k.to(key.dtype), key])
            values = torch.cat([past_v.to(value.dtype), value])
            return causal_attention(q, keys, values, cfg.head_dim ** -0.5, cfg.sliding_window)

        cos, sin = model.rotary(torch.arange(c.start, c.start + c.length, device=x.device))
        out = layer(x, cos, sin, [LoRAGroup(self.adapter, None, c.dropout)], attend)
        span = slice(c.start, c.start + c.length)
        surrogate = ((out.float() * self.grad_out[k]).sum() + (own["k"].float() * self.dk[span]).sum()
                     + (own["v"].float() * self.dv[span]).sum())
        surrogate.backward()
        self.grad_in[k] = x.grad
        if c.start:
            self.dk[:c.start] += past_k.grad
            self.dv[:c.start] += past_v.grad
