"""Executes one planned iteration on the device: packs the chunks into a flat batch (on a GPU, into the static
buffers of a captured CUDA graph: per batch size for decode-only iterations, per token count for mixed ones), runs
the model and samples every row."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from coserve.engine.kv_cache import BlockManager
from coserve.engine.layers.attention import AttentionMetadata
from coserve.engine.layers.lora_batch import DroppedGroup, LoRABatch
from coserve.engine.layers.sampler import SampledOnHost, Sampler
from coserve.engine.lora import LoRARegistry
from coserve.engine.model.llama import CausalLM, ForwardBatch
from coserve.engine.scheduler import Chunk
from coserve.engine.sequence import Sequence

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


def kv_splits(batch: int, kv_heads: int, sms: int = 132) -> int:
    """Split long contexts across programs when a decode batch alone would leave most multiprocessors idle."""
    return max(1, min(16, -(-2 * sms // max(1, batch * kv_heads))))


def mixed_kv_splits(bucket: int, kv_heads: int) -> int:
    """Key splits of a mixed iteration's attention, fixed per token bucket (graphs): a short prompt after a
    prefix-cache hit is one or two query tiles walking a long cached prefix, which alone would leave most
    multiprocessors idle; larger buckets have query tiles enough."""
    return kv_splits(-(-bucket // 16), kv_heads) if bucket <= 32 else 1


def chunk_slots(table: list[int], start: int, length: int, block_size: int) -> np.ndarray:
    pos = np.arange(start, start + length)
    return np.asarray(table, dtype=np.int64)[pos // block_size] * block_size + pos % block_size


@dataclass
class Packed:
    """The chunks of an iteration flattened on the host: per token, per sequence, and the rows that matter."""

    ids: np.ndarray           # int64 [T]
    positions: np.ndarray     # int64 [T]
    slots: np.ndarray         # int64 [T]: KV cache slot of each token
    token_lora: np.ndarray    # int32 [T]: serving adapter slot, -1 for none
    starts: np.ndarray        # int32 [B+1]
    seq_lens: np.ndarray      # int32 [B]
    tables: list[list[int]]   # each sequence's block table
    logit_rows: list[int]
    capture: list[int]        # rows of finetuning chunks, whose layer inputs are kept
    dropped: list[tuple[int, int, int, object]]   # (slot, first row, rows, dropout) of dropped-out chunks

    def table_array(self, width: int | None = None) -> np.ndarray:
        out = np.zeros((len(self.tables), width or max(map(len, self.tables))), dtype=np.int32)
        for i, tb in enumerate(self.tables):
            out[i, :len(tb)] = tb
        return out


def pack(chunks: list[Chunk], blocks: BlockManager, all_logits: bool = False) -> Packed:
    """Flatten the chunks; logits are wanted for sampling rows only, unless `all_logits`."""
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
    return Packed(np.concatenate(ids), np.concatenate(positions), np.concatenate(slots),
                  np.concatenate(token_lora), np.asarray(starts, dtype=np.int32),
                  np.asarray(seq_lens, dtype=np.int32), tables, logit_rows, capture, dropped)


def build_batch(chunks: list[Chunk], blocks: BlockManager, device: str | torch.device, all_logits: bool = False,
                num_slots: int = 0, kv_heads: int = 1) -> ForwardBatch:
    """The chunks as a forward batch of fresh device tensors (the eager path)."""
    p = pack(chunks, blocks, all_logits)

    def t(values, dtype=torch.long) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values), dtype=dtype).to(device, non_blocking=True)

    lora = LoRABatch(t(p.token_lora, torch.int32), bool((p.token_lora >= 0).any()), num_slots,
                     dropped=[DroppedGroup(s, torch.arange(r, r + n, device=device), d) for s, r, n, d in p.dropped])
    lens = np.diff(p.starts)
    attn = AttentionMetadata(t(p.slots), t(p.starts, torch.int32), t(p.seq_lens, torch.int32),
                             t(p.table_array(), torch.int32), int(lens.max()), int(p.seq_lens.max()),
                             kv_splits(len(chunks), kv_heads) if lens.max() == 1 else 1)
    return ForwardBatch(t(p.ids), t(p.positions), attn, lora, t(p.logit_rows), t(p.capture) if p.capture else None)


class DecodeInputs:
    """The inputs of a decode-only iteration in persistent buffers: host rows written in place (numpy views of
    pinned memory on a GPU) and sent in two copies; on a CPU the host buffers are the inputs. A row's block table
    is rewritten only when another sequence takes the row or its table grew."""

    def __init__(self, max_batch: int, max_model_len: int, block_size: int, device: str):
        n, width = max_batch, -(-max_model_len // block_size)
        self.max_batch, self.block_size = n, block_size
        on_host = not device.startswith("cuda")
        self.host64 = torch.zeros(3, n, dtype=torch.long, pin_memory=not on_host)     # ids, positions, slots
        self.host32 = torch.zeros(2 * n + n * width, dtype=torch.int32, pin_memory=not on_host)  # lens, lora, tables
        self.dev64 = self.host64 if on_host else self.host64.to(device)
        self.dev32 = self.host32 if on_host else self.host32.to(device)
        self.ids, self.positions, self.slots = self.dev64
        self.seq_lens, self.token_lora = self.dev32[:n], self.dev32[n:2 * n]
        self.tables = self.dev32[2 * n:].view(n, width)
        self.query_start = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.rows = torch.arange(n, dtype=torch.long, device=device)    # logits rows: static, as graphs need
        h32 = self.host32.numpy()
        self.h_ids, self.h_positions, self.h_slots = self.host64.numpy()
        self.h_seq_lens, self.h_lora, self.h_tables = h32[:n], h32[n:2 * n], h32[2 * n:].reshape(n, width)
        self.row_table: list[list[int] | None] = [None] * n     # the table each host row holds, and its length
        self.row_len = [0] * n
        self.arange = np.arange(n)
        self.sent: torch.cuda.Event | None = None     # the last copy out of the host rows has been read
        self.fed: torch.Tensor | None = None

    def fill(self, chunks: list[Chunk], tables: dict[str, list[int]], padded: int,
             fed: torch.Tensor | None = None) -> bool:
        """Write the rows of `chunks`, one sampling token each (rows up to `padded` are padding: no KV written,
        nothing attended) and send them to the device; returns whether any row uses an adapter. `fed`: the tokens
        (on the device, one per row) that `ahead` chunks take as input, sampled by the iteration before."""
        if self.sent is not None:       # an iteration queued ahead may not have read the rows yet
            self.sent.synchronize()
        b, bsz = len(chunks), self.block_size
        ids, positions, lora = [], [], []
        row_table, row_len, h_tables = self.row_table, self.row_len, self.h_tables
        for i, c in enumerate(chunks):
            seq = c.seq
            ids.append((seq.output_ids or seq.prompt_ids)[-1])     # a sampling token is the sequence's last
            positions.append(c.start)
            lora.append(-1 if seq.adapter_slot is None else seq.adapter_slot)
            table = tables[seq.request_id]
            if row_table[i] is not table or row_len[i] != len(table):
                h_tables[i, :len(table)] = table
                row_table[i], row_len[i] = table, len(table)
        self.h_ids[:b] = ids
        pos = self.h_positions[:b]
        pos[:] = positions
        self.h_slots[:b] = h_tables[self.arange[:b], pos // bsz] * bsz + pos % bsz
        self.h_seq_lens[:b] = pos + 1
        self.h_lora[:b] = lora
        self.h_slots[b:padded] = -1
        self.h_seq_lens[b:padded] = 0
        self.h_lora[b:padded] = -1
        self.send(2 * self.max_batch + padded * self.tables.shape[1], fed[:b] if fed is not None else None)
        return any(x >= 0 for x in lora)

    def send(self, words32: int | None = None, fed: torch.Tensor | None = None) -> None:
        """Copy the host rows to the device (the first `words32` of the int32 ones; None: all), then the `fed`
        tokens over the first ids (kept for a resend: a capture resets the inputs)."""
        if self.dev64 is not self.host64:
            self.dev64.copy_(self.host64, non_blocking=True)
            self.dev32[:words32].copy_(self.host32[:words32], non_blocking=True)
            self.sent = torch.cuda.Event()
            self.sent.record()
        self.fed = fed
        if fed is not None:
            self.ids[:len(fed)].copy_(fed)

    def batch(self, bs: int, with_lora: bool, num_slots: int, kv_heads: int) -> ForwardBatch:
        """The first `bs` rows as a forward batch (views of the buffers, as a captured graph needs)."""
        attn = AttentionMetadata(self.slots[:bs], self.query_start[:bs + 1], self.seq_lens[:bs], self.tables[:bs],
                                 1, self.tables.shape[1] * self.block_size, kv_splits(bs, kv_heads))
        return ForwardBatch(self.ids[:bs], self.positions[:bs], attn,
                            LoRABatch(self.token_lora[:bs], with_lora, num_slots), self.rows[:bs])


class DecodeGraphs:
    """CUDA graphs of decode iterations at padded batch sizes, over the static buffers of `DecodeInputs`: a
    replay costs one launch instead of hundreds. Padding rows write no KV (slot -1) and attend to nothing."""

    def __init__(self, model: CausalLM, kv_caches: list, inputs: DecodeInputs, loras: LoRARegistry):
        self.model, self.kv_caches, self.inputs, self.loras = model, kv_caches, inputs, loras
        max_batch = inputs.max_batch
        self.sizes = [s for s in GRAPH_BATCH_SIZES if s < max_batch] + [max_batch]
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.lora_version = loras.version
        self.pool = None
        self.captures = 0

    @torch.no_grad()
    def _capture(self, bs: int, with_lora: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        inputs = self.inputs
        batch = inputs.batch(bs, with_lora, self.loras.max_loras, self.model.cfg.num_kv_heads)

        def forward() -> torch.Tensor:
            batch.lora = LoRABatch(inputs.token_lora[:bs], with_lora, self.loras.max_loras)   # regrouped per replay
            return self.model(batch, self.kv_caches)

        inputs.slots[:bs].fill_(-1)
        inputs.seq_lens[:bs].zero_()
        inputs.token_lora[:bs].fill_(-1)
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

    def padded(self, batch: int) -> int:
        return next(s for s in self.sizes if s >= batch)

    def replay(self, b: int, bs: int, with_lora: bool) -> torch.Tensor:
        """Logits [b, V] of the iteration whose inputs were just filled, from the graph of size `bs`; a graph
        not captured yet is captured first (capturing resets the inputs, so they are sent again)."""
        if self.loras.version != self.lora_version:      # stacks reallocated: LoRA graphs hold stale pointers
            self.graphs = {k: v for k, v in self.graphs.items() if not k[1]}
            self.lora_version = self.loras.version
        key = (bs, with_lora)
        if key not in self.graphs:
            self.graphs[key] = self._capture(bs, with_lora)
            self.captures += 1
            self.inputs.send(fed=self.inputs.fed)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits[:b]


TOKEN_BUCKETS = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096)


class MixedGraphs:
    """CUDA graphs of iterations mixing prefill chunks, decode tokens and finetuning chunks, at padded token counts:
    an eager forward launches hundreds of kernels from Python, which bounds a large model's mixed iterations by the
    host. Every graph reads one set of static buffers (max tokens, max sequences): padding tokens write no KV (slot
    -1) and belong to no sequence, padding sequences have no queries. Logits and the kept layer inputs of finetuning
    rows land in static buffers shared by all graphs, read before the next replay."""

    def __init__(self, model: CausalLM, kv_caches: list, loras: LoRARegistry, max_tokens: int, max_seqs: int,
                 max_model_len: int, block_size: int, device: str, pool_owner: DecodeGraphs | None):
        """`pool_owner`: the decode graphs whose memory pool these graphs share (None: no capture, as on a CPU,
        where `fill` and `forward` run the same static-buffer iteration eagerly)."""
        self.model, self.kv_caches, self.loras, self.pool_owner = model, kv_caches, loras, pool_owner
        self.max_tokens, self.max_seqs, self.block_size = max_tokens, max_seqs, block_size
        self.buckets = [b for b in TOKEN_BUCKETS if b < max_tokens] + [max_tokens]
        self.width = -(-max_model_len // block_size)
        t, b = max_tokens, max_seqs
        on_host = not device.startswith("cuda")
        self.host64 = torch.zeros(4 * t + b, dtype=torch.long, pin_memory=not on_host)  # ids, positions, slots, capture
        self.host32 = torch.zeros(t + 2 * b + 1 + b * self.width, dtype=torch.int32, pin_memory=not on_host)
        self.dev64 = self.host64 if on_host else self.host64.to(device)
        self.dev32 = self.host32 if on_host else self.host32.to(device)
        self.ids, self.positions, self.slots, self.capture = self.dev64[:4 * t].view(4, t)
        self.logit_rows = self.dev64[4 * t:]
        self.token_lora, self.query_start = self.dev32[:t], self.dev32[t:t + b + 1]
        self.seq_lens = self.dev32[t + b + 1:t + 2 * b + 1]
        self.tables = self.dev32[t + 2 * b + 1:].view(b, self.width)
        self.logits: torch.Tensor | None = None       # [max_seqs, V] fp32, shared by every graph
        self.captured: torch.Tensor | None = None     # [num_layers + 1, max_tokens, hidden], allocated on first use
        self.graphs: dict[tuple[int, bool, bool], torch.cuda.CUDAGraph] = {}   # (bucket, LoRA, kept rows)
        self.lora_version = loras.version
        self.replays = self.captures = 0
        self.sent: torch.cuda.Event | None = None     # the last copy out of the host buffers has been read

    def fits(self, chunks: list[Chunk]) -> bool:
        return (len(chunks) <= self.max_seqs and sum(c.length for c in chunks) <= self.max_tokens
                and all(c.dropout is None for c in chunks))

    def bucket(self, tokens: int) -> int:
        """The padded token count of the graph that runs `tokens` tokens."""
        return next(b for b in self.buckets if b >= tokens)

    def fill(self, p: Packed) -> int:
        """Write the iteration into the pinned buffers and send them (two copies); returns its token bucket. The
        host may run iterations ahead of the device (units queued behind a forward that samples nothing): the last
        copy out of the buffers must have run before they are written again, or it sends this iteration's rows."""
        if self.sent is not None:
            self.sent.synchronize()
        t, b, n, rows = self.max_tokens, self.max_seqs, len(p.tables), len(p.ids)
        h64, h32 = self.host64.numpy(), self.host32.numpy()
        ids, positions, slots, capture = h64[:4 * t].reshape(4, t)
        ids[:rows], positions[:rows], slots[:rows] = p.ids, p.positions, p.slots
        bucket = self.bucket(rows)
        slots[rows:bucket] = -1
        ids[rows:bucket] = positions[rows:bucket] = 0
        capture[:len(p.capture)] = p.capture
        capture[len(p.capture):bucket] = 0
        logit_rows = h64[4 * t:]
        logit_rows[:len(p.logit_rows)] = p.logit_rows
        logit_rows[len(p.logit_rows):] = 0
        h32[:rows] = p.token_lora
        h32[rows:bucket] = -1
        qs = h32[t:t + b + 1]
        qs[:n + 1] = p.starts
        qs[n + 1:] = rows
        lens = h32[t + b + 1:t + 2 * b + 1]
        lens[:n] = p.seq_lens
        lens[n:] = 0
        tables = h32[t + 2 * b + 1:].reshape(b, self.width)
        for i, tb in enumerate(p.tables):
            tables[i, :len(tb)] = tb
        if self.dev64 is not self.host64:
            self.dev64.copy_(self.host64, non_blocking=True)
            used32 = t + 2 * b + 1 + n * self.width
            self.dev32[:used32].copy_(self.host32[:used32], non_blocking=True)
            self.sent = torch.cuda.Event()
            self.sent.record()
        return bucket

    @torch.no_grad()
    def forward(self, bucket: int, with_lora: bool, with_capture: bool) -> None:
        """The iteration in the static buffers, over `bucket` token rows: logits of the sampling rows into
        `self.logits`, kept layer inputs of the finetuning rows into `self.captured` (what a graph records)."""
        cfg, rows = self.model.cfg, min(bucket, self.max_seqs)
        if self.logits is None:
            self.logits = torch.empty(self.max_seqs, cfg.vocab_size, device=self.dev64.device)
        if with_capture and self.captured is None:
            self.captured = self.model.lm_head.weight.new_empty(cfg.num_layers + 1, self.max_tokens, cfg.hidden_size)
        attn = AttentionMetadata(self.slots[:bucket], self.query_start, self.seq_lens, self.tables, bucket,
                                 self.width * self.block_size, mixed_kv_splits(bucket, cfg.num_kv_heads))
        batch = ForwardBatch(self.ids[:bucket], self.positions[:bucket], attn,
                             LoRABatch(self.token_lora[:bucket], with_lora, self.loras.max_loras),
                             self.logit_rows[:rows], self.capture[:bucket] if with_capture else None,
                             self.captured[:, :bucket] if with_capture else None)
        self.logits[:rows] = self.model(batch, self.kv_caches)

    @torch.no_grad()
    def _capture(self, bucket: int, with_lora: bool, with_capture: bool) -> torch.cuda.CUDAGraph:
        saved = self.dev64.clone(), self.dev32.clone()
        self.dev64.zero_()                   # a larger iteration's rows (logits, kept) would index past this bucket
        self.dev32.zero_()
        self.slots.fill_(-1)                 # the warm-up and the capture write no KV
        self.token_lora.fill_(-1)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.forward(bucket, with_lora, with_capture)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool_owner.pool):
            self.forward(bucket, with_lora, with_capture)
        self.pool_owner.pool = graph.pool()
        self.dev64.copy_(saved[0])
        self.dev32.copy_(saved[1])
        return graph

    @torch.no_grad()
    def capture_all(self, with_lora: bool = False, with_capture: bool = False) -> None:
        """Capture every bucket's graph of this kind up front (largest first): the base model's at start, the
        finetuning forward's (adapters, kept rows) when a job starts, so no serving iteration pays a capture."""
        self._drop_stale_lora_graphs()
        for bucket in reversed(self.buckets):
            if (bucket, with_lora, with_capture) not in self.graphs:
                self.graphs[(bucket, with_lora, with_capture)] = self._capture(bucket, with_lora, with_capture)
                self.captures += with_lora or with_capture

    def _drop_stale_lora_graphs(self) -> None:
        if self.loras.version != self.lora_version:      # stacks reallocated: LoRA graphs hold stale pointers
            self.graphs = {k: v for k, v in self.graphs.items() if not k[1]}
            self.lora_version = self.loras.version

    def prepare(self, chunks: list[Chunk], blocks: BlockManager) -> tuple[Packed, tuple[int, bool, bool]]:
        """Fill the static buffers with the iteration; returns it packed and the key of the graph that runs it:
        (token bucket, any row with an adapter, any row kept for finetuning)."""
        p = pack(chunks, blocks)
        return p, (self.fill(p), bool((p.token_lora >= 0).any()), bool(p.capture))

    def outputs(self, p: Packed) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits of the sampling rows, kept layer inputs of the finetuning rows) after `forward` or a replay."""
        return self.logits[:len(p.logit_rows)], self.captured[:, :len(p.capture)] if p.capture else None

    def run(self, chunks: list[Chunk], blocks: BlockManager) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The iteration's `outputs`, from its graph (captured first if it has none)."""
        self._drop_stale_lora_graphs()
        p, key = self.prepare(chunks, blocks)
        if key not in self.graphs:
            self.graphs[key] = self._capture(*key)
            self.captures += 1
        self.graphs[key].replay()
        self.replays += 1
        return self.outputs(p)


