"""Token-level backward of one finetuning sequence, as small units that fit into any iteration.

The forward ran in chunks inside the serving batches and kept each layer's input and the final hidden state in one
buffer for the sequence; keys and values sit in the paged KV cache. Backward then runs units top layer first and,
within a layer, last span first. Unit (l, s) recomputes layer l for span s with autograd, attending to the cached
keys of earlier positions as leaves: their gradients go to dK/dV accumulators, which are complete for span s's
own keys when its unit runs, because every later span has already run. Spans form a fixed grid per sequence, and a
graphed unit gathers its past keys up to a bucket of positions (masking those past its start), so a unit's graph
recurs layer by layer, span after span and sequence after sequence; the last span of a sequence, whose length is the
sequence's remainder, runs padded to a bucket of rows (zero inputs and gradients, so they add nothing), so its graph
recurs too. Exact, with no autograd graph kept between units."""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from coserve.engine.cost_model import EAGER, GRAPH, HEAD, Unit
from coserve.engine.finetune.adapter import TrainAdapter
from coserve.engine.finetune.dataset import IGNORE
from coserve.engine.finetune.loss import linear_cross_entropy
from coserve.engine.layers.lora_batch import LoRABatch
from coserve.engine.model.llama import CausalLM, stream
from coserve.kernels.paged_attention import causal_attention_sdpa, gather_kv, masked_attention_sdpa

CONTEXT_STEP = 2048   # graphed units' past-key buckets: powers of two up to this, then multiples of it
TOKEN_STEP = 256      # graphed units' row buckets: powers of two up to this, then multiples of it


@dataclass
class Span:
    """Positions [start, start + length) of a sequence: a forward chunk, or a backward unit of each layer."""

    start: int
    length: int
    dropout: Callable | None = None  # the chunk's LoRA dropout, drawn again identically in its backward

    @property
    def end(self) -> int:
        return self.start + self.length


def to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """Host integers on the device without a stream sync (a plain copy from a list waits for the stream)."""
    host = torch.tensor(values, dtype=torch.long)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)


