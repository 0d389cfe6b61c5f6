"""Who may write into an output folder. An output belongs to one job: another job may take it over only by
resuming from one of its checkpoints, or when the jobs before wrote no checkpoint there; trained work in a
folder is never overwritten by a fresh start."""
from __future__ import annotations

from pathlib import Path

from coserve.engine.finetune.checkpoint import FOLDER
from coserve.engine.finetune.record import RecordError, read_record


class OwnershipError(ValueError):
    """The output holds another job's work (HTTP 409 naming `output`)."""


def check_output_free(output: Path, display: str, job_id: str, resume_dir: Path | None) -> None:
    """Raise OwnershipError if a job `job_id` starting (or resuming from `resume_dir`) into `output` would
    overwrite trained work that is not its own starting point."""
    if not output.is_dir():
        return
    try:
        record = read_record(output)
    except RecordError as exc:
        raise OwnershipError(f"output {display!r} holds an unreadable job record ({exc}); choose another output")
    on_disk = sorted(p.name for p in output.iterdir() if FOLDER.match(p.name))
    holds_work = bool(on_disk) or bool(record and record.checkpoints)
    if resume_dir is not None and resume_dir.parent == output:
        return
    if not holds_work and (record is None or record.state != "succeeded"):
        return
    owner = f"job {record.id!r}" if record is not None else "an earlier job"
    what = f"its checkpoints ({', '.join(on_disk[-3:])})" if on_disk else "its record"
    if record is not None and record.id == job_id:
        raise OwnershipError(f"output {display!r} holds {what} from an earlier run of this job; resume it "
                             f"(POST /admin/finetune/jobs/{job_id}/resume or resume_from) or choose another output")
    raise OwnershipError(f"output {display!r} belongs to {owner} and holds {what}; choose another output, or "
                         "resume from one of its checkpoints")
