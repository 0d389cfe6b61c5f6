"""Llama-family decoder over a flat token batch: RMSNorm, rotary, GQA paged attention, SwiGLU, LoRA-aware
projections. One forward serves any mix of prefill chunks and decode tokens of many sequences."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from coserve.engine.model.config import ModelConfig
from coserve.kernels.lora import lora_delta_torch
from coserve.kernels.paged_attention import decode_attention_torch, paged_attention_torch, write_kv_torch

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ForwardBatch:
    """Everything one forward needs: flat tokens plus, per sequence, where its queries and KV blocks are."""

    input_ids: torch.Tensor          # [T]
    positions: torch.Tensor          # [T]
    slot_mapping: torch.Tensor       # [T] cache slot of each token
    block_tables: list[torch.Tensor]  # sequences with several query tokens (prefill chunks) ...
    query_starts: list[int]
    query_lens: list[int]
    context_lens: list[int]
    logits_indices: torch.Tensor     # rows whose logits are wanted
    decode_rows: torch.Tensor | None = None     # ... and sequences with one (decode), attended in one pass
    decode_tables: torch.Tensor | None = None   # [B, blocks], padded
    decode_context_lens: torch.Tensor | None = None
    decode_max_context: int = 0
    lora_groups: list["LoRAGroup"] = field(default_factory=list)
    capture_rows: torch.Tensor | None = None   # rows whose layer inputs finetuning keeps
    captured: list[torch.Tensor] = field(default_factory=list)  # per layer input, then the final hidden state


class TrainableLoRA(Protocol):
    """A finetuning job's adapter in autograd form; it applies to every row of the unit it is passed to."""

    def delta(self, module: str, x: torch.Tensor) -> torch.Tensor | None: ...


@dataclass
class LoRAGroup:
    """Rows that use one adapter: a serving slot, or a training job's adapter (then every row of the unit).
    `dropout(module, x)`, if set, drops the LoRA branch's input as PEFT's lora_dropout does."""

    owner: "int | TrainableLoRA"
    rows: torch.Tensor | None = None
    dropout: Callable[[str, torch.Tensor], torch.Tensor] | None = None


LoRAGroups = list[LoRAGroup]
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class LoRALinear(nn.Module):
    """A linear layer plus stacked LoRA slots; each token adds the delta of its own adapter, if any."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.name = ""                    # Hugging Face module name, set by CausalLM
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.lora_a: torch.Tensor | None = None   # [S, R, in]
        self.lora_b: torch.Tensor | None = None   # [S, out, R]
        self.lora_scale: torch.Tensor | None = None  # [S]; 0 where the slot does not adapt this module
        self.lora_on: list[bool] = []     # host copy of lora_scale != 0, so the hot path never syncs

    def forward(self, x: torch.Tensor, lora_groups: LoRAGroups) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight, self.bias)
        served = [g for g in lora_groups if isinstance(g.owner, int) and self.lora_on and self.lora_on[g.owner]]
        plain = [(g.owner, g.rows) for g in served if g.dropout is None]
        if plain:
            lora_delta_torch(x, self.lora_a, self.lora_b, self.lora_scale, plain, y)
        for g in served:
            if g.dropout is not None:
                xs = g.dropout(self.name, x.index_select(0, g.rows))
                every = torch.arange(len(g.rows), device=x.device)
                delta = lora_delta_torch(xs, self.lora_a, self.lora_b, self.lora_scale, [(g.owner, every)],
                                         torch.zeros(len(g.rows), y.shape[1], dtype=y.dtype, device=y.device))
                y.index_add_(0, g.rows, delta)
        for g in lora_groups:
            if not isinstance(g.owner, int):
                d = g.owner.delta(self.name, g.dropout(self.name, x) if g.dropout else x)
                if d is not None:
                    y = y + d
        return y


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


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate halves (the Hugging Face Llama convention). x: [T, H, D]; cos/sin: [T, D/2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = LoRALinear(cfg.hidden_size, cfg.num_heads * hd, cfg.qkv_bias)
        self.k_proj = LoRALinear(cfg.hidden_size, cfg.num_kv_heads * hd, cfg.qkv_bias)
        self.v_proj = LoRALinear(cfg.hidden_size, cfg.num_kv_heads * hd, cfg.qkv_bias)
        self.o_proj = LoRALinear(cfg.num_heads * hd, cfg.hidden_size, cfg.o_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, g: LoRAGroups,
                attend: Attend) -> torch.Tensor:
        """`attend(q, k, v)` decides where keys live: the paged cache when serving, tensors when training."""
        cfg = self.cfg
        q = apply_rotary(self.q_proj(x, g).view(-1, cfg.num_heads, cfg.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x, g).view(-1, cfg.num_kv_heads, cfg.head_dim), cos, sin)
        v = self.v_proj(x, g).view(-1, cfg.num_kv_heads, cfg.head_dim)
        return self.o_proj(attend(q, k, v).flatten(1), g)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = LoRALinear(cfg.hidden_size, cfg.intermediate_size, False)
        self.up_proj = LoRALinear(cfg.hidden_size, cfg.intermediate_size, False)
        self.down_proj = LoRALinear(cfg.intermediate_size, cfg.hidden_size, False)

    def forward(self, x: torch.Tensor, g: LoRAGroups) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x, g)) * self.up_proj(x, g), g)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, g: LoRAGroups,
                attend: Attend) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, g, attend)
        return x + self.mlp(self.post_attention_layernorm(x), g)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """Module names mirror Hugging Face's, so checkpoint tensors load by name."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rotary_inv_freq(cfg), persistent=False)
        for name, m in self.named_modules():
            if isinstance(m, LoRALinear):
                m.name = name

    def lora_modules(self) -> dict[str, LoRALinear]:
        """Adaptable projections by their Hugging Face name (e.g. `model.layers.0.self_attn.q_proj`)."""
        return {name: m for name, m in self.named_modules() if isinstance(m, LoRALinear)}

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        return freqs.cos(), freqs.sin()

    def forward(self, batch: ForwardBatch, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Run the batch, writing its keys/values into the cache; returns logits [len(logits_indices), V].
        Layer inputs of `capture_rows` (and their final hidden state) are appended to `batch.captured`."""
        cos, sin = self.rotary(batch.positions)
        cfg = self.cfg
        x = self.model.embed_tokens(batch.input_ids)
        for layer, (k_cache, v_cache) in zip(self.model.layers, kv_caches):
            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                write_kv_torch(k, v, k_cache, v_cache, batch.slot_mapping)
                out = torch.empty_like(q)
                if batch.decode_rows is not None:
                    out[batch.decode_rows] = decode_attention_torch(
                        q[batch.decode_rows], k_cache, v_cache, batch.decode_tables, batch.decode_context_lens,
                        batch.decode_max_context, cfg.head_dim ** -0.5, cfg.sliding_window)
                return paged_attention_torch(q, k_cache, v_cache, batch.block_tables, batch.query_starts,
                                             batch.query_lens, batch.context_lens, cfg.head_dim ** -0.5,
                                             cfg.sliding_window, out)
            if batch.capture_rows is not None:
                batch.captured.append(x.index_select(0, batch.capture_rows))
            x = layer(x, cos, sin, batch.lora_groups, attend)
        if batch.capture_rows is not None:
            batch.captured.append(x.index_select(0, batch.capture_rows))
        x = self.model.norm(x.index_select(0, batch.logits_indices))
        return self.lm_head(x).float()
