"""One finetuning job inside the engine: its data order, its adapter and optimizer, the sequence in flight
(forward chunks, then backward units), optimizer steps, checkpoints and their retention, progress, and the
durable record that lets a restarted engine list and resume it."""
from __future__ import annotations

import enum
import logging
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from coserve.engine.cost_model import EAGER, GRAPH, STEP
from coserve.engine.finetune.adapter import TrainAdapter
from coserve.engine.finetune.backward import SequenceBackward, Span, UnitGraphs, grid_spans, priced_unit, to_device
from coserve.engine.finetune.checkpoint import Checkpoint, ResumeState, retained, save_checkpoint
from coserve.engine.finetune.dataset import Example, epoch_order
from coserve.engine.finetune.dropout import ChunkDropout
from coserve.engine.finetune.record import RECORD_FILE, RECORD_VERSION, JobRecord, OutputLock, write_json_atomic
from coserve.engine.finetune.spec import JobSpec, TrainingSpec
from coserve.engine.lora import SlotWriter
from coserve.engine.sampling import SamplingParams
from coserve.engine.scheduler import Chunk
from coserve.engine.sequence import Sequence

if TYPE_CHECKING:
    from coserve.engine.engine import LLMEngine

log = logging.getLogger("coserve.finetune")

UNIT_SHARE = 0.25   # a backward unit takes at most this share of the latency target, so units fit beside inference
MIN_SPAN = 16       # tokens of the smallest unit grid (smaller units are all fixed cost)


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"     # the engine stopped while the job was queued or running; resumable


LIVE = (JobState.QUEUED, JobState.RUNNING)


def lr_lambda(t: TrainingSpec, total_steps: int):
    """Multiplier of the base learning rate at a step (warmup, then constant, linear or cosine decay)."""
    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        if t.lr_schedule == "constant":
            return 1.0
        progress = (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps)
        if t.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def count_steps(t: TrainingSpec, num_sequences: int) -> int:
    """Optimizer steps of a job: `epochs` passes over the sequences, capped by `max_steps`."""
    per_epoch = math.ceil(num_sequences / t.sequences_per_step)
    return min(per_epoch * t.epochs, t.max_steps or per_epoch * t.epochs)


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


@dataclass
class PendingStep:
    """An optimizer step launched without waiting for it: its loss and finite checks reach the host once its
    event completes (reading them at once would stall the iteration that ran the step)."""

    step: int
    flags: torch.Tensor                  # host: [loss, gradients finite, updated weights finite]
    event: torch.cuda.Event | None       # None on a CPU, where the flags are already there

    def ready(self) -> bool:
        return self.event is None or self.event.query()