@dataclass
class StepResult:
    """Per sampling chunk (in order): its sequence, token, logprob and whether its logits were unusable; per
    finetuning chunk its kept activations ([num_layers + 1, length, hidden]: each layer's input, then the final
    hidden state); whether the forward was a CUDA graph's replay."""

    seqs: list[Sequence]
    tokens: list[int]
    logprobs: list[float]
    bad: list[bool]
    kept: list[torch.Tensor]
    graphed: bool = False


class InFlight:
    """An iteration queued on the device; `result()` waits for its sampled tokens (one copy to the host)."""

    def __init__(self, seqs: list[Sequence], sampled: SampledOnHost | None, kept: list[torch.Tensor],
                 graphed: bool):
        self.seqs, self.sampled, self.kept, self.graphed = seqs, sampled, kept, graphed

    @property
    def tokens(self) -> torch.Tensor | None:
        """The sampled tokens on the device (an iteration queued behind this one feeds on them)."""
        return None if self.sampled is None else self.sampled.tokens

    def result(self) -> StepResult:
        if self.sampled is None:
            return StepResult([], [], [], [], self.kept, self.graphed)
        return StepResult(self.seqs, *self.sampled.wait(), self.kept, self.graphed)


class Runner:
    def __init__(self, model: CausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], blocks: BlockManager,
                 loras: LoRARegistry, device: str, cuda_graphs: bool, max_num_seqs: int, max_model_len: int,
                 max_batched_tokens: int, extra_seqs: int = 0):
        """`extra_seqs`: sequences an iteration may hold beyond `max_num_seqs` (finetuning jobs' chunks)."""
        self.model = model
        self.kv_caches = kv_caches
        self.blocks = blocks
        self.loras = loras
        self.device = device
        self.sampler = Sampler(device)
        self.decode = DecodeInputs(max_num_seqs, max_model_len, blocks.block_size, device)
        on_gpu = cuda_graphs and device.startswith("cuda")
        self.graphs = DecodeGraphs(model, kv_caches, self.decode, loras) if on_gpu else None
        self.mixed = MixedGraphs(model, kv_caches, loras, max_batched_tokens, max_num_seqs + extra_seqs,
                                 max_model_len, blocks.block_size, device, self.graphs) if on_gpu else None

    def warmup(self) -> None:
        if self.graphs is not None:
            self.graphs.capture_all()
            self.mixed.capture_all()

    def prepare_finetuning(self) -> None:
        """A finetuning job starts: capture the mixed graphs its forward chunks will replay (adapter rows, kept
        layer inputs) now rather than one by one inside serving iterations."""
        if self.mixed is not None:
            self.mixed.capture_all(with_lora=True, with_capture=True)

    def captures(self) -> int:
        """Graphs captured while serving so far (an iteration that captured one took host time, not GPU time)."""
        return 0 if self.graphs is None else self.graphs.captures + self.mixed.captures

    def decode_only(self, chunks: list[Chunk]) -> bool:
        """An iteration of one sampling token per sequence, which runs from the persistent decode inputs."""
        return 0 < len(chunks) <= self.decode.max_batch and all(c.length == 1 and c.samples for c in chunks)

    def graphed(self, chunks: list[Chunk]) -> bool:
        """Whether `launch(chunks)` replays a CUDA graph."""
        return self.graphs is not None and (self.decode_only(chunks) or self.mixed.fits(chunks))

    def rows(self, chunks: list[Chunk]) -> int:
        """Token rows the iteration's forward computes: its graph's padded batch or token bucket, else its tokens
        (a graph costs what its padded size costs)."""
        if self.graphs is not None and self.decode_only(chunks):
            return self.graphs.padded(len(chunks))
        tokens = sum(c.length for c in chunks)
        return self.padded_tokens(tokens) if self.graphs is not None and self.mixed.fits(chunks) else tokens

    def padded_tokens(self, tokens: int) -> int:
        """The rows a mixed iteration of `tokens` tokens computes (what the planner prices a chunk's forward at)."""
        return self.mixed.bucket(tokens) if self.mixed is not None and tokens <= self.mixed.max_tokens else tokens

    @torch.no_grad()
    def launch(self, chunks: list[Chunk], behind: InFlight | None = None) -> InFlight:
        """Queue the iteration's forward and sampling without waiting for the device: a decode-only iteration
        from the persistent inputs (a CUDA graph replay where there is one), a mixed one from its token count's
        graph where it fits one, any other (LoRA dropout, more tokens than graphed, a CPU) eagerly. `behind`: the
        iteration in flight whose sampled tokens `ahead` decode chunks (all of them, in its order) take as input."""
        sampling = [c.seq for c in chunks if c.samples]
        kept: list[torch.Tensor] = []
        cfg = self.model.cfg
        if self.decode_only(chunks):
            b = len(chunks)
            bs = self.graphs.padded(b) if self.graphs is not None else b
            fed = behind.tokens if behind is not None else None
            with_lora = self.decode.fill(chunks, self.blocks.tables, bs, fed)
            params = self.sampler.prepare(sampling, pending=int(fed is not None))
            if self.graphs is not None:
                logits = self.graphs.replay(b, bs, with_lora)
            else:
                logits = self.model(self.decode.batch(b, with_lora, self.loras.max_loras, cfg.num_kv_heads),
                                    self.kv_caches)
        else:
            params = self.sampler.prepare(sampling) if sampling else None
            if self.mixed is not None and self.mixed.fits(chunks):
                logits, captured = self.mixed.run(chunks, self.blocks)
            else:
                batch = build_batch(chunks, self.blocks, self.device, num_slots=self.loras.max_loras,
                                    kv_heads=cfg.num_kv_heads)
                logits, captured = self.model(batch, self.kv_caches), batch.captured
            row = 0
            for c in chunks:
                if c.finetune:
                    kept.append(captured[:, row:row + c.length])
                    row += c.length
        return InFlight(sampling, self.sampler.sample(logits, params) if sampling else None, kept,
                        self.graphed(chunks))
