"""Which adapter each token of an iteration uses, in the forms the LoRA paths need: a per-token slot index (the
kernel and its twin), groups of finetuning rows whose LoRA input is dropped out, and a training adapter."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from coserve.kernels.lora_triton import LoRABatchMeta, lora_batch_meta

Dropout = Callable[[str, torch.Tensor], torch.Tensor]


class TrainableLoRA(Protocol):
    """A finetuning job's adapter in autograd form; it applies to every row of the unit it is passed to."""

    def delta(self, names: list[str], sizes: list[int], x: torch.Tensor,
              dropout: Dropout | None) -> torch.Tensor | None:
        """The LoRA output of a merged projection's slices `names` (zeros for slices it does not adapt)."""
        ...


@dataclass
class DroppedGroup:
    """Finetuning-forward rows of a serving slot whose LoRA input is dropped out as PEFT's lora_dropout does."""

    slot: int
    rows: torch.Tensor
    dropout: Dropout


@dataclass
class LoRABatch:
    token_lora: torch.Tensor                 # int32 [T]: each token's serving slot, -1 for none
    any_slot: bool = False                   # host flag: some token has a slot (else the kernels are skipped)
    num_slots: int = 0
    dropped: list[DroppedGroup] = field(default_factory=list)
    trainable: list[TrainableLoRA] = field(default_factory=list)
    train_dropout: Dropout | None = None

    _meta: LoRABatchMeta | None = None

    def kernel_meta(self) -> LoRABatchMeta:
        """Tokens grouped by slot for the kernels, built once per iteration on first use (inside a CUDA graph's
        capture when the iteration is a graph, so each replay regroups its own tokens)."""
        if self._meta is None:
            self._meta = lora_batch_meta(self.token_lora, self.num_slots)
        return self._meta

    @classmethod
    def training(cls, adapter: TrainableLoRA, rows: int, device: torch.device,
                 dropout: Dropout | None = None) -> "LoRABatch":
        """Every row of a backward unit gets the job's trainable adapter (and its dropout)."""
        return cls(torch.full((rows,), -1, dtype=torch.int32, device=device), trainable=[adapter],
                   train_dropout=dropout)
