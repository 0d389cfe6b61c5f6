"""A job's durable record, `<output>/job.json`: written atomically (temp file, fsync, rename) so a crash leaves
the previous record whole, read back when the engine starts, and guarded by a lock file that marks the output
as owned by a live job (of this process or another engine sharing the data root)."""
from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coserve.engine.finetune.spec import JobSpec

RECORD_FILE = "job.json"
LOCK_FILE = ".job.lock"
RECORD_VERSION = 1
SCAN_MAX_DEPTH = 6          # folders below the data root searched for records
SCAN_MAX_FOLDERS = 20000    # a data root full of datasets must not stall the start

log = logging.getLogger("coserve.finetune")


class RecordError(ValueError):
    """A job record that cannot be read or trusted."""


class CheckpointEntry(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    step: int = Field(ge=1)
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    time: float
    loss: float | None = None


class JobRecord(BaseModel):
    """What a restarted engine needs to list a job as it was and to resume it."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    version: int = RECORD_VERSION
    id: str
    spec: JobSpec
    state: Literal["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]
    error: str | None = None
    step: int = Field(ge=0)
    total_steps: int = Field(ge=0)
    num_sequences: int = Field(ge=0)
    tokens: int = Field(ge=0)
    loss: float | None = None
    losses: dict[str, float | int | None] = Field(default_factory=dict)
    checkpoints: list[CheckpointEntry] = Field(default_factory=list)
    created: float
    started: float | None = None
    finished: float | None = None
    updated: float
    resumed_from: str | None = None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict) -> None:
    """Readers see the old file or the new one, never a torn one, even across a power cut."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as f:
        json.dump(data, f, indent=1, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def fsync_tree(folder: Path) -> None:
    """Flush a freshly written folder's files and entries before it is renamed into place."""
    for child in folder.iterdir():
        with child.open("rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(folder)


def read_record(output: Path) -> JobRecord | None:
    """The record in an output folder; None when there is none, RecordError when it is unusable."""
    path = output / RECORD_FILE
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_symlink() or not path.is_file():
        raise RecordError(f"{RECORD_FILE} in {output.name!r} is not a regular file")
    try:
        return JobRecord.model_validate_json(path.read_bytes())
    except (ValidationError, OSError, UnicodeDecodeError) as exc:
        raise RecordError(f"{RECORD_FILE} in {output.name!r} is not a valid job record: {exc}") from exc


def find_records(root: Path) -> list[Path]:
    """Output folders under the data root that hold a record: symlinks are not followed, checkpoints and hidden
    folders are not entered, and the search is bounded in depth and size."""
    root = root.resolve()
    found, visited = [], 0
    for folder, dirs, files in os.walk(root, followlinks=False):
        here = Path(folder)
        visited += 1
        if visited > SCAN_MAX_FOLDERS:
            log.warning("stopped looking for job records after %d folders under %s", SCAN_MAX_FOLDERS, root)
            break
        depth = len(here.relative_to(root).parts)
        dirs[:] = [] if depth >= SCAN_MAX_DEPTH else sorted(
            d for d in dirs if not d.startswith(".") and not d.startswith("checkpoint-"))
        if RECORD_FILE in files and not (here / RECORD_FILE).is_symlink():
            found.append(here)
    return found


class OutputLock:
    """An exclusive, non-blocking lock on an output folder, held while its job is queued or running; the
    kernel drops it when the process dies, so a crashed job never blocks its resumption."""

    def __init__(self, output: Path):
        self.output = output
        self._fd: int | None = None

    def acquire(self) -> bool:
        if self._fd is not None:
            return True
        fd = os.open(self.output / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None
