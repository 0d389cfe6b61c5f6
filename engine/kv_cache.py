"""Paged KV cache: fixed-size blocks of key/value slots, handed to sequences by a block manager."""
from __future__ import annotations

import torch

from coserve.engine.model.config import ModelConfig


class BlockManager:
    """Owns the free list; each sequence holds a block table that grows as its tokens are cached."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))
        self.tables: dict[str, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, seq_id: str, num_tokens: int) -> int:
        """Extra blocks `seq_id` needs so that `num_tokens` of its tokens fit."""
        have = len(self.tables.get(seq_id, ()))
        return max(0, -(-num_tokens // self.block_size) - have)

    def can_allocate(self, seq_id: str, num_tokens: int) -> bool:
        return self.blocks_needed(seq_id, num_tokens) <= len(self.free)

    def allocate(self, seq_id: str, num_tokens: int) -> list[int]:
        """Grow the sequence's table to hold `num_tokens`; raises if the blocks are not there."""
        need = self.blocks_needed(seq_id, num_tokens)
        if need > len(self.free):
            raise RuntimeError(f"out of KV blocks: {seq_id} needs {need}, {len(self.free)} free")
        table = self.tables.setdefault(seq_id, [])
        table.extend(self.free.pop() for _ in range(need))
        return table

    def release(self, seq_id: str) -> None:
        self.free.extend(reversed(self.tables.pop(seq_id, [])))

    def slot(self, seq_id: str, position: int) -> int:
        table = self.tables[seq_id]
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks


def allocate_kv_caches(cfg: ModelConfig, num_blocks: int, block_size: int, device: str,
                       dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    return [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            for _ in range(cfg.num_layers)]


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8
