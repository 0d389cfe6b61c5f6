"""Llama-family decoder over a flat token batch: RMSNorm, rotary, GQA paged attention, SwiGLU, LoRA-aware merged
projections (q/k/v and gate/up each one GEMM). One forward serves any mix of prefill chunks and decode tokens of
many sequences, plus finetuning chunks whose layer inputs are kept for their backward."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from coserve.engine.layers.attention import AttentionMetadata, paged_attention
from coserve.engine.layers.linear import MergedLoRALinear
from coserve.engine.layers.lora_batch import LoRABatch
from coserve.engine.layers.ops import RMSNorm, linear, rotary, silu_and_mul
from coserve.engine.model.config import ModelConfig
from coserve.kernels.norm_rotary import rotary_cache

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ForwardBatch:
    """Everything one forward needs: flat tokens, the iteration's attention metadata and adapters."""

    input_ids: torch.Tensor          # [T]
    positions: torch.Tensor          # [T]
    attn: AttentionMetadata
    lora: LoRABatch
    logits_indices: torch.Tensor     # rows whose logits are wanted
    capture_rows: torch.Tensor | None = None   # rows whose layer inputs finetuning keeps
    captured: torch.Tensor | None = None       # [num_layers + 1, rows, hidden]: each layer's input, then the final
                                               # hidden state (given, or allocated by the forward)


def rotary_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies, with Llama-3 or linear scaling when the config asks for it."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return inv


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, fast: bool):
        super().__init__()
        self.cfg, self.fast = cfg, fast
        hd = cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * hd, cfg.num_kv_heads * hd
        self.qkv_proj = MergedLoRALinear(cfg.hidden_size, {"q_proj": self.q_size, "k_proj": self.kv_size,
                                                           "v_proj": self.kv_size}, cfg.qkv_bias, fast)
        self.o_proj = MergedLoRALinear(self.q_size, {"o_proj": cfg.hidden_size}, cfg.o_bias, fast)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, lora: LoRABatch,
                attend: Attend) -> torch.Tensor:
        """`attend(q, k, v)` decides where keys live: the paged cache when serving, tensors when training."""
        cfg = self.cfg
        q, k, v = self.qkv_proj(x, lora).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = rotary(q.view(-1, cfg.num_heads, cfg.head_dim), k.view(-1, cfg.num_kv_heads, cfg.head_dim),
                      positions, cos_sin, self.fast)
        return self.o_proj(attend(q, k, v.view(-1, cfg.num_kv_heads, cfg.head_dim)).flatten(1), lora)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, fast: bool):
        super().__init__()
        self.fast = fast
        self.gate_up_proj = MergedLoRALinear(cfg.hidden_size, {"gate_proj": cfg.intermediate_size,
                                                               "up_proj": cfg.intermediate_size}, False, fast)
        self.down_proj = MergedLoRALinear(cfg.intermediate_size, {"down_proj": cfg.hidden_size}, False, fast)

    def forward(self, x: torch.Tensor, lora: LoRABatch) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x, lora), self.fast), lora)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, fast: bool):
        super().__init__()
        self.self_attn = Attention(cfg, fast)
        self.mlp = MLP(cfg, fast)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fast)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fast)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                cos_sin: torch.Tensor, lora: LoRABatch, attend: Attend) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream travels as (hidden, residual) so each add fuses into the next norm; the stream
        after the layer is hidden + residual (with residual None the input stream is `hidden`)."""
        x, residual = self.input_layernorm(hidden, residual)
        x, residual = self.post_attention_layernorm(self.self_attn(x, positions, cos_sin, lora, attend), residual)
        return self.mlp(x, lora), residual


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, fast: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, fast) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fast)


def stream(hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """The residual stream's value, rounded as the fused add rounds it."""
    return hidden if residual is None else hidden + residual


def keep_stream(hidden: torch.Tensor, residual: torch.Tensor | None, rows: torch.Tensor, out: torch.Tensor) -> None:
    """The stream's value at `rows`, written into `out` (rounded as `stream` rounds it)."""
    if residual is None:
        torch.index_select(hidden, 0, rows, out=out)
    else:
        torch.add(hidden.index_select(0, rows), residual.index_select(0, rows), out=out)


class CausalLM(nn.Module):
    """Hugging Face names stay the outside view: `hf_tensors()` maps each checkpoint tensor to its slice of a
    merged parameter, and `lora_targets()` lists the adaptable projections by their Hugging Face module names."""

    def __init__(self, cfg: ModelConfig, fast: bool = False):
        super().__init__()
        self.cfg, self.fast = cfg, fast
        self.model = Decoder(cfg, fast)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rotary_inv_freq(cfg), persistent=False)
        self.register_buffer("cos_sin", rotary_cache(self.inv_freq, cfg.max_position_embeddings),
                             persistent=False)
        for prefix, m in self.named_modules():
            if isinstance(m, MergedLoRALinear):
                parent = prefix.rsplit(".", 1)[0]
                m.names = [f"{parent}.{s}" for s in m.slice_names]

    def merged_linears(self) -> list[MergedLoRALinear]:
        return [m for m in self.modules() if isinstance(m, MergedLoRALinear)]

    def lora_targets(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each adaptable projection by its Hugging Face module name."""
        return {name: (m.in_features, size) for m in self.merged_linears() for name, size in zip(m.names, m.sizes)}

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter under its Hugging Face checkpoint name (merged ones as views of their slice)."""
        out = {}
        for name, p in self.named_parameters():
            owner = self.get_submodule(name.rsplit(".", 1)[0])
            if not isinstance(owner, MergedLoRALinear):
                out[name] = p
        for m in self.merged_linears():
            out.update(m.hf_tensors())
        return out

    def reset_rotary(self) -> None:
        """Recompute the rotary tables in float32, as Hugging Face keeps them (after materialising from the meta
        device and casting the weights)."""
        device = self.lm_head.weight.device
        self.inv_freq = rotary_inv_freq(self.cfg).to(device)
        self.cos_sin = rotary_cache(self.inv_freq, self.cfg.max_position_embeddings)

    def forward(self, batch: ForwardBatch, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Run the batch, writing its keys/values into the cache; returns logits [len(logits_indices), V].
        Layer inputs of `capture_rows` (and their final hidden state) are kept in `batch.captured`."""
        cfg, scale = self.cfg, self.cfg.head_dim ** -0.5
        hidden, residual = self.model.embed_tokens(batch.input_ids), None
        rows = batch.capture_rows
        if rows is not None and batch.captured is None:
            batch.captured = hidden.new_empty(cfg.num_layers + 1, rows.shape[0], cfg.hidden_size)
        for i, (layer, cache) in enumerate(zip(self.model.layers, kv_caches)):
            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return paged_attention(q, k, v, cache, batch.attn, scale, cfg.sliding_window, self.fast)
            if rows is not None:
                keep_stream(hidden, residual, rows, batch.captured[i])
            hidden, residual = layer(hidden, residual, batch.positions, self.cos_sin, batch.lora, attend)
        if rows is not None:
            keep_stream(hidden, residual, rows, batch.captured[-1])
        idx = batch.logits_indices
        x, _ = self.model.norm(hidden.index_select(0, idx), residual.index_select(0, idx))
        return linear(x, self.lm_head.weight, None, self.fast).float()
