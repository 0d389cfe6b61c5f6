"""The engine's finetuning jobs and how they fill each iteration: after inference has taken its share, the
forward chunks and backward units that fit in what is left of the latency target."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from coserve.engine.cost_model import CostModel
from coserve.engine.finetune.dataset import DatasetError, read_examples, to_sequences
from coserve.engine.finetune.job import FinetuneJob, JobState, remove_tmp_folders
from coserve.engine.finetune.spec import JobSpec
from coserve.engine.lora import AdapterError, read_adapter
from coserve.engine.paths import PathError, resolve_under
from coserve.engine.scheduler import Chunk

if TYPE_CHECKING:
    from coserve.engine.engine import LLMEngine

log = logging.getLogger("coserve.finetune")


class JobError(ValueError):
    """A job the engine refuses; `param` names the field, `status` the HTTP status."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def build_job(engine: "LLMEngine", spec: JobSpec) -> FinetuneJob:
    """Check paths and data before anything runs: a bad dataset line is refused now, not mid-training."""
    root = engine.config.data_root

    def under(rel: str, param: str):
        try:
            return resolve_under(root, rel)
        except PathError as exc:
            raise JobError(str(exc), param) from exc

    data = under(spec.dataset.path, "dataset.path")
    output = under(spec.output, "output")
    if output.exists() and not output.is_dir():
        raise JobError(f"output {spec.output!r} exists and is not a folder", "output")
    init_dir = resume_dir = None
    if spec.init_from:
        init_dir = under(spec.init_from, "init_from")
        try:
            cfg, modules = read_adapter(init_dir, Path(root))
        except AdapterError as exc:
            raise JobError(f"init_from: {exc}", "init_from") from exc
        targets = {m.rsplit(".", 1)[-1] for m in modules}
        if cfg.get("r") != spec.lora.r or targets != set(spec.lora.target_modules):
            raise JobError(f"init_from adapter has r={cfg.get('r')} on {sorted(targets)}; the job's lora settings "
                           f"say r={spec.lora.r} on {spec.lora.target_modules}", "init_from")
    if spec.resume_from:
        resume_dir = under(spec.resume_from, "resume_from")
        if not (resume_dir / "trainer_state.json").is_file():
            raise JobError(f"resume_from {spec.resume_from!r} is not a checkpoint folder", "resume_from")
    t = spec.training
    blocks = engine.blocks
    room = (blocks.num_blocks - int(blocks.num_blocks * engine.config.finetune_kv_reserve)) * blocks.block_size
    room = min(room, engine.max_model_len)
    if t.max_seq_len and t.max_seq_len > room:
        raise JobError(f"max_seq_len {t.max_seq_len} exceeds what this engine can hold for finetuning "
                       f"({room} tokens)", "training.max_seq_len")
    try:
        sequences = to_sequences(read_examples(data, spec.dataset.format, engine.tokenizer),
                                 t.max_seq_len or room, t.packing)
    except DatasetError as exc:
        raise JobError(f"{spec.dataset.path}: {exc}", "dataset.path") from exc
    output.mkdir(parents=True, exist_ok=True)
    remove_tmp_folders(output)
    return FinetuneJob(spec, engine, sequences, output, init_dir, resume_dir)


