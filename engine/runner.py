"""Executes one planned iteration: packs the chunks into a flat batch, runs the model, samples."""
from __future__ import annotations

import torch

from coserve.engine.kv_cache import BlockManager
from coserve.engine.model.llama import CausalLM, ForwardBatch, LoRAGroup
from coserve.engine.sampling import sample
from coserve.engine.scheduler import Chunk


def build_batch(chunks: list[Chunk], blocks: BlockManager, device: str | torch.device,
                all_logits: bool = False) -> ForwardBatch:
    """Flatten the chunks; logits are kept for sampling rows only, unless `all_logits`."""
    ids, positions, slots, logit_rows, capture = [], [], [], [], []
    tables, starts, lens, ctxs = [], [], [], []
    dec_rows, dec_tables, dec_ctxs = [], [], []
    by_slot: dict[int, list[int]] = {}
    dropped: list[tuple[int, list[int], object]] = []
    row = 0
    for c in chunks:
        sid = c.seq.request_id
        tokens = c.seq.token_ids[c.start:c.start + c.length]
        ids.extend(tokens)
        positions.extend(range(c.start, c.start + c.length))
        slots.extend(blocks.slot(sid, p) for p in range(c.start, c.start + c.length))
        if c.length == 1:
            dec_rows.append(row)
            dec_tables.append(blocks.tables[sid])
            dec_ctxs.append(c.start + 1)
        else:
            tables.append(torch.tensor(blocks.tables[sid], dtype=torch.long, device=device))
            starts.append(row)
            lens.append(c.length)
            ctxs.append(c.start + c.length)
        if c.finetune:
            capture.extend(range(row, row + c.length))
        if all_logits:
            logit_rows.extend(range(row, row + c.length))
        elif c.samples:
            logit_rows.append(row + c.length - 1)
        if c.seq.adapter_slot is not None and c.dropout is not None:
            dropped.append((c.seq.adapter_slot, list(range(row, row + c.length)), c.dropout))
        elif c.seq.adapter_slot is not None:
            by_slot.setdefault(c.seq.adapter_slot, []).extend(range(row, row + c.length))
        row += c.length

    def t(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    batch = ForwardBatch(input_ids=t(ids), positions=t(positions), slot_mapping=t(slots), block_tables=tables,
                         query_starts=starts, query_lens=lens, context_lens=ctxs, logits_indices=t(logit_rows),
                         lora_groups=[LoRAGroup(s, t(rows)) for s, rows in sorted(by_slot.items())]
                         + [LoRAGroup(s, t(rows), drop) for s, rows, drop in dropped],
                         capture_rows=t(capture) if capture else None)
    if dec_rows:
        width = max(len(tb) for tb in dec_tables)
        batch.decode_rows, batch.decode_context_lens = t(dec_rows), t(dec_ctxs)
        batch.decode_tables = t([tb + [0] * (width - len(tb)) for tb in dec_tables]).view(len(dec_rows), width)
        batch.decode_max_context = max(dec_ctxs)
    return batch


class Runner:
    def __init__(self, model: CausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], blocks: BlockManager,
                 device: str):
        self.model = model
        self.kv_caches = kv_caches
        self.blocks = blocks
        self.device = device

    @torch.no_grad()
    def run(self, chunks: list[Chunk]) -> tuple[list[int], list[float], list[list[torch.Tensor]]]:
        """The sampled token and its logprob for each sampling chunk (in order), and for each finetuning
        chunk its kept activations (each layer's input, then the final hidden state)."""
        batch = build_batch(chunks, self.blocks, self.device)
        logits = self.model(batch, self.kv_caches)
        kept, row = [], 0
        for c in chunks:
            if c.finetune:
                kept.append([h[row:row + c.length] for h in batch.captured])
                row += c.length
        sampling = [c.seq for c in chunks if c.samples]
        if not sampling:
            return [], [], kept
        tokens, logprobs = sample(logits, [s.params for s in sampling], [s.generator for s in sampling])
        return tokens, logprobs, kept
