"""The engine's finetuning jobs and how they fill each iteration: after inference has taken its share, the
forward chunks and backward units that fit in what is left of the latency target. Also the jobs' durability:
records read back at start, outputs owned by one job, verified resumes, and checkpoints on shutdown."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from coserve.engine.cost_model import GRAPH, CostModel, Unit, context
from coserve.engine.finetune.adapter import lora_shapes
from coserve.engine.finetune.checkpoint import Checkpoint, CheckpointError, ResumeState, all_finite, verify_checkpoint
from coserve.engine.finetune.dataset import DatasetError, read_examples, to_sequences
from coserve.engine.finetune.job import LIVE, FinetuneJob, JobState, count_steps, remove_tmp_folders
from coserve.engine.finetune.ownership import OwnershipError, check_output_free
from coserve.engine.finetune.record import RecordError, find_records, read_record
from coserve.engine.finetune.spec import JobSpec
from coserve.engine.lora import read_adapter
from coserve.engine.paths import PathError, resolve_under
from coserve.engine.scheduler import Chunk

if TYPE_CHECKING:
    from coserve.engine.engine import LLMEngine

log = logging.getLogger("coserve.finetune")

PATIENCE = 64      # iterations a job's next unit waits for room before it runs regardless (no job starves)
CAPTURE_PATIENCE = 2   # the same for a unit whose CUDA graph is still to be captured: once per graph, it overshoots
                       # one iteration rather than run eagerly (slower on the device, half a capture on the host)


class JobError(ValueError):
    """A job the engine refuses; `param` names the field, `status` the HTTP status."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def _under(engine: "LLMEngine", rel: str, param: str) -> Path:
    try:
        return resolve_under(engine.config.data_root, rel)
    except PathError as exc:
        raise JobError(str(exc), param) from exc


def _recorded_sha256(folder: Path) -> str | None:
    """The adapter hash that the job record next to a checkpoint lists for it, if any."""
    try:
        record = read_record(folder.parent)
    except RecordError:
        return None
    for c in record.checkpoints if record else []:
        if c.path.rstrip("/").rsplit("/", 1)[-1] == folder.name:
            return c.sha256
    return None


def verify_resume(engine: "LLMEngine", spec: JobSpec, folder: Path, total_steps: int) -> ResumeState:
    """Load `folder` for resuming `spec`, or raise JobError naming resume_from with what is wrong."""
    try:
        return verify_checkpoint(folder, Path(engine.config.data_root), _recorded_sha256(folder), spec.lora,
                                 lora_shapes(engine.model, spec.lora), total_steps, spec.training)
    except CheckpointError as exc:
        raise JobError(f"resume_from {spec.resume_from!r} is refused: {exc}", "resume_from") from exc


def _inherited(engine: "LLMEngine", output: Path, resume: ResumeState) -> list[Checkpoint]:
    """Checkpoints a job resuming in its own output keeps listing: those up to its starting step."""
    if resume.folder.parent != output:
        return []
    try:
        record = read_record(output)
    except RecordError:
        record = None
    root = Path(engine.config.data_root).resolve()
    kept = [Checkpoint(c.step, c.path, c.sha256, c.time, c.loss) for c in (record.checkpoints if record else [])
            if c.step < resume.step and (root / c.path).is_dir()]
    own = Checkpoint(resume.step, str(resume.folder.relative_to(root)), resume.sha256,
                     resume.folder.stat().st_mtime, resume.losses[-1] if resume.losses else None)
    return kept + [own]


def _init_modules(engine: "LLMEngine", spec: JobSpec, folder: Path) -> dict:
    try:
        cfg, modules = read_adapter(folder)
        r = cfg.get("r")
    except Exception as exc:   # an untrusted folder: any parse failure is a refusal
        raise JobError(f"init_from: {type(exc).__name__}: {exc}", "init_from") from exc
    targets = {m.rsplit(".", 1)[-1] for m in modules}
    if r != spec.lora.r or targets != set(spec.lora.target_modules):
        raise JobError(f"init_from adapter has r={r!r} on {sorted(targets)}; the job's lora settings "
                       f"say r={spec.lora.r} on {spec.lora.target_modules}", "init_from")
    shapes = lora_shapes(engine.model, spec.lora)
    if set(modules) != set(shapes) or any(set(ab) != {"A", "B"} or (tuple(ab["A"].shape), tuple(ab["B"].shape))
                                          != shapes[m] for m, ab in modules.items()):
        raise JobError("init_from adapter's modules or shapes do not fit this model and the job's lora settings",
                       "init_from")
    if not all_finite([t for ab in modules.values() for t in ab.values()]):
        raise JobError("init_from adapter weights hold NaN or infinity", "init_from")
    return modules