class FinetuneJob:
    def __init__(self, spec: JobSpec, engine: "LLMEngine", sequences: list[Example], output: Path,
                 init_modules: dict | None = None, resume: ResumeState | None = None,
                 inherited: list[Checkpoint] | None = None):
        self.spec, self.engine, self.sequences, self.output = spec, engine, sequences, output
        self.num_sequences = len(sequences)
        self.init_modules, self.resume = init_modules, resume
        self.total_steps = count_steps(spec.training, len(sequences))
        self.state = JobState.QUEUED
        self.error: str | None = None
        self.step = resume.step if resume else 0
        self.tokens = resume.tokens if resume else 0
        self.losses: list[float] = list(resume.losses) if resume else []
        self.loss: float | None = self.losses[-1] if self.losses else None
        self.checkpoints: list[Checkpoint] = list(inherited or [])   # in this output, oldest first
        self.lock = OutputLock(output)
        self.created = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self.adapter: TrainAdapter | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.lr_sched: torch.optim.lr_scheduler.LambdaLR | None = None
        self.slot: int | None = None
        self.write_slot: SlotWriter | None = None   # copies the adapter into its serving slot
        self.seq: Sequence | None = None          # the sequence running forward (or done, waiting for backward)
        self.labels: list[int] = []
        self.acts: torch.Tensor | None = None     # the sequence's kept layer inputs, [num_layers + 1, tokens, hidden]
        self.chunks: list[Span] = []              # its forward chunks so far
        self.backward: SequenceBackward | None = None   # the step's earlier sequence running backward, beside it
        self.back_seq: Sequence | None = None     # that sequence (its KV blocks are the backward's past keys)
        self.unit_graphs: UnitGraphs | None = None    # this job's layer units as CUDA graphs (its adapter's tensors)
        self.seq_in_step = 0                      # sequences of the step begun
        self.backs_done = 0                       # sequences of the step whose backward finished
        self._rows_step, self._rows = -1, []      # the step whose dataset rows `_step_rows` holds, and those rows
        self.waits = 0                            # iterations its next backward unit found no room (never starved)
        self.unit_spans: dict[int, int] = {}      # sequence length -> its unit span, fixed once chosen
        self.step_loss: torch.Tensor | float = 0.0    # summed on the device until the optimizer step reads it
        self.step_targets = 0
        self.pending: PendingStep | None = None   # the last optimizer step, until its checks reach the host
        self.recorded_losses: dict | None = None  # the loss summary of a job read back from its record
        self.saves = 0                            # checkpoints written by this process (host I/O the cost model skips)

    @classmethod
    def from_record(cls, record: JobRecord, engine: "LLMEngine", output: Path) -> "FinetuneJob":
        """A job as a previous engine process left it: listed as it was, never trained here (it may be resumed
        by a new job built from its spec)."""
        job = cls(record.spec, engine, [], output)
        job.num_sequences, job.total_steps = record.num_sequences, record.total_steps
        job.state, job.error, job.step, job.tokens = JobState(record.state), record.error, record.step, record.tokens
        job.loss, job.recorded_losses = record.loss, dict(record.losses)
        job.checkpoints = [Checkpoint(c.step, c.path, c.sha256, c.time, c.loss) for c in record.checkpoints]
        job.created, job.started, job.finished = record.created, record.started, record.finished
        return job

    # ---- life cycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Take an adapter slot, build the adapter and optimizer, and restore a checkpoint if asked."""
        eng, t = self.engine, self.spec.training
        self.adapter = TrainAdapter(eng.model, self.spec.lora, t.seed)
        params = self.adapter.parameters()
        # fused: one launch for all tensors, and it skips a step with non-finite gradients on the device (found_inf)
        if t.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, eps=t.eps,
                                               weight_decay=t.weight_decay, fused=True)
        else:
            self.optimizer = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                                             fused=True)
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(t, self.total_steps))
        if self.resume is not None:   # verified when the job was built
            self.adapter.load(self.resume.modules)
            self.optimizer.load_state_dict(self.resume.optimizer)
            self.lr_sched.last_epoch = self.step - 1
            with warnings.catch_warnings():   # only positions the schedule; torch warns of a step before any update
                warnings.simplefilter("ignore", UserWarning)
                self.lr_sched.step()
        elif self.init_modules is not None:
            self.adapter.load(self.init_modules)
        self.resume = self.init_modules = None
        cfg = eng.config
        self.unit_graphs = UnitGraphs(eng.finetune.warmed_shapes, eng.max_model_len) \
            if cfg.use_fast_path and cfg.cuda_graphs and cfg.device.startswith("cuda") else None
        self.slot = eng.loras.reserve_training_slot()
        self.write_slot = eng.loras.slot_writer(self.slot, self.adapter.weights(), self.adapter.scaling)
        self.write_slot()
        eng.runner.prepare_finetuning()
        self.state, self.started = JobState.RUNNING, time.time()
        log.info("job %s started at step %d of %d", self.spec.id, self.step, self.total_steps,
                 extra={"event": "job_started", "job_id": self.spec.id, "step": self.step})
        if self.step >= self.total_steps:
            self._finish(JobState.SUCCEEDED)
        else:
            self.persist()

    def _release(self) -> None:
        for seq in (self.seq, self.back_seq):
            if seq is not None:
                self.engine.blocks.release(seq.request_id)
        self.seq = self.back_seq = None
        self.backward, self.acts, self.chunks, self.unit_graphs = None, None, [], None
        if self.slot is not None:
            self.engine.loras.release_training_slot(self.slot)
            self.slot, self.write_slot = None, None

    def _finish(self, state: JobState, error: str | None = None) -> None:
        """Release the slot, blocks and tokenised data (a finished job keeps only its record), write the record,
        and only then let go of the output."""
        self._release()
        self.sequences, self.resume, self.init_modules = [], None, None
        self.state, self.error, self.finished = state, error, time.time()
        event = "job_finished" if state is JobState.SUCCEEDED else f"job_{state.value}"
        log.log(logging.WARNING if state is JobState.FAILED else logging.INFO, "job %s %s at step %d%s",
                self.spec.id, state.value, self.step, f": {error}" if error else "",
                extra={"event": event, "job_id": self.spec.id, "step": self.step, "state": state.value,
                       "reason": error})
        try:
            self.persist()
        finally:
            self.lock.release()

    def cancel(self) -> None:
        self.settle(wait=True)
        if self.state in LIVE:
            self._finish(JobState.CANCELLED)

    def fail(self, error: str) -> None:
        self._finish(JobState.FAILED, error)

    def interrupt(self, reason: str) -> None:
        """The engine is stopping: checkpoint the last finished step (unless saved already) and mark the job
        resumable. If that save fails the earlier checkpoints stay listed, and the record says so."""
        self.settle(wait=True)
        if self.state not in LIVE:
            return
        if self.active and self.step > 0 and all(c.step != self.step for c in self.checkpoints):
            try:
                self.save_checkpoint(persist=False)
            except Exception as exc:   # stopping goes on regardless
                reason += f"; its shutdown checkpoint failed ({type(exc).__name__}: {exc})"
        last = self.checkpoints[-1].path if self.checkpoints else "the start (no checkpoint yet)"
        self._finish(JobState.INTERRUPTED, f"{reason} at step {self.step}; resuming continues from {last}")

    @property
    def active(self) -> bool:
        return self.state is JobState.RUNNING

    # ---- data ---------------------------------------------------------------------------------------
    def _sequence_indices(self, step: int) -> list[int]:
        """The dataset rows of an optimizer step: a pure function of (seed, step), so resume sees the same."""
        t, n = self.spec.training, self.num_sequences
        per_epoch = math.ceil(n / t.sequences_per_step)
        epoch, within = divmod(step, per_epoch)
        order = epoch_order(n, epoch, t.seed, t.shuffle)
        return order[within * t.sequences_per_step:(within + 1) * t.sequences_per_step]

    def _step_rows(self) -> list[int]:
        """The current step's rows, drawn once a step (a shuffled epoch's order permutes the whole dataset, and
        the scheduler asks every iteration)."""
        if self._rows_step != self.step:
            self._rows_step, self._rows = self.step, self._sequence_indices(self.step)
        return self._rows

    @property
    def epoch(self) -> int:
        per_epoch = math.ceil(self.num_sequences / self.spec.training.sequences_per_step)
        return min(self.step, self.total_steps - 1) // per_epoch if self.total_steps and per_epoch else 0

    # ---- work for the scheduler ---------------------------------------------------------------------
    def begin_sequence(self, reserve_blocks: int) -> bool:
        """Start the step's next sequence, if it has one not begun and the KV cache has room beyond what inference
        keeps; it may run forward while the one before it runs backward (the same weights: one step)."""
        rows = self._step_rows()
        if self.seq_in_step == len(rows):
            return False
        example = self.sequences[rows[self.seq_in_step]]
        rid = f"ft:{self.spec.id}:{self.step}:{self.seq_in_step}"
        blocks = self.engine.blocks
        if blocks.blocks_needed(rid, len(example.ids)) + reserve_blocks > blocks.num_free:
            return False
        if self.seq_in_step == 0:
            self.step_targets = sum(self.sequences[i].num_targets for i in rows)
            self.step_loss = 0.0
        blocks.allocate(rid, len(example.ids))
        self.seq_in_step += 1
        self.seq = Sequence(rid, example.ids, SamplingParams(max_tokens=1), adapter_slot=self.slot)
        self.labels = example.labels
        cfg, weight = self.engine.model_config, self.engine.model.lm_head.weight
        self.acts = weight.new_empty(cfg.num_layers + 1, len(example.ids), cfg.hidden_size)
        self.chunks = []
        return True

    def forward_tokens_left(self) -> int:
        return 0 if self.seq is None else self.seq.num_uncomputed

    def next_chunk(self, max_tokens: int) -> Chunk:
        length = min(self.seq.num_uncomputed, self.spec.training.chunk_tokens or max_tokens, max_tokens)
        p = self.spec.lora.dropout
        drop = ChunkDropout(p, self.dropout_key(), self.seq.num_computed) if p > 0 else None
        return Chunk(self.seq, self.seq.num_computed, length, finetune=True, dropout=drop)

    def dropout_key(self) -> str:
        """The dropout seed of the sequence running forward (or, before it begins, of the step's next one)."""
        return f"{self.spec.training.seed}:{self.step}:{self.seq_in_step - (self.seq is not None)}"

    def forward_done(self, chunk: Chunk, captured: torch.Tensor) -> None:
        """Keep the chunk's layer inputs; after the last chunk, the sequence's backward begins once the one before
        it has finished."""
        self.seq.num_computed += chunk.length
        self.acts[:, chunk.start:chunk.start + chunk.length] = captured
        self.chunks.append(Span(chunk.start, chunk.length, chunk.dropout))
        self.tokens += chunk.length
        if self.seq.num_uncomputed == 0 and self.backward is None:
            self._begin_backward()

    def _begin_backward(self) -> None:
        """The forwarded sequence moves to backward, which frees the forward side for the step's next one."""
        blocks = self.engine.blocks.tables[self.seq.request_id]
        padded = 1 << max(0, len(blocks) - 1).bit_length()   # unit shapes recur across sequence lengths
        table = to_device(blocks + [0] * (padded - len(blocks)), self.engine.kv_caches[0][0].device)
        length = self.seq.num_tokens
        spans = self.chunks if any(c.dropout is not None for c in self.chunks) \
            else grid_spans(length, self.unit_span(length))
        self.backward = SequenceBackward(self.engine.model, self.adapter, self.acts, spans, self.labels, table,
                                         self.engine.kv_caches, 1.0 / max(1, self.step_targets), self.unit_graphs)
        self.back_seq, self.seq, self.acts, self.chunks = self.seq, None, None, []

    def unit_span(self, length: int) -> int:
        """Positions per backward unit for sequences of `length`, chosen once for the job: the shapes of its units,
        hence their warm-ups and CUDA graphs, then recur sequence after sequence."""
        if length not in self.unit_spans:
            self.unit_spans[length] = self._choose_span(length)
        return self.unit_spans[length]

    def _choose_span(self, length: int) -> int:
        """The whole sequence when a unit of it fits in its share of the target, else the largest power of two
        whose last (most attending) span does, at least MIN_SPAN, and no smaller than where a unit's fixed cost
        is half of it (smaller units would not fit any better, only run more of them)."""
        cost, room = self.engine.cost, UNIT_SHARE * self.engine.config.tpot_slo_ms / 1000
        kind = GRAPH if self.unit_graphs is not None else EAGER

        def price(tokens: int, start: int = 0) -> float:
            return cost.unit_s(priced_unit(kind, tokens, start))
        if price(length) <= room:
            return length
        fixed = price(0)
        span = 1 << max(0, (length - 1).bit_length() - 1)       # the largest power of two below the length
        while span > MIN_SPAN and room < price(span, length - span) > 2 * fixed:
            span //= 2
        return max(MIN_SPAN, span)

    def unit_ends_step(self) -> bool:
        """The next backward unit is the last of the optimizer step (the step runs right after it)."""
        return self.backward.next_is_last and self.backs_done + 1 == len(self._step_rows())

    def run_backward_unit(self, capture: bool = False) -> None:
        """One backward unit, timed on the device as the kind it runs as; `capture`: a unit that has no CUDA graph
        yet gets one now (host time, not timed)."""
        graphed = self.backward.next_graphed()
        piece = None if capture and graphed is False else self.backward.next_unit(eager=graphed is False)
        with self.engine.clock.timing(piece):
            self.backward.run_unit(capture)
        if self.backward.done:
            self.step_loss += self.backward.loss_sum
            self.engine.blocks.release(self.back_seq.request_id)
            self.back_seq, self.backward = None, None
            self.backs_done += 1
            if self.backs_done == len(self._step_rows()):
                self._optimizer_step()
            elif self.seq is not None and self.seq.num_uncomputed == 0:
                self._begin_backward()

    def _optimizer_step(self) -> None:
        """Apply the step's gradients without a host sync. The fused optimizer skips the update on the device when
        the loss or gradients are not finite (found_inf, as AMP's scaler does); `settle` reads the checks later
        and fails the job then, so no checkpoint ever holds such a step."""
        self.settle(wait=True)       # the previous step's checks (long done: a whole sequence ran since)
        if not self.active:
            return
        with self.engine.clock.timing(STEP):
            self._apply_step()
        self.step += 1
        self.seq_in_step = self.backs_done = 0
        every = self.spec.checkpoint_every
        self.settle(wait=self.step == self.total_steps or bool(every and self.step % every == 0))

    def _apply_step(self) -> None:
        """Queue the update and its checks on the device (`pending` holds them until `settle`)."""
        t, adapter = self.spec.training, self.adapter
        loss = torch.as_tensor(self.step_loss, dtype=torch.float32, device=adapter.flat.device)
        loss = loss / max(1, self.step_targets)
        grads_ok = torch.isfinite(loss) & adapter.grads_finite()
        if t.max_grad_norm is not None:
            adapter.clip_grad_norm_(t.max_grad_norm)
        self.optimizer.found_inf = (~grads_ok).float()
        self.optimizer.step()
        weights_ok = adapter.weights_finite()
        self.lr_sched.step()
        adapter.zero_grad()
        self.write_slot()
        flags = torch.stack([loss, grads_ok.float(), weights_ok.float()])
        event = None
        if flags.is_cuda:
            host = torch.empty(3, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            flags, event = host, torch.cuda.Event()
            event.record()
        self.pending = PendingStep(self.step + 1, flags, event)

    def settle(self, wait: bool = False) -> None:
        """Take in the last optimizer step once its checks are on the host (`wait`: now): record its loss,
        checkpoint or finish where due, or fail the job at that step (its update was skipped on the device)."""
        p = self.pending
        if p is None or not (wait or p.ready()):
            return
        if p.event is not None:
            p.event.synchronize()
        self.pending = None
        loss, grads_ok, weights_ok = p.flags.tolist()
        if not (grads_ok and weights_ok):
            self.step = p.step - 1
            what = (f"the loss is {loss}" if not math.isfinite(loss) else "the gradients hold NaN or infinity"
                    if not grads_ok else "the update made the adapter weights NaN or infinite")
            return self._fail_non_finite(what)
        self.loss = loss
        self.losses.append(loss)
        every = self.spec.checkpoint_every
        if p.step == self.total_steps or (every and p.step % every == 0):
            self.save_checkpoint()
        if p.step >= self.total_steps:
            self._finish(JobState.SUCCEEDED)

    def _fail_non_finite(self, what: str) -> None:
        self.fail(f"step {self.step + 1}: {what}; the job stopped (lower training.lr, set training.max_grad_norm "
                  "or check the data)")

    def save_checkpoint(self, persist: bool = True) -> Checkpoint:
        """Write the adapter of the last finished step, apply the retention limit, and record both."""
        root = Path(self.engine.config.data_root).resolve()
        self.saves += 1
        ckpt = save_checkpoint(self.output, root, self.step, self.adapter, self.optimizer,
                               {"tokens": self.tokens, "losses": self.losses, "job_id": self.spec.id},
                               self.engine.config.model)
        self.checkpoints = sorted([c for c in self.checkpoints if c.step != ckpt.step] + [ckpt],
                                  key=lambda c: c.step)
        log.info("job %s wrote checkpoint %s (sha256 %s)", self.spec.id, ckpt.path, ckpt.sha256,
                 extra={"event": "job_checkpoint", "job_id": self.spec.id, "step": ckpt.step,
                        "sha256": ckpt.sha256, "path": ckpt.path})
        self._prune(root)
        if persist:
            self.persist()
        return ckpt

    def _prune(self, root: Path) -> None:
        """Delete the checkpoints beyond `save_total_limit` (never the best-loss or the final one) and drop them
        from the list; only `checkpoint-<step>` folders of this job's own output are ever deleted."""
        keep = retained(self.checkpoints, self.spec.save_total_limit, self.total_steps)
        for c in self.checkpoints:
            folder = (root / c.path).resolve()
            if c.step not in keep and folder.parent == self.output and folder.name == f"checkpoint-{c.step}":
                shutil.rmtree(folder, ignore_errors=True)
        self.checkpoints = [c for c in self.checkpoints if c.step in keep]

    # ---- durable record -----------------------------------------------------------------------------
    def record(self) -> dict:
        """Everything `GET` answers after a restart, and the spec that resuming needs."""
        finite = [x for x in self.losses if math.isfinite(x)]
        losses = self.recorded_losses or {
            "count": len(self.losses), "first": finite[0] if finite else None,
            "last": finite[-1] if finite else None, "min": min(finite) if finite else None,
            "min_step": self.losses.index(min(finite)) + 1 if finite else None}
        return {"version": RECORD_VERSION, "id": self.spec.id, "spec": self.spec.model_dump(mode="json"),
                "state": self.state.value, "error": self.error, "step": self.step, "total_steps": self.total_steps,
                "num_sequences": self.num_sequences, "tokens": self.tokens, "loss": _finite_or_none(self.loss),
                "losses": losses, "checkpoints": [c.to_dict() for c in self.checkpoints], "created": self.created,
                "started": self.started, "finished": self.finished, "updated": time.time(),
                "resumed_from": self.spec.resume_from}

    def persist(self) -> None:
        """Write `<output>/job.json`, only while this job holds the output. A full or failing disk is logged,
        never allowed to stop the engine: the previous record stays whole."""
        if self.lock.held:
            try:
                write_json_atomic(self.output / RECORD_FILE, self.record())
            except OSError:
                log.exception("could not write the record of finetuning job %s", self.spec.id)

    # ---- reporting ----------------------------------------------------------------------------------
    def activation_bytes_per_token(self) -> int:
        cfg = self.engine.model_config
        return (cfg.num_layers + 1) * cfg.hidden_size * self.engine.kv_caches[0][0].element_size()

    def progress(self) -> dict:
        elapsed = ((self.finished or time.time()) - self.started) if self.started else 0.0
        return {"id": self.spec.id, "state": self.state.value, "step": self.step, "total_steps": self.total_steps,
                "epoch": self.epoch, "tokens": self.tokens, "tokens_per_s": round(self.tokens / elapsed, 2)
                if elapsed > 0 else 0.0, "loss": _finite_or_none(self.loss), "lr": self.lr_sched.get_last_lr()[0]
                if self.lr_sched else self.spec.training.lr, "output": self.spec.output,
                "checkpoints": [c.to_dict() for c in self.checkpoints], "error": self.error,
                "save_total_limit": self.spec.save_total_limit, "resumed_from": self.spec.resume_from,
                "created": self.created, "started": self.started, "finished": self.finished,
                "activation_bytes_per_token": self.activation_bytes_per_token()}


def remove_tmp_folders(output: Path) -> None:
    """Half-written checkpoints and records of a process that died are never used; clear them."""
    for tmp in output.glob(".tmp-checkpoint-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for tmp in output.glob(f".{RECORD_FILE}.tmp-*"):
        tmp.unlink(missing_ok=True)
