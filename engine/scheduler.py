"""Builds each iteration: decode tokens first, then prefill chunks, within a token budget and the KV blocks.
When blocks run out the latest-arrived request is preempted: its blocks are freed and it is recomputed later.
A request admitted from the queue starts after its longest cached prefix (see `BlockManager.lookup`); the
blocks a request has filled are offered to the cache at the start of the next `schedule()` (the engine has
advanced `num_computed` past tokens whose KV it wrote), and when it is preempted or finishes.

Steady decode (every running request has one token to compute, nobody waits, the blocks suffice) takes a
cheap path: one pass over the running list, a new block only where a request crosses into one, and blocks
offered to the cache as they fill. The same path plans a decode iteration ahead (`decode_ahead`): while the
device still samples each request's next token, the iteration that consumes it is queued behind."""
from __future__ import annotations

import bisect
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from coserve.engine.kv_cache import BlockManager
from coserve.engine.sequence import Sequence, Status

log = logging.getLogger("coserve.scheduler")


@dataclass
class Chunk:
    """Tokens [start, start + length) of `seq` to run this iteration; an inference chunk `samples` when it
    reaches the end of its tokens; a finetuning chunk never samples, its layer inputs are kept instead. An `ahead`
    chunk is the decode token that an iteration still on the device is sampling (it samples the one after)."""

    seq: Sequence
    start: int
    length: int
    finetune: bool = False
    dropout: Callable | None = None     # a finetuning chunk's LoRA dropout
    ahead: bool = False

    @property
    def samples(self) -> bool:
        return not self.finetune and (self.ahead or self.start + self.length == self.seq.num_tokens)


class Scheduler:
    """Plans iterations over `blocks`; prefix caching is the block manager's switch
    (`BlockManager(..., enable_prefix_caching=...)`)."""

    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []     # in order of arrival, the order they are batched in

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished (or aborted) and give its blocks back."""
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self._commit(seq)
        self.blocks.release(seq.request_id)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _preempt(self, seq: Sequence) -> None:
        self._commit(seq)
        self.blocks.release(seq.request_id)
        self.running.remove(seq)
        seq.status, seq.num_computed = Status.WAITING, 0
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        log.info("preempted request %s: KV blocks ran out; it is recomputed later", seq.request_id,
                 extra={"event": "request_preempted", "request_id": seq.request_id, "reason": "kv_blocks_exhausted",
                        "adapter": seq.adapter_name})

    @staticmethod
    def _salt(seq: Sequence) -> tuple[bool, str | None]:
        """Whether the sequence may use the prefix cache, and its salt: a sequence with an adapter but no
        `cache_salt` naming that adapter's version must not share KV with anyone."""
        return seq.adapter_slot is None or seq.cache_salt is not None, seq.cache_salt

    def _commit(self, seq: Sequence) -> None:
        """Offer the sequence's newly filled blocks to the cache (cheap when none filled since last time)."""
        cacheable, salt = self._salt(seq)
        if cacheable and seq.num_computed >= (self.blocks.num_committed(seq.request_id) + 1) * self.blocks.block_size:
            self.blocks.commit(seq.request_id, seq.token_ids, seq.num_computed, salt)

    def _fit(self, seq: Sequence, length: int, scheduled: set[str]) -> bool:
        """Get blocks for `length` more tokens of a running seq, preempting later unscheduled ones if needed."""
        while not self.blocks.can_allocate(seq.request_id, seq.num_computed + length):
            victims = [s for s in self.running if s.request_id not in scheduled]
            victim = max(victims, key=lambda s: s.arrival)
            self._preempt(victim)
            if victim is seq:
                return False
        self.blocks.allocate(seq.request_id, seq.num_computed + length)
        return True

    def _steady_decode(self, pending: int = 0) -> list[Chunk] | None:
        """One decode token for every running request when all of them decode and their blocks fit; None when
        the general path must plan (a prefill, a preemption ahead, the token budget). `pending`: 1 when each
        request's next token is still being sampled (the chunks are `ahead`)."""
        running, bsz = self.running, self.blocks.block_size
        if len(running) > self.max_batched_tokens:
            return None
        tables = self.blocks.tables
        grow = []
        for seq in running:
            n = len(seq.prompt_ids) + len(seq.output_ids) + pending
            if n - seq.num_computed != 1:
                return None
            if n > len(tables[seq.request_id]) * bsz:
                grow.append(seq.request_id)
        if len(grow) > self.blocks.num_free:
            return None
        for rid in grow:
            self.blocks.append_block(rid)
        chunks = []
        for seq in running:
            pos = seq.num_computed
            if pos % bsz == 0:      # it just filled a block
                self._commit(seq)
            chunks.append(Chunk(seq, pos, 1, ahead=pending > 0))
        return chunks

    def decode_ahead(self, seqs: list[Sequence]) -> list[Chunk] | None:
        """The next decode iteration of exactly `seqs` (the running requests, in order), each fed the token its
        iteration in flight samples; None when it would be anything else (a request waits, blocks run short)."""
        if self.waiting or self.running != seqs:
            return None
        return self._steady_decode(pending=1)

    def schedule(self) -> list[Chunk]:
        if not self.waiting and self.running:
            steady = self._steady_decode()
            if steady is not None:
                return steady
        budget = self.max_batched_tokens
        chunks: list[Chunk] = []
        scheduled: set[str] = set()
        preempted = False
        for seq in self.running:
            self._commit(seq)
        decodes = [s for s in self.running if s.num_uncomputed == 1]
        prefills = [s for s in self.running if s.num_uncomputed > 1]
        for seq in decodes + prefills:
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:
                continue
            length = min(seq.num_uncomputed, budget)
            if not self._fit(seq, length, scheduled):
                preempted = True
                continue
            chunks.append(Chunk(seq, seq.num_computed, length))
            scheduled.add(seq.request_id)
            budget -= length
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cacheable, salt = self._salt(seq)
            hit = self.blocks.lookup(seq.request_id, seq.token_ids, salt) if cacheable else None
            start = hit.num_tokens if hit else 0
            length = min(seq.num_tokens - start, budget)
            if not self.blocks.can_allocate(seq.request_id, start + length, hit):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq.request_id, start + length, hit)
            seq.status, seq.num_computed = Status.RUNNING, start
            bisect.insort(self.running, seq, key=lambda s: s.arrival)
            chunks.append(Chunk(seq, start, length))
            scheduled.add(seq.request_id)
            budget -= length
        return chunks