class FinetuneManager:
    def __init__(self, engine: "LLMEngine", max_active: int, kv_reserve: float):
        self.engine = engine
        self.max_active = max_active
        self.kv_reserve = kv_reserve
        self.jobs: dict[str, FinetuneJob] = {}
        self.turn = 0                                  # rotates which job goes first

    def check_new(self, spec: JobSpec) -> None:
        """Refuse a duplicate id, or a second live job writing into the same output folder."""
        if spec.id in self.jobs:
            raise JobError(f"a job with id {spec.id!r} already exists", "id", 409)
        busy = {j.spec.output for j in self.jobs.values() if j.state in (JobState.QUEUED, JobState.RUNNING)}
        if spec.output in busy:
            raise JobError(f"another job is writing to {spec.output!r}", "output", 409)

    def add(self, job: FinetuneJob) -> None:
        self.check_new(job.spec)
        self.jobs[job.spec.id] = job
        self._activate()

    def active(self) -> list[FinetuneJob]:
        jobs = [j for j in self.jobs.values() if j.active]
        if not jobs:
            return jobs
        k = self.turn % len(jobs)
        return jobs[k:] + jobs[:k]

    def has_work(self) -> bool:
        """Start queued jobs that now fit (a slot may have been freed since); true while any job trains."""
        if any(j.state is JobState.QUEUED for j in self.jobs.values()):
            self._activate()
        return any(j.active for j in self.jobs.values())

    def slots_free(self) -> int:
        return max(0, self.max_active - sum(j.active for j in self.jobs.values()))

    def _activate(self) -> None:
        for job in self.jobs.values():
            if job.state is JobState.QUEUED and self.slots_free() > 0 and self.engine.loras.free_slots() > 0:
                self._guard(job, job.start)

    def cancel(self, job_id: str, checkpoint: bool = False) -> FinetuneJob:
        """Stop a job; with `checkpoint`, first save its adapter at the last finished step (for suspend)."""
        job = self.jobs[job_id]
        if checkpoint and job.active and job.step > 0 and all(c.step != job.step for c in job.checkpoints):
            self._guard(job, job.save_checkpoint)
        job.cancel()
        self._activate()
        return job

    def _guard(self, job: FinetuneJob, fn) -> None:
        """A job's error fails that job only; inference and other jobs go on."""
        try:
            fn()
        except Exception as exc:
            log.exception("finetuning job %s failed", job.spec.id)
            job.fail(f"{type(exc).__name__}: {exc}")

    def plan_forward(self, time_left: float, token_room: int, cost: CostModel, fixed_paid: bool) -> list[Chunk]:
        """Forward chunks of the jobs' sequences that fit in the time and tokens left this iteration. With no
        inference in the iteration (nothing to protect) one chunk goes ahead even past the target."""
        chunks: list[Chunk] = []
        reserve = int(self.engine.blocks.num_blocks * self.kv_reserve)
        for job in self.active():
            if job.seq is None and not job.begin_sequence(reserve):
                continue
            if not job.forward_tokens_left():
                continue
            spare = time_left - (0.0 if fixed_paid or chunks else cost.fwd_fixed_s)
            n = min(token_room, int(spare / cost.fwd_per_token_s))
            if n < 1 and not fixed_paid and not chunks:
                n = token_room
            if n < 1:
                continue
            chunk = job.next_chunk(n)
            chunks.append(chunk)
            token_room -= chunk.length
            time_left = spare - cost.fwd_per_token_s * chunk.length
        return chunks

    def forward_done(self, chunks: list[Chunk], kept: list[list]) -> None:
        for chunk, acts in zip(chunks, kept):
            job = self.jobs[chunk.seq.request_id.split(":")[1]]
            self._guard(job, lambda: job.forward_done(chunk, acts))

    def run_backward(self, time_left: float, cost: CostModel, must_progress: bool) -> int:
        """Run backward units while their predicted cost fits in what is left of the iteration, each merging
        as many chunks of a layer as fit; with `must_progress` (no inference this iteration) at least one runs.
        Returns how many ran."""
        ran = 0
        most = self.engine.config.max_batched_tokens
        for job in self.active():
            while job.active and job.backward_unit_tokens(0):
                room = cost.unit_tokens_within(time_left, most)
                unit = cost.unit_s(job.backward_unit_tokens(room))
                if unit > time_left and not (must_progress and ran == 0):
                    break
                self._guard(job, lambda: job.run_backward_unit(room))
                time_left -= unit
                ran += 1
        self.turn += 1
        self._activate()
        return ran
