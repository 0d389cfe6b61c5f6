"""Executes one planned iteration on the device: packs the chunks into a flat batch (or, for a decode-only
iteration on a GPU, into the static buffers of a captured CUDA graph), runs the model and samples every row."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from coserve.engine.kv_cache import BlockManager
from coserve.engine.layers.attention import AttentionMetadata
from coserve.engine.layers.lora_batch import DroppedGroup, LoRABatch
from coserve.engine.layers.sampler import Sampler
from coserve.engine.lora import LoRARegistry
from coserve.engine.model.llama import CausalLM, ForwardBatch
from coserve.engine.scheduler import Chunk

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


def kv_splits(batch: int, kv_heads: int, sms: int = 132) -> int:
    """Split long contexts across programs when a decode batch alone would leave most multiprocessors idle."""
    return max(1, min(16, -(-2 * sms // max(1, batch * kv_heads))))


def chunk_slots(table: list[int], start: int, length: int, block_size: int) -> np.ndarray:
    pos = np.arange(start, start + length)
    return np.asarray(table, dtype=np.int64)[pos // block_size] * block_size + pos % block_size


def build_batch(chunks: list[Chunk], blocks: BlockManager, device: str | torch.device, all_logits: bool = False,
                num_slots: int = 0, kv_heads: int = 1) -> ForwardBatch:
    """Flatten the chunks; logits are kept for sampling rows only, unless `all_logits`."""
    ids, positions, slots, token_lora = [], [], [], []
    starts, seq_lens, tables, logit_rows, capture = [0], [], [], [], []
    dropped: list[tuple[int, int, int, object]] = []
    row = 0
    for c in chunks:
        sid, end = c.seq.request_id, c.start + c.length
        ids.append(np.asarray(c.seq.token_ids[c.start:end], dtype=np.int64))
        positions.append(np.arange(c.start, end))
        slots.append(chunk_slots(blocks.tables[sid], c.start, c.length, blocks.block_size))
        slot = c.seq.adapter_slot
        served = slot is not None and c.dropout is None
        token_lora.append(np.full(c.length, slot if served else -1, dtype=np.int32))
        if slot is not None and c.dropout is not None:
            dropped.append((slot, row, c.length, c.dropout))
        if c.finetune:
            capture.extend(range(row, row + c.length))
        if all_logits:
            logit_rows.extend(range(row, row + c.length))
        elif c.samples:
            logit_rows.append(row + c.length - 1)
        tables.append(blocks.tables[sid])
        seq_lens.append(end)
        row += c.length
        starts.append(row)
    width = max(map(len, tables))
    table_arr = np.zeros((len(tables), width), dtype=np.int32)
    for i, tb in enumerate(tables):
        table_arr[i, :len(tb)] = tb

    def t(values, dtype=torch.long) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values), dtype=dtype).to(device, non_blocking=True)

    token_lora_t = t(np.concatenate(token_lora), torch.int32)
    any_slot = bool(any(tl.size and tl[0] >= 0 for tl in token_lora))
    lora = LoRABatch(token_lora_t, any_slot, num_slots,
                     dropped=[DroppedGroup(s, torch.arange(r, r + n, device=device), d) for s, r, n, d in dropped])
    lens = np.diff(starts)
    attn = AttentionMetadata(t(np.concatenate(slots)), t(starts, torch.int32), t(seq_lens, torch.int32),
                             t(table_arr, torch.int32), int(lens.max()), max(seq_lens),
                             kv_splits(len(chunks), kv_heads) if lens.max() == 1 else 1)
    return ForwardBatch(t(np.concatenate(ids)), t(np.concatenate(positions)), attn, lora, t(logit_rows),
                        t(capture) if capture else None)


class DecodeGraphs:
    """CUDA graphs of decode iterations at padded batch sizes, over static input buffers: a replay costs one
    launch instead of hundreds. Padding rows write no KV (slot -1) and attend to nothing (length 0)."""

    def __init__(self, model: CausalLM, kv_caches: list, blocks: BlockManager, loras: LoRARegistry,
                 max_batch: int, max_model_len: int):
        self.model, self.kv_caches, self.blocks, self.loras = model, kv_caches, blocks, loras
        self.sizes = [s for s in GRAPH_BATCH_SIZES if s < max_batch] + [max_batch]
        self.max_model_len = max_model_len
        dev = model.lm_head.weight.device
        n, width = self.sizes[-1], -(-max_model_len // blocks.block_size)
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.tables = torch.zeros(n, width, dtype=torch.int32, device=dev)
        self.token_lora = torch.full((n,), -1, dtype=torch.int32, device=dev)
        self.query_start = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.rows = torch.arange(n, dtype=torch.long, device=dev)    # logits rows: static, as graphs need
        self.host = {name: torch.zeros(buf.shape, dtype=buf.dtype, pin_memory=True) for name, buf in
                     (("ids", self.ids), ("positions", self.positions), ("slots", self.slots),
                      ("seq_lens", self.seq_lens), ("tables", self.tables), ("token_lora", self.token_lora))}
        self.host_np = {name: buf.numpy() for name, buf in self.host.items()}   # cheap element writes
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.lora_version = loras.version
        self.pool = None

    def fits(self, chunks: list[Chunk]) -> bool:
        return (len(chunks) <= self.sizes[-1] and
                all(c.length == 1 and not c.finetune and c.dropout is None for c in chunks))

    def _batch(self, bs: int, with_lora: bool) -> ForwardBatch:
        attn = AttentionMetadata(self.slots[:bs], self.query_start[:bs + 1], self.seq_lens[:bs], self.tables[:bs],
                                 1, self.max_model_len, kv_splits(bs, self.model.cfg.num_kv_heads))
        lora = LoRABatch(self.token_lora[:bs], with_lora, self.loras.max_loras)
        return ForwardBatch(self.ids[:bs], self.positions[:bs], attn, lora, self.rows[:bs])

    @torch.no_grad()
    def _capture(self, bs: int, with_lora: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        batch = self._batch(bs, with_lora)

        def forward() -> torch.Tensor:
            batch.lora = LoRABatch(self.token_lora[:bs], with_lora, self.loras.max_loras)   # regrouped per replay
            return self.model(batch, self.kv_caches)

        self.slots[:bs].fill_(-1)
        self.seq_lens[:bs].zero_()
        self.token_lora[:bs].fill_(-1)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            forward()                    # compiles the kernels and warms the allocator outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = forward()
        self.pool = graph.pool()
        return graph, logits

    @torch.no_grad()
    def capture_all(self) -> None:
        """Capture the base-model graph of every size up front (largest first, so smaller ones share its pool)."""
        for bs in reversed(self.sizes):
            self.graphs[(bs, False)] = self._capture(bs, False)

    def run(self, chunks: list[Chunk]) -> torch.Tensor:
        """Logits [len(chunks), V] of a decode-only iteration, by replaying the graph of the next size up."""
        b = len(chunks)
        bs = next(s for s in self.sizes if s >= b)
        with_lora = any(c.seq.adapter_slot is not None for c in chunks)
        if self.loras.version != self.lora_version:      # stacks reallocated: LoRA graphs hold stale pointers
            self.graphs = {k: v for k, v in self.graphs.items() if not k[1]}
            self.lora_version = self.loras.version
        bsz = self.blocks.block_size
        h = self.host_np
        for i, c in enumerate(chunks):
            table = self.blocks.tables[c.seq.request_id]
            pos = c.start
            h["ids"][i] = c.seq.token(pos)
            h["positions"][i] = pos
            h["slots"][i] = table[pos // bsz] * bsz + pos % bsz
            h["seq_lens"][i] = pos + 1
            h["token_lora"][i] = -1 if c.seq.adapter_slot is None else c.seq.adapter_slot
            h["tables"][i, :len(table)] = table
        h["slots"][b:bs] = -1
        h["seq_lens"][b:bs] = 0
        h["token_lora"][b:bs] = -1
        h = self.host
        for name in ("ids", "positions", "slots", "seq_lens", "token_lora", "tables"):
            getattr(self, name)[:bs].copy_(h[name][:bs], non_blocking=True)
        key = (bs, with_lora)
        if key not in self.graphs:
            self.graphs[key] = self._capture(bs, with_lora)
            return self.run(chunks)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits[:b]


@dataclass
class StepResult:
    """Per sampling chunk (in order): token, logprob and whether its logits were unusable; per finetuning chunk
    its kept activations (each layer's input, then the final hidden state)."""

    tokens: list[int]
    logprobs: list[float]
    bad: list[bool]
    kept: list[list[torch.Tensor]]


class Runner:
    def __init__(self, model: CausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], blocks: BlockManager,
                 loras: LoRARegistry, device: str, cuda_graphs: bool, max_num_seqs: int, max_model_len: int):
        self.model = model
        self.kv_caches = kv_caches
        self.blocks = blocks
        self.loras = loras
        self.device = device
        self.sampler = Sampler(device)
        self.graphs = DecodeGraphs(model, kv_caches, blocks, loras, max_num_seqs, max_model_len) \
            if cuda_graphs and device.startswith("cuda") else None

    def warmup(self) -> None:
        if self.graphs is not None:
            self.graphs.capture_all()

    @torch.no_grad()
    def run(self, chunks: list[Chunk]) -> StepResult:
        sampling = [c.seq for c in chunks if c.samples]
        kept: list[list[torch.Tensor]] = []
        if self.graphs is not None and self.graphs.fits(chunks):
            logits = self.graphs.run(chunks)
        else:
            batch = build_batch(chunks, self.blocks, self.device, num_slots=self.loras.max_loras,
                                kv_heads=self.model.cfg.num_kv_heads)
            logits = self.model(batch, self.kv_caches)
            row = 0
            for c in chunks:
                if c.finetune:
                    kept.append([h[row:row + c.length] for h in batch.captured])
                    row += c.length
        if not sampling:
            return StepResult([], [], [], kept)
        tokens, logprobs, bad = self.sampler.sample(logits, sampling)
        return StepResult(tokens, logprobs, bad, kept)