def _bucket(n: int, step: int) -> int:
    """`n` rounded up to a power of two up to `step`, past it to a multiple of `step` (0 stays 0)."""
    if n <= step:
        return 0 if n == 0 else 1 << (n - 1).bit_length()
    return -(-n // step) * step


def context_bucket(start: int) -> int:
    """Past positions a graphed unit starting at `start` gathers: one graph serves every start in the bucket, at
    most twice the attention work (and none of a span's other work) of the exact start."""
    return _bucket(start, CONTEXT_STEP)


def unit_rows(tokens: int) -> int:
    """Rows a graphed unit of `tokens` positions computes: sequences of any length end in a span of a few recurring
    shapes, at most TOKEN_STEP - 1 padding rows (a new shape would cost a capture per layer, far more)."""
    return _bucket(tokens, TOKEN_STEP)


def priced_unit(kind: str, tokens: int, start: int) -> Unit:
    """A layer unit of `tokens` positions from `start` as the cost model prices it; a graphed one at the rows and
    past keys its graph computes."""
    return Unit(kind, unit_rows(tokens) if kind == GRAPH else tokens, context_bucket(start))


def grid_spans(length: int, span: int) -> list[Span]:
    """Units of `span` positions from the sequence's start: the same grid for every layer and for every sequence of
    this length, so a unit's shape recurs and its CUDA graph is replayed."""
    return [Span(a, min(span, length - a)) for a in range(0, length, span)]


@dataclass
class SequenceBackward:
    """Backward progress of one sequence; `run_unit` advances it by one unit (a layer over one span). Spans are
    fixed per sequence: a grid independent of how the forward was chunked, or the chunks themselves when LoRA
    dropout applies (each chunk's masks are drawn for its own shape)."""

    model: CausalLM
    adapter: TrainAdapter
    acts: torch.Tensor                    # [num_layers + 1, tokens, hidden]: each layer's input, then the final hidden
    spans: list[Span]
    labels: list[int]
    block_table: torch.Tensor
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    loss_scale: float                     # 1 / (targets in the optimizer step)
    graphs: "UnitGraphs | None" = None    # CUDA graphs of layer units (CUDA fast path)
    layer: int = -1                       # -1: the head (loss) units; then num_layers-1 .. 0
    span: int = -1                        # index into spans of the next unit
    grad_out: torch.Tensor | None = None  # dL/d(output of the current layer), [tokens, hidden]
    grad_in: torch.Tensor | None = None   # dL/d(its input), filled span by span
    dk: torch.Tensor | None = None
    dv: torch.Tensor | None = None
    loss_sum: torch.Tensor | float = 0.0  # summed on the device: reading it would stall the iteration
    targets: torch.Tensor | None = None   # each position's next token (IGNORE where none is trained), on the device

    def __post_init__(self) -> None:
        self.span = len(self.spans) - 1
        self.targets = to_device(self.labels[1:] + [IGNORE], self.acts.device)
        total, cfg = self.acts.shape[1], self.model.cfg
        self.dk = torch.zeros(total, cfg.num_kv_heads, cfg.head_dim, device=self.acts.device)
        self.dv = torch.zeros_like(self.dk)
        self.grad_out = torch.empty_like(self.acts[0])
        self.grad_in = torch.empty_like(self.grad_out)

    @property
    def done(self) -> bool:
        return self.layer == -2

    def next_unit_tokens(self) -> int:
        return 0 if self.done else self.spans[self.span].length

    def next_unit_start(self) -> int:
        return 0 if self.done else self.spans[self.span].start

    @property
    def next_is_last(self) -> bool:
        """The next unit finishes the sequence's backward."""
        return self.layer == 0 and self.span == 0

    def next_capture_cost(self, prior: float) -> float:
        """Seconds that capturing the next unit's graph would take (`prior` until a capture was measured; 0 where
        it has no graph to capture)."""
        if self.next_graphed() is not False:
            return 0.0
        return self.graphs.capture_cost(self._key(self.layer, self.spans[self.span]), prior)

    def next_graphed(self) -> bool | None:
        """Whether the next unit replays a CUDA graph (True), could be captured (False), or runs eagerly (None)."""
        if self.graphs is None or self.layer < 0 or self.spans[self.span].dropout is not None:
            return None
        return self.graphs.has(self._key(self.layer, self.spans[self.span]))

    def next_unit(self, eager: bool = False) -> Unit:
        """The next unit as the cost model prices it: a loss head, a graph replay, or (`eager`, or no graph can
        serve it) launched kernel by kernel; a layer unit's past keys are its bucket of them."""
        span = self.spans[self.span]
        if self.layer < 0:
            return Unit(HEAD, span.length)
        eager = eager or self.next_graphed() is None
        return priced_unit(EAGER if eager else GRAPH, span.length, span.start)

    def _key(self, layer: int, span: Span) -> tuple[int, int, int]:
        return layer, unit_rows(span.length), context_bucket(span.start)

    def run_unit(self, capture: bool = False) -> None:
        """Advance by one unit; `capture`: a unit without a graph yet is captured now (else it runs eagerly)."""
        span = self.spans[self.span]
        with torch.enable_grad():
            if self.layer == -1:
                self._head_unit(span)
            else:
                self._layer_unit(self.layer, span, capture)
        self.span -= 1
        if self.span < 0:
            self._next_layer()

    def _next_layer(self) -> None:
        if self.layer == -1:
            self.layer = self.model.cfg.num_layers - 1
        else:
            self.grad_out, self.grad_in = self.grad_in, self.grad_out
            self.layer = self.layer - 1 if self.layer > 0 else -2
        self.span = len(self.spans) - 1
        if self.done:
            self.acts = self.grad_out = self.grad_in = self.dk = self.dv = None
        else:
            self.dk.zero_()
            self.dv.zero_()

    def _head_unit(self, span: Span) -> None:
        """Loss of the span's positions (labels shifted over the whole sequence) and dL/d(final hidden), the
        vocabulary projection taken a block of rows at a time (no [tokens, vocab] logits kept)."""
        h = self.acts[-1, span.start:span.end].detach().requires_grad_()
        normed = self.model.model.norm(h)[0]
        loss, grad = linear_cross_entropy(normed.detach(), self.model.lm_head.weight,
                                          self.targets[span.start:span.end], self.loss_scale, self.model.fast)
        normed.backward(grad)
        self.loss_sum = self.loss_sum + loss
        self.grad_out[span.start:span.end] = h.grad

    def _layer_unit(self, layer_idx: int, span: Span, capture: bool) -> None:
        """Recompute layer `layer_idx` for the span and send the gradients back: to the layer input, to the LoRA
        parameters, and to the keys/values of earlier positions (the dK/dV sums). Replayed from a CUDA graph
        where there is one (or `capture` makes one)."""
        start, end = span.start, span.end
        params = self.adapter.layer_parameters(layer_idx)
        inputs = LayerInputs(self.acts[layer_idx, start:end], self.block_table, self.grad_out[start:end],
                             self.dk[start:end], self.dv[start:end], start)
        key = self._key(layer_idx, span)
        if self.graphs is not None and span.dropout is None and (capture or self.graphs.has(key)):
            x_grad, past_k_grad, past_v_grad = self.graphs.run(self, key, inputs, params)
        else:
            x_grad, past_k_grad, past_v_grad, param_grads = layer_grads(
                self.model, layer_idx, self.kv_caches[layer_idx], self.adapter, inputs, params, span.dropout)
            torch._foreach_add_([p.grad for p in params], param_grads)
        self.grad_in[start:end] = x_grad
        if start:
            self.dk[:start] += past_k_grad[:start]
            self.dv[:start] += past_v_grad[:start]


@dataclass
class LayerInputs:
    """What a layer unit reads besides the weights and the KV cache."""

    x: torch.Tensor             # the layer's saved input for the unit's tokens
    block_table: torch.Tensor   # the sequence's KV blocks
    grad_out: torch.Tensor      # dL/d(layer output)
    dk: torch.Tensor            # dL/d(the unit's own keys), fp32, from later units
    dv: torch.Tensor
    start: int | torch.Tensor   # the first position (a one-element tensor in a graph's static inputs)


def layer_grads(model: CausalLM, layer_idx: int, kv_cache: tuple[torch.Tensor, torch.Tensor], adapter: TrainAdapter,
                inputs: LayerInputs, params: list[torch.Tensor], dropout: Callable | None = None,
                context: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One layer recomputed under autograd for the positions from `inputs.start` on, attending to the cached keys
    of earlier positions as leaves: (dL/dx, dL/d past keys, dL/d past values, dL/d each of `params`). With
    `context`, the past is that many gathered positions and those from the start on are masked (what a graph
    serving a bucket of starts computes); their gradients are zero. Rows past the span (a graph's padding, at
    positions after it: no real query sees them) must hold zero inputs and gradients. No host sync, so it can be
    captured."""
    cfg = model.cfg
    x = inputs.x.detach().requires_grad_()
    n, start = x.shape[0], inputs.start
    steps = torch.arange(n, device=x.device)
    if context is None:
        past_k, past_v = gather_kv(*kv_cache, inputs.block_table, start)
        positions, mask = start + steps, None
    else:
        past_k, past_v = gather_kv(*kv_cache, inputs.block_table, context)
        before = (torch.arange(context, device=x.device) < start)[:, None, None]
        past_k = torch.where(before, past_k, 0.0)      # blocks past the start may hold anything, even NaN
        past_v = torch.where(before, past_v, 0.0)
        positions = start + steps
        mask = unit_mask(positions, context, start, cfg.sliding_window)
        positions = positions.clamp(max=model.cos_sin.shape[0] - 1)   # padding rows may lie past the rotary table
    past_k, past_v = past_k.requires_grad_(), past_v.requires_grad_()
    own: dict[str, torch.Tensor] = {}

    def attend(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        own["k"], own["v"] = key, value
        keys, values = torch.cat([past_k.to(key.dtype), key]), torch.cat([past_v.to(value.dtype), value])
        if mask is not None:
            return masked_attention_sdpa(q, keys, values, cfg.head_dim ** -0.5, mask)
        return causal_attention_sdpa(q, keys, values, cfg.head_dim ** -0.5, cfg.sliding_window)

    with torch.enable_grad():
        lora = LoRABatch.training(adapter, n, x.device, dropout)
        out = stream(*model.model.layers[layer_idx](x, None, positions, model.cos_sin, lora, attend))
        grads = torch.autograd.grad([out, own["k"], own["v"]], [x, past_k, past_v, *params],
                                    [inputs.grad_out.to(out.dtype), inputs.dk.to(own["k"].dtype),
                                     inputs.dv.to(own["v"].dtype)], allow_unused=True)
    params_grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads[3:], params)]
    return grads[0], grads[1], grads[2], params_grads


def unit_mask(positions: torch.Tensor, context: int, start: int | torch.Tensor,
              sliding_window: int | None) -> torch.Tensor:
    """[n, context + n]: which keys each query of a unit sees: gathered past positions before `start`, and its
    own positions up to the query's (within the sliding window, if any)."""
    past = torch.arange(context, device=positions.device)
    keys = torch.cat([past, positions])
    seen = (keys[None, :] <= positions[:, None]) & torch.cat([past < start, positions >= 0])[None, :]
    if sliding_window is not None:
        seen &= positions[:, None] - keys[None, :] < sliding_window
    return seen


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: LayerInputs


class UnitGraphs:
    """CUDA graphs of layer units, one per (layer, tokens, past-key bucket): a unit is hundreds of small kernels
    whose launches, not their work, bound its time. Inputs are copied into static buffers shared by the graphs of
    a shape; each graph adds its parameter gradients into the adapter's (persistent) `.grad` tensors and writes
    dL/dx and the past keys' gradients into outputs shared by all graphs, so a graph holds no memory of its own
    beyond its kernels. Past `max_graphs` the least recently used graph is dropped."""

    def __init__(self, warmed: set[tuple[int, int]], max_tokens: int, max_graphs: int = 2048):
        self.max_graphs, self.max_tokens = max_graphs, max_tokens
        self.graphs: OrderedDict[tuple[int, int, int], _Captured] = OrderedDict()
        self.statics: dict[tuple[int, int], LayerInputs] = {}
        self.outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None   # dL/dx, past dK, past dV
        self.pool = None
        self.side: torch.cuda.Stream | None = None   # one warm-up stream, so its cached blocks are reused
        self.warmed = warmed        # shapes already run once outside a capture (shared by the engine's jobs)
        self.captures = self.replays = 0
        self.capture_s = 0.0        # host seconds of a capture (without a shape's one-time warm-up), measured
        self.warmup_s = 0.0         # host seconds of a shape's one-time warm-up, measured

    def has(self, key: tuple[int, int, int]) -> bool:
        return key in self.graphs

    def capture_cost(self, key: tuple[int, int, int], prior: float) -> float:
        """Host seconds of capturing this unit's graph, its shape's warm-up included if still due: as measured, or
        `prior` before any capture."""
        return (self.capture_s if self.captures else prior) + (self.warmup_s if key[1:] not in self.warmed else 0.0)

    def run(self, bwd: "SequenceBackward", key: tuple[int, int, int], inputs: LayerInputs,
            params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Replay the unit's graph (capturing it first if it has none) on these inputs; returns views of the
        shared outputs (dL/dx, dL/d past keys, dL/d past values), valid until the next replay."""
        cached = self.graphs.get(key)
        if cached is None:
            cached = self._capture(bwd, key, inputs, params)
            while len(self.graphs) >= self.max_graphs:
                self.graphs.popitem(last=False)
            self.graphs[key] = cached
            self.captures += 1
        self.graphs.move_to_end(key)
        self._load(cached.inputs, inputs)
        cached.graph.replay()
        self.replays += 1
        x_grad, dk, dv = self.outputs
        context = key[2]
        return x_grad[:inputs.x.shape[0]], dk[:context], dv[:context]

    @staticmethod
    def _load(static: LayerInputs, inputs: LayerInputs) -> None:
        """The unit's inputs into the graph's buffers, padding rows zeroed (a longer span may have left them)."""
        n = inputs.x.shape[0]
        for dst, src in ((static.x, inputs.x), (static.grad_out, inputs.grad_out), (static.dk, inputs.dk),
                         (static.dv, inputs.dv)):
            dst[:n].copy_(src)
            if n < dst.shape[0]:
                dst[n:].zero_()
        static.block_table.copy_(inputs.block_table[:static.block_table.shape[0]])
        static.start.fill_(inputs.start)

    def _capture(self, bwd: "SequenceBackward", key: tuple[int, int, int], inputs: LayerInputs,
                 params: list[torch.Tensor]) -> _Captured:
        layer_idx, tokens, context = key
        cache = bwd.kv_caches[layer_idx]
        if self.outputs is None:
            most = context_bucket(self.max_tokens)
            self.outputs = (inputs.x.new_empty(unit_rows(self.max_tokens), inputs.x.shape[1]),
                            cache[0].new_empty(most, *cache[0].shape[2:]), cache[1].new_empty(most, *cache[1].shape[2:]))
        static = self.statics.get(key[1:])
        if static is None:
            blocks = -(-context // cache[0].shape[1])

            def rows(t: torch.Tensor) -> torch.Tensor:
                return t.new_zeros(tokens, *t.shape[1:])
            static = LayerInputs(rows(inputs.x), inputs.block_table[:blocks].clone(), rows(inputs.grad_out),
                                 rows(inputs.dk), rows(inputs.dv), torch.zeros((), dtype=torch.long,
                                                                              device=inputs.x.device))
            self.statics[key[1:]] = static
        self._load(static, inputs)
        x_out, dk_out, dv_out = self.outputs

        def fn() -> None:
            x_grad, past_k, past_v, param_grads = layer_grads(bwd.model, layer_idx, cache, bwd.adapter, static,
                                                              params, context=context)
            x_out[:tokens].copy_(x_grad)
            dk_out[:context].copy_(past_k)
            dv_out[:context].copy_(past_v)
            torch._foreach_add_([p.grad for p in params], param_grads)

        if key[1:] not in self.warmed:   # plans and workspaces are made outside the capture, once per shape
            began = time.perf_counter()
            grads = [p.grad.clone() for p in params]          # the warm-up must not count twice
            side = self.side = self.side or torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            torch._foreach_copy_([p.grad for p in params], grads)
            self.warmed.add(key[1:])
            took = time.perf_counter() - began
            self.warmup_s = took if not self.warmup_s else (self.warmup_s + took) / 2
        began = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            fn()
        self.pool = graph.pool()
        took = time.perf_counter() - began
        self.capture_s = took if not self.captures else (self.capture_s + took) / 2
        return _Captured(graph, static)