def build_job(engine: "LLMEngine", spec: JobSpec) -> FinetuneJob:
    """Check paths, data and the starting point before anything runs: a bad dataset line or a tampered
    checkpoint is refused now, not mid-training."""
    data = _under(engine, spec.dataset.path, "dataset.path")
    output = _under(engine, spec.output, "output")
    if output.exists() and not output.is_dir():
        raise JobError(f"output {spec.output!r} exists and is not a folder", "output")
    init_modules = _init_modules(engine, spec, _under(engine, spec.init_from, "init_from")) if spec.init_from \
        else None
    resume_dir = _under(engine, spec.resume_from, "resume_from") if spec.resume_from else None
    if resume_dir is not None and not resume_dir.is_dir():
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
    if resume_dir is None:
        return FinetuneJob(spec, engine, sequences, output, init_modules)
    resume = verify_resume(engine, spec, resume_dir, count_steps(t, len(sequences)))
    return FinetuneJob(spec, engine, sequences, output, resume=resume, inherited=_inherited(engine, output, resume))


class FinetuneManager:
    def __init__(self, engine: "LLMEngine", max_active: int, kv_reserve: float):
        self.engine = engine
        self.max_active = max_active
        self.kv_reserve = kv_reserve
        self.jobs: dict[str, FinetuneJob] = {}
        self.turn = 0                                  # rotates which job goes first
        self.stopping = threading.Event()              # set from any thread: checkpoint and stop every job
        self.stopped = threading.Event()               # set by the engine thread once that is done
        self.stop_requested = 0.0                      # time.monotonic() of the first stop request
        self.warmed_shapes: set[tuple[int, int]] = set()   # unit shapes run once outside a graph capture
        self.aside = 0                                 # iterations in a row finetuning stood aside (stands_aside)

    # ---- admission and ownership --------------------------------------------------------------------
    def check_new(self, spec: JobSpec, replace: bool = False) -> None:
        """Refuse a duplicate id, or an output that a live job writes into or that holds another job's work.
        The id of a job that is no longer live is taken again only to resume it (`replace`)."""
        if self.stopping.is_set():
            raise JobError("the engine is shutting down; submit the job to another engine", None, 503)
        existing = self.jobs.get(spec.id)
        if existing is not None and (existing.state in LIVE or not replace):
            hint = "" if existing.state in LIVE else (f"; it is {existing.state.value}: resume it with POST "
                                                      f"/admin/finetune/jobs/{spec.id}/resume")
            raise JobError(f"a job with id {spec.id!r} already exists{hint}", "id", 409)
        output = _under(self.engine, spec.output, "output")
        for job in list(self.jobs.values()):
            if job.state in LIVE and job.output == output:
                raise JobError(f"job {job.spec.id!r} is writing to output {spec.output!r} (the same folder as "
                               f"{job.spec.output!r})", "output", 409)
        resume_dir = _under(self.engine, spec.resume_from, "resume_from") if spec.resume_from else None
        try:
            check_output_free(output, spec.output, spec.id, resume_dir)
        except OwnershipError as exc:
            raise JobError(str(exc), "output", 409) from exc

    def add(self, job: FinetuneJob, replace: bool | None = None) -> None:
        """Admit a built job (on the engine thread): take the output's lock, which also keeps engines that share
        the data root out of it, write its record, and start it when a slot is free. A job with `resume_from`
        may replace a stopped job of its id."""
        replace = bool(job.spec.resume_from) if replace is None else replace
        self.check_new(job.spec, replace)
        job.output.mkdir(parents=True, exist_ok=True)
        if not job.lock.acquire():
            raise JobError(f"output {job.spec.output!r} is locked by a job of another engine process", "output", 409)
        try:
            self.check_new(job.spec, replace)   # again, now that no other process can write there
        except JobError:
            job.lock.release()
            raise
        remove_tmp_folders(job.output)
        job.persist()
        self.jobs[job.spec.id] = job
        resuming = f", resuming from {job.spec.resume_from}" if job.spec.resume_from else ""
        log.info("job %s created (output %s%s)", job.spec.id, job.spec.output, resuming,
                 extra={"event": "job_created", "job_id": job.spec.id, "step": job.step, "path": job.spec.output})
        self._activate()

    def resume_spec(self, job_id: str) -> JobSpec:
        """The spec that continues a stopped job from its newest checkpoint that verifies (from the start if it
        has none); newer checkpoints that fail verification are skipped and logged."""
        job = self.jobs[job_id]
        if job.state in LIVE:
            raise JobError(f"job {job_id!r} is {job.state.value}; only a stopped job can be resumed", "id", 409)
        if job.state is JobState.SUCCEEDED:
            raise JobError(f"job {job_id!r} has already succeeded", "id", 409)
        root = Path(self.engine.config.data_root)
        for ckpt in reversed(job.checkpoints):
            spec = job.spec.model_copy(update={"resume_from": ckpt.path, "init_from": None})
            try:
                folder = _under(self.engine, ckpt.path, "resume_from")
                verify_checkpoint(folder, root, ckpt.sha256, spec.lora, lora_shapes(self.engine.model, spec.lora),
                                  job.total_steps, spec.training)
                return spec
            except (JobError, CheckpointError) as exc:
                log.warning("job %s: not resuming from %s: %s", job_id, ckpt.path, exc)
        return job.spec.model_copy(update={"resume_from": None})

    # ---- records of earlier engine processes ---------------------------------------------------------
    def restore(self) -> list[FinetuneJob]:
        """List the jobs whose records lie under the data root, as they were; a job that was queued or running
        when its engine died becomes `interrupted` (resumable). Records held by a live job of another engine
        process (its lock is taken) are left to that engine."""
        root = Path(self.engine.config.data_root).resolve()
        found: dict[str, FinetuneJob] = {}
        for folder in find_records(root):
            try:
                record = read_record(folder)
                output = resolve_under(root, record.spec.output)
            except (RecordError, PathError) as exc:
                log.warning("skipping the job record in %s: %s", folder, exc)
                continue
            if output != folder:
                log.warning("skipping the job record in %s: it names output %r (copied or moved?)", folder,
                            record.spec.output)
                continue
            job = FinetuneJob.from_record(record, self.engine, folder)
            if not job.lock.acquire():
                continue
            try:
                if job.state in LIVE:
                    job.state, job.finished = JobState.INTERRUPTED, record.updated
                    last = job.checkpoints[-1].path if job.checkpoints else "the start (no checkpoint yet)"
                    job.error = (f"interrupted: the engine stopped without a clean shutdown while the job was "
                                 f"{record.state} (recorded at step {record.step}); resuming continues from {last}")
                    job.persist()
                remove_tmp_folders(folder)
            finally:
                job.lock.release()
            other = found.get(job.spec.id)
            if other is None or other.created < job.created:
                found[job.spec.id] = job
        for job_id, job in found.items():
            self.jobs.setdefault(job_id, job)
        if found:
            log.info("listed %d finetuning job(s) from their records", len(found))
        return list(found.values())

    # ---- shutdown -----------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask (from any thread, e.g. a signal handler) that the engine thread checkpoint every live job and
        mark it interrupted; new jobs are refused from now on."""
        if not self.stopping.is_set():
            self.stop_requested = time.monotonic()
            self.stopping.set()
        if not any(j.state in LIVE for j in list(self.jobs.values())):
            self.stopped.set()

    def wait_stopped(self, grace_s: float) -> bool:
        """Block until the requested stop is done, at most `grace_s` after it was requested."""
        self.request_stop()
        return self.stopped.wait(max(0.0, grace_s - (time.monotonic() - self.stop_requested)))

    def interrupt_all(self, reason: str = "interrupted: the engine shut down") -> None:
        for job in list(self.jobs.values()):
            if job.state in LIVE:
                self._guard(job, lambda: job.interrupt(reason))
        self.stopped.set()

    # ---- scheduling -----------------------------------------------------------------------------------
    def active(self) -> list[FinetuneJob]:
        jobs = [j for j in self.jobs.values() if j.active]
        if not jobs:
            return jobs
        k = self.turn % len(jobs)
        return jobs[k:] + jobs[:k]

    def has_work(self) -> bool:
        """Start queued jobs that now fit (a slot may have been freed since); true while any job trains. Runs on
        the engine thread each iteration, so this is where a requested stop is carried out."""
        if self.stopping.is_set() and not self.stopped.is_set():
            self.interrupt_all()
        if any(j.state is JobState.QUEUED for j in self.jobs.values()):
            self._activate()
        return any(j.active for j in self.jobs.values())

    def settle(self) -> None:
        """Take in the optimizer steps whose checks have reached the host (see `FinetuneJob.settle`)."""
        for job in self.active():
            self._guard(job, job.settle)

    def counters(self) -> tuple[int, int]:
        """(optimizer steps, checkpoints written) over all jobs, to tell what an iteration did."""
        jobs = list(self.jobs.values())
        return sum(j.step for j in jobs), sum(j.saves for j in jobs)

    def slots_free(self) -> int:
        return max(0, self.max_active - sum(j.active for j in self.jobs.values()))

    def _activate(self) -> None:
        for job in self.jobs.values():
            if job.state is JobState.QUEUED and self.slots_free() > 0 and self.engine.loras.free_slots() > 0:
                self._guard(job, job.start)

    def cancel(self, job_id: str, checkpoint: bool = False) -> FinetuneJob:
        """Stop a job; with `checkpoint`, first save its adapter at the last finished step (for suspend)."""
        job = self.jobs[job_id]
        job.settle(wait=True)
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

    def stands_aside(self, backlog: bool) -> bool:
        """Whether finetuning leaves this iteration to inference. With requests waiting for admission (`backlog`:
        batch slots, the token budget or KV blocks all taken) inference keeps up only if its iterations are as
        short as it can make them: requests finish and free their places sooner, where finetuning would stretch
        every iteration to the latency target and the queue would grow (TTFT past any SLO). After PATIENCE such
        iterations in a row one runs as usual, so no job starves under overload."""
        if not backlog or self.aside >= PATIENCE:
            self.aside = 0
            return False
        self.aside += 1
        return True

    def plan_forward(self, budget: float, inference_tokens: int, inference_pairs: int, token_room: int,
                     cost: CostModel, graphed: bool) -> list[Chunk]:
        """Forward chunks of the jobs' sequences that fit, with the iteration's inference tokens, in one forward
        within `budget` (`graphed`: the engine replays mixed iterations from CUDA graphs, which chunks with LoRA
        dropout leave). With no inference in the iteration (nothing to protect) one chunk goes ahead even past the
        target."""
        chunks: list[Chunk] = []
        reserve = int(self.engine.blocks.num_blocks * self.kv_reserve)
        used, pairs = inference_tokens, inference_pairs
        for job in self.active():
            if job.seq is None and not job.begin_sequence(reserve):
                continue
            if not job.forward_tokens_left():
                continue
            eager = not graphed or job.spec.lora.dropout > 0 or any(c.dropout is not None for c in chunks)
            n = cost.forward_tokens_within(budget, fixed_paid=False, graphed=not eager, tokens=used, pairs=pairs,
                                           start=job.seq.num_computed, most=token_room, lora=True)
            if n < 1 and not inference_tokens and not chunks:
                n = token_room
            if n < 1:
                continue
            chunk = job.next_chunk(n)
            chunks.append(chunk)
            token_room -= chunk.length
            used += chunk.length
            pairs += context(chunk.start, chunk.length)
        return chunks

    def forward_done(self, chunks: list[Chunk], kept: list[torch.Tensor]) -> None:
        for chunk, acts in zip(chunks, kept):
            job = self.jobs[chunk.seq.request_id.split(":")[1]]
            self._guard(job, lambda: job.forward_done(chunk, acts))

    def run_backward(self, time_left: float, cost: CostModel, must_progress: bool) -> BackwardWork:
        """Run backward units while their priced cost fits in what is left of the iteration; with `must_progress`
        (no inference this iteration) at least one runs, and a unit that found no room for PATIENCE iterations runs
        first in the next. A unit that can have a CUDA graph but has none yet is captured, never run eagerly: priced
        at the capture's measured host time (the shape's warm-up included while due; before any capture, as much as
        the unit run eagerly, whose launches it records), it waits for room at most CAPTURE_PATIENCE iterations.
        Eager units are those no graph serves (LoRA dropout, a CPU)."""
        done = BackwardWork()
        for job in self.active():
            while job.active and job.backward is not None:
                bwd = job.backward
                capture = bwd.next_graphed() is False
                unit = bwd.next_unit(eager=capture)
                seconds = bwd.next_capture_cost(prior=cost.unit_s(unit)) if capture else cost.unit_s(unit)
                if job.unit_ends_step():
                    seconds += cost.optimizer_step_s()
                first = done.units == 0
                due = job.waits >= (CAPTURE_PATIENCE if capture else PATIENCE)
                if seconds > time_left and not (first and (must_progress or due)):
                    job.waits += 1
                    break
                job.waits = 0
                tokens, start = bwd.next_unit_tokens(), bwd.next_unit_start()
                self._guard(job, lambda: job.run_backward_unit(capture))
                time_left -= seconds
                done.units += 1
                done.tokens += tokens
                done.pairs += context(start, tokens)
                done.captures += capture
                if not capture:
                    done.run.append(unit)
        self.turn += 1
        self._activate()
        return done


@dataclass
class BackwardWork:
    """The backward units one iteration ran: how many, their tokens, how many ran eagerly, how many were captured."""

    units: int = 0
    tokens: int = 0
    pairs: int = 0
    captures: int = 0
    run: list[Unit] = field(default_factory=list)   # the units that ran (not captured), as they were priced

    @property
    def eager(self) -> int:
        return sum(u.kind != GRAPH for u in self.run)
