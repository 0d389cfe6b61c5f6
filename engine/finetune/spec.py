"""A finetuning job's settings as the admin API receives them (validated; errors name the field). Every number
is finite and within a range that can train: a non-finite or absurd setting is refused before any work."""
from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from coserve.engine.model.llama import LORA_TARGETS

JOB_ID = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
MAX_SEED = 2**32 - 1        # epoch orders seed torch generators with seed * 1000003 + epoch

Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class DatasetSpec(Strict):
    path: str = Field(min_length=1)
    format: Literal["text", "prompt_completion", "chat"] = "text"


class LoRASpec(Strict):
    r: int = Field(16, ge=1, le=256)
    alpha: float = Field(32.0, gt=0, le=65536)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    use_rslora: bool = False

    @field_validator("target_modules")
    @classmethod
    def known_modules(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(LORA_TARGETS))
        if unknown:
            raise ValueError(f"unknown target modules {unknown}; choose from {list(LORA_TARGETS)}")
        return sorted(set(v), key=LORA_TARGETS.index)


class TrainingSpec(Strict):
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-4, gt=0, le=10)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0, le=10**9)
    weight_decay: float = Field(0.0, ge=0, le=1)
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0, le=1)
    momentum: float = Field(0.0, ge=0, lt=1)
    max_grad_norm: float | None = Field(None, gt=0, le=1e6)
    epochs: int = Field(1, ge=1, le=10**6)
    max_steps: int | None = Field(None, ge=1, le=10**9)
    sequences_per_step: int = Field(1, ge=1, le=65536)
    max_seq_len: int | None = Field(None, ge=2, le=10**7, description="default: as long as the engine can hold")
    packing: bool = False
    shuffle: bool = True
    seed: int = Field(0, ge=0, le=MAX_SEED)
    chunk_tokens: int | None = Field(None, ge=1, le=65536, description="largest forward chunk, in tokens; default: "
                                     "as many as the iteration has room for")


class JobSpec(Strict):
    id: str
    dataset: DatasetSpec
    lora: LoRASpec = Field(default_factory=LoRASpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    output: str = Field(min_length=1)
    checkpoint_every: int | None = Field(None, ge=1, le=10**9)
    save_total_limit: int | None = Field(5, ge=1, le=10**6, description="checkpoints kept besides the best-loss "
                                                                       "and the final one; null keeps all")
    init_from: str | None = None
    resume_from: str | None = None

    @field_validator("id")
    @classmethod
    def dns_label(cls, v: str) -> str:
        if not JOB_ID.match(v):
            raise ValueError("id must be 1-63 lowercase letters, digits, '.', '_' or '-', "
                             "starting and ending with a letter or digit")
        return v

    @model_validator(mode="after")
    def one_start(self) -> "JobSpec":
        if self.init_from and self.resume_from:
            raise ValueError("give init_from or resume_from, not both")
        return self
