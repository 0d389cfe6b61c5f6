"""Token-level backward of one finetuning sequence, as small units that fit into any iteration.

The forward ran in chunks inside the serving batches and kept, per chunk, each layer's input and the final
hidden state; keys and values sit in the paged KV cache. Backward then runs units top layer first and, within
a layer, last chunk first. Unit (l, k) recomputes layer l for chunk k with autograd, attending to the cached
keys of earlier tokens as leaves: their gradients go to dK/dV accumulators, which are complete for chunk k's
own keys when its unit runs, because every later chunk has already run. A unit may also take several
consecutive chunks of a layer at once (one fixed cost instead of several) when the iteration has room. Exact,
with no autograd graph kept between units."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from coserve.engine.finetune.adapter import TrainAdapter
from coserve.engine.finetune.dataset import IGNORE
from coserve.engine.finetune.loss import linear_cross_entropy
from coserve.engine.layers.lora_batch import LoRABatch
from coserve.engine.model.llama import CausalLM, stream
from coserve.kernels.paged_attention import causal_attention_sdpa, gather_kv


@dataclass
class SavedChunk:
    start: int
    length: int
    inputs: list[torch.Tensor]   # each layer's input, then the final hidden state: [length, hidden] each
    dropout: Callable | None = None  # the chunk's LoRA dropout, drawn again identically here


@dataclass
class SequenceBackward:
    """Backward progress of one sequence; `run_unit` advances it by one unit: a layer for one chunk, or for
    several consecutive chunks when the iteration has room for them."""

    model: CausalLM
    adapter: TrainAdapter
    chunks: list[SavedChunk]
    labels: list[int]
    block_table: torch.Tensor
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    loss_scale: float                     # 1 / (targets in the optimizer step)
    graphs: "UnitGraphs | None" = None    # CUDA graphs of layer units (CUDA fast path)
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
        total, cfg = self.chunks[-1].start + self.chunks[-1].length, self.model.cfg
        device = self.kv_caches[0][0].device
        self.dk = torch.zeros(total, cfg.num_kv_heads, cfg.head_dim, device=device)
        self.dv = torch.zeros_like(self.dk)

    @property
    def done(self) -> bool:
        return self.layer == -2

    def _unit_chunks(self, max_tokens: int) -> range:
        """The next unit's chunks: the next one, merged with the earlier ones of the same layer while the unit
        stays within `max_tokens` (fewer, larger units cost less where each unit's fixed cost dominates).
        Chunks with LoRA dropout run alone, each with its own masks."""
        last = first = self.chunk
        tokens = self.chunks[last].length
        while (first > 0 and self.chunks[first].dropout is None and self.chunks[first - 1].dropout is None
               and tokens + self.chunks[first - 1].length <= max_tokens):
            first -= 1
            tokens += self.chunks[first].length
        return range(first, last + 1)

    def next_unit_tokens(self, max_tokens: int = 0) -> int:
        return sum(self.chunks[k].length for k in self._unit_chunks(max_tokens))

    def run_unit(self, max_tokens: int = 0) -> None:
        """Advance by one unit of up to `max_tokens` tokens (always at least one chunk)."""
        ks = self._unit_chunks(max_tokens)
        with torch.enable_grad():
            if self.layer == -1:
                self._head_unit(ks)
            else:
                self._layer_unit(self.layer, ks)
        self.chunk = ks.start - 1
        if self.chunk < 0:
            self._next_layer()

    def _next_layer(self) -> None:
        if self.layer == -1:
            self.layer = self.model.cfg.num_layers - 1
        else:
            self.grad_out, self.grad_in = self.grad_in, {}
            self.layer = self.layer - 1 if self.layer > 0 else -2
        self.chunk = len(self.chunks) - 1
        if self.done:
            self.chunks.clear()
            self.grad_out.clear()
            self.dk = self.dv = None
        else:
            self.dk.zero_()
            self.dv.zero_()

    def _span(self, ks: range, layer: int) -> tuple[int, int, torch.Tensor]:
        """(start, length, the saved inputs of `layer` for the chunks `ks`, joined, as a leaf needing grad)."""
        chunks = [self.chunks[k] for k in ks]
        x = torch.cat([c.inputs[layer] for c in chunks]).detach().requires_grad_()
        return chunks[0].start, sum(c.length for c in chunks), x

    def _split(self, grad: torch.Tensor, ks: range) -> dict[int, torch.Tensor]:
        return dict(zip(ks, grad.split([self.chunks[k].length for k in ks])))

    def _head_unit(self, ks: range) -> None:
        """Loss of the unit's positions (labels shifted over the whole sequence) and dL/d(final hidden), the
        vocabulary projection taken a block of rows at a time (no [tokens, vocab] logits kept)."""
        start, length, h = self._span(ks, -1)
        normed = self.model.model.norm(h)[0]
        targets = self.labels[start + 1:start + length + 1]
        targets = torch.tensor(targets + [IGNORE] * (length - len(targets)), device=h.device)
        loss, grad = linear_cross_entropy(normed.detach(), self.model.lm_head.weight, targets, self.loss_scale)
        normed.backward(grad)
        self.loss_sum += float(loss)
        self.targets += int((targets != IGNORE).sum())
        self.grad_out.update(self._split(h.grad, ks))

    def _layer_unit(self, layer_idx: int, ks: range) -> None:
        """Recompute layer `layer_idx` for the unit's chunks and send the gradients back: to the layer input, to
        the LoRA parameters, and to the keys/values of earlier positions (the dK/dV sums). Replayed from a CUDA
        graph when the unit's shape has been seen (and no dropout applies)."""
        start, length, x = self._span(ks, layer_idx)
        span = slice(start, start + length)
        grad_out = torch.cat([self.grad_out[k] for k in ks])
        dropout = self.chunks[ks.start].dropout if len(ks) == 1 else None
        params = self.adapter.layer_parameters(layer_idx)
        inputs = LayerInputs(x, self.block_table, grad_out, self.dk[span], self.dv[span])
        if self.graphs is not None and dropout is None:
            grads = self.graphs.run(self, layer_idx, start, inputs, params)
        else:
            grads = layer_grads(self.model, layer_idx, self.kv_caches[layer_idx], self.adapter, start, inputs,
                                params, dropout)
        x_grad, past_k_grad, past_v_grad, param_grads = grads
        self.grad_in.update(self._split(x_grad.clone() if self.graphs is not None else x_grad, ks))
        if start:
            self.dk[:start] += past_k_grad
            self.dv[:start] += past_v_grad
        for p, g in zip(params, param_grads):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad += g


@dataclass
class LayerInputs:
    """What a layer unit reads besides the weights and the KV cache."""

    x: torch.Tensor             # the layer's saved input for the unit's tokens
    block_table: torch.Tensor   # the sequence's KV blocks
    grad_out: torch.Tensor      # dL/d(layer output)
    dk: torch.Tensor            # dL/d(the unit's own keys), fp32, from later units
    dv: torch.Tensor


def layer_grads(model: CausalLM, layer_idx: int, kv_cache: tuple[torch.Tensor, torch.Tensor], adapter: TrainAdapter,
                start: int, inputs: LayerInputs, params: list[torch.Tensor],
                dropout: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One layer recomputed under autograd for tokens [start, start + len(x)), attending to the cached keys of
    earlier positions as leaves: (dL/dx, dL/d past keys, dL/d past values, dL/d each of `params`). No host sync,
    so it can be captured in a CUDA graph."""
    cfg = model.cfg
    x = inputs.x.detach().requires_grad_()
    past_k, past_v = gather_kv(*kv_cache, inputs.block_table, start)
    past_k, past_v = past_k.requires_grad_(), past_v.requires_grad_()
    own: dict[str, torch.Tensor] = {}

    def attend(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        own["k"], own["v"] = key, value
        keys, values = torch.cat([past_k.to(key.dtype), key]), torch.cat([past_v.to(value.dtype), value])
        return causal_attention_sdpa(q, keys, values, cfg.head_dim ** -0.5, cfg.sliding_window)

    with torch.enable_grad():
        positions = torch.arange(start, start + x.shape[0], device=x.device)
        lora = LoRABatch.training(adapter, x.shape[0], x.device, dropout)
        out = stream(*model.model.layers[layer_idx](x, None, positions, model.cos_sin, lora, attend))
        grads = torch.autograd.grad([out, own["k"], own["v"]], [x, past_k, past_v, *params],
                                    [inputs.grad_out.to(out.dtype), inputs.dk.to(own["k"].dtype),
                                     inputs.dv.to(own["v"].dtype)], allow_unused=True)
    params_grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads[3:], params)]
    return grads[0], grads[1], grads[2], params_grads


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: LayerInputs
    outputs: tuple


class UnitGraphs:
    """CUDA graphs of layer units, one per (layer, tokens, start, blocks) seen twice: a unit is hundreds of small kernels
    whose launches, not their work, bound a unit's time. Inputs are copied into static buffers shared by the
    graphs of a shape; outputs live in one memory pool and are consumed before the next replay."""

    def __init__(self, max_graphs: int = 512):
        self.max_graphs = max_graphs
        self.graphs: dict[tuple[int, int, int, int], _Captured] = {}   # (layer, tokens, start, table length)
        self.statics: dict[tuple[int, int, int], LayerInputs] = {}
        self.seen: set[tuple[int, int, int, int]] = set()
        self.pool = None
        self.capture_allowed = True   # capturing costs two units' time: never in an iteration serving inference

    def run(self, bwd: "SequenceBackward", layer_idx: int, start: int, inputs: LayerInputs,
            params: list[torch.Tensor]) -> tuple:
        key = (layer_idx, inputs.x.shape[0], start, inputs.block_table.shape[0])
        cached = self.graphs.get(key)
        if cached is None:
            if key not in self.seen or len(self.graphs) >= self.max_graphs or not self.capture_allowed:
                if len(self.seen) >= 8 * self.max_graphs:   # shapes of co-served units rarely repeat: forget them
                    self.seen.clear()
                self.seen.add(key)
                return layer_grads(bwd.model, layer_idx, bwd.kv_caches[layer_idx], bwd.adapter, start, inputs, params)
            cached = self._capture(bwd, layer_idx, start, inputs, params)
        static = cached.inputs
        for dst, src in ((static.x, inputs.x), (static.grad_out, inputs.grad_out), (static.dk, inputs.dk),
                         (static.dv, inputs.dv)):
            dst.copy_(src)
        static.block_table.copy_(inputs.block_table)
        cached.graph.replay()
        return cached.outputs

    def _capture(self, bwd: "SequenceBackward", layer_idx: int, start: int, inputs: LayerInputs,
                 params: list[torch.Tensor]) -> _Captured:
        shape = (inputs.x.shape[0], start, inputs.block_table.shape[0])
        static = self.statics.get(shape)
        if static is None:
            static = LayerInputs(inputs.x.clone(), inputs.block_table.clone(), inputs.grad_out.clone(),
                                 inputs.dk.clone(), inputs.dv.clone())
            self.statics[shape] = static

        def fn() -> tuple:
            return layer_grads(bwd.model, layer_idx, bwd.kv_caches[layer_idx], bwd.adapter, start, static, params)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()                                     # warm-up outside the graph (workspace allocations)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = fn()
        self.pool = graph.pool()
        captured = _Captured(graph, static, outputs)
        self.graphs[(layer_idx, inputs.x.shape[0], start, inputs.block_table.shape[0])] = captured
        return captured
