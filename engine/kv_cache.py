"""Paged KV cache: fixed-size blocks of key/value slots, handed to sequences by a block manager that also
keeps full blocks cached by content, so requests sharing a prefix (under the same adapter) share its blocks."""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from coserve.engine.model.config import ModelConfig

ROOT_HASH = bytes(32)        # the parent of a sequence's first block
FINETUNE_PREFIX = "ft:"      # finetuning sequences: KV from a changing adapter, never cached or matched


def hash_block(parent: bytes, token_ids: Sequence[int], salt: str | None) -> bytes:
    """A full block's identity: its tokens, everything before it (through the parent's hash) and the salt that
    names the adapter; sha256 so that no prompt can be crafted to collide with another user's block."""
    salt_bytes = b"\x00" if salt is None else b"\x01" + struct.pack("<I", len(salt.encode())) + salt.encode()
    return hashlib.sha256(parent + salt_bytes + struct.pack(f"<{len(token_ids)}q", *token_ids)).digest()


@dataclass(frozen=True)
class PrefixHit:
    """The cached blocks holding the longest cached prefix of a sequence's tokens; `query_tokens` is how many
    tokens were looked up (0 when the sequence may not use the cache)."""

    blocks: tuple[int, ...] = ()
    block_size: int = 0
    query_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.blocks) * self.block_size


class BlockManager:
    """Owns the blocks: each sequence holds a block table that grows as its tokens are cached. Blocks are
    reference-counted; a full block whose KV is written is registered under its hash and, once no sequence
    holds it, waits in an LRU of evictable blocks until a new block is needed and no never-cached one is free."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))   # unreferenced blocks holding no cached KV
        self.evictable: OrderedDict[int, None] = OrderedDict()       # unreferenced cached blocks, oldest first
        self.refs = [0] * num_blocks
        self.tables: dict[str, list[int]] = {}
        self.cached: dict[bytes, int] = {}          # hash -> the block holding that content
        self.block_hashes: dict[int, bytes] = {}    # block -> its hash, for cached blocks
        self._seq_hashes: dict[str, list[bytes]] = {}   # chain hashes of a sequence's full blocks, memoized
        self._committed: dict[str, int] = {}        # leading blocks of a sequence already offered to the cache
        self.prefix_queries = 0                     # tokens looked up at admission
        self.prefix_hits = 0                        # of those, tokens found cached

    @property
    def num_free(self) -> int:
        """Blocks that can be allocated now: never-cached ones plus cached ones no sequence holds."""
        return len(self.free) + len(self.evictable)

    def blocks_needed(self, seq_id: str, num_tokens: int) -> int:
        """Extra blocks `seq_id` needs so that `num_tokens` of its tokens fit."""
        have = len(self.tables.get(seq_id, ()))
        return max(0, -(-num_tokens // self.block_size) - have)

    def can_allocate(self, seq_id: str, num_tokens: int, prefix: PrefixHit | None = None) -> bool:
        """Whether `allocate` with the same arguments would succeed; blocks of `prefix` that sit in the LRU
        stop being free once taken, so they count against what is left."""
        if prefix is None or not prefix.blocks:
            return self.blocks_needed(seq_id, num_tokens) <= self.num_free
        taken_free = sum(1 for b in prefix.blocks if self.refs[b] == 0)
        need = max(0, -(-num_tokens // self.block_size) - len(prefix.blocks))
        return need <= self.num_free - taken_free

    def allocate(self, seq_id: str, num_tokens: int, prefix: PrefixHit | None = None) -> list[int]:
        """Grow the sequence's table to hold `num_tokens`, starting a new table with `prefix`'s cached blocks;
        raises if the blocks are not there."""
        if not self.can_allocate(seq_id, num_tokens, prefix):
            need = self.blocks_needed(seq_id, num_tokens) - (len(prefix.blocks) if prefix else 0)
            raise RuntimeError(f"out of KV blocks: {seq_id} needs {need}, {self.num_free} free")
        if prefix is not None:
            self._take_prefix(seq_id, prefix)
        table = self.tables.setdefault(seq_id, [])
        table.extend(self._new_block() for _ in range(self.blocks_needed(seq_id, num_tokens)))
        return table

    def append_block(self, seq_id: str) -> None:
        """One more block for a sequence (a decode token crossing into a new block); the caller checked that
        one is free."""
        self.tables[seq_id].append(self._new_block())

    def _take_prefix(self, seq_id: str, prefix: PrefixHit) -> None:
        if seq_id in self.tables:
            raise ValueError(f"{seq_id} already holds blocks; a cached prefix starts a new table")
        for b in prefix.blocks:
            if self.refs[b] == 0:
                del self.evictable[b]
            self.refs[b] += 1
        self.tables[seq_id] = list(prefix.blocks)
        self._committed[seq_id] = len(prefix.blocks)
        self.prefix_queries += prefix.query_tokens
        self.prefix_hits += prefix.num_tokens

    def _new_block(self) -> int:
        if self.free:
            block = self.free.pop()
        else:   # evict the least recently freed cached block
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.block_hashes.pop(block)]
        self.refs[block] = 1
        return block

    def release(self, seq_id: str) -> None:
        """Drop the sequence's references; its cached blocks stay cached (tail blocks first in line for
        eviction, since a prefix without its head can never be matched)."""
        self._seq_hashes.pop(seq_id, None)
        self._committed.pop(seq_id, None)
        for b in reversed(self.tables.pop(seq_id, [])):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self.block_hashes:
                    self.evictable[b] = None
                else:
                    self.free.append(b)

    def slot(self, seq_id: str, position: int) -> int:
        table = self.tables[seq_id]
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    # ---- prefix caching -----------------------------------------------------------------------------
    def _cacheable(self, seq_id: str) -> bool:
        return self.enable_prefix_caching and not seq_id.startswith(FINETUNE_PREFIX)

    def _hashes(self, seq_id: str, token_ids: Sequence[int], salt: str | None, n: int) -> list[bytes]:
        """The chain hashes of the sequence's first `n` full blocks (tokens only ever append, so memoized)."""
        hashes = self._seq_hashes.setdefault(seq_id, [])
        bs = self.block_size
        while len(hashes) < n:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else ROOT_HASH, token_ids[i * bs:(i + 1) * bs], salt))
        return hashes

    def lookup(self, seq_id: str, token_ids: Sequence[int], salt: str | None) -> PrefixHit:
        """The longest cached prefix of full blocks, never the whole sequence: its last token is always
        computed so that its logits exist. Pass the result to `allocate` to take the blocks."""
        if not self._cacheable(seq_id) or not token_ids:
            return PrefixHit(block_size=self.block_size)
        limit = (len(token_ids) - 1) // self.block_size
        blocks = []
        for h in self._hashes(seq_id, token_ids, salt, limit)[:limit]:
            block = self.cached.get(h)
            if block is None:
                break
            blocks.append(block)
        return PrefixHit(tuple(blocks), self.block_size, len(token_ids))

    def num_committed(self, seq_id: str) -> int:
        """Leading blocks of the sequence already offered to the cache (a cheap check before `commit`)."""
        return self._committed.get(seq_id, 0)

    def commit(self, seq_id: str, token_ids: Sequence[int], num_computed: int, salt: str | None) -> None:
        """Register the sequence's full blocks whose KV is written (`num_computed` tokens, on the stream that
        later readers use). A block whose content another block already holds stays private to this sequence."""
        table = self.tables.get(seq_id)
        if table is None or not self._cacheable(seq_id):
            return
        full = min(num_computed, len(token_ids)) // self.block_size
        full = min(full, len(table))
        start = self._committed.get(seq_id, 0)
        if full <= start:
            return
        hashes = self._hashes(seq_id, token_ids, salt, full)
        for i in range(start, full):
            block, h = table[i], hashes[i]
            if block not in self.block_hashes and h not in self.cached:
                self.cached[h] = block
                self.block_hashes[block] = h
        self._committed[seq_id] = full


def allocate_kv_caches(cfg: ModelConfig, num_blocks: int, block_size: int, device: str,
                       dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    return [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            for _ in range(cfg.num_layers)]


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8
