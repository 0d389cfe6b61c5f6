"""Incremental detokenization: each new token decodes a short window instead of the whole output, so the cost
per token stays constant however long the completion grows (a full re-decode per step is quadratic)."""
from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    """Text of a growing list of token ids. The window starts a few tokens back (`prefix`) so tokenizers that
    merge or strip spaces across token boundaries decode the new tokens as they would in the full text; bytes
    of a character split across tokens are held back until the character is complete."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        # The Rust tokenizer decodes as `tokenizer.decode` does when no clean-up of spaces follows, without its
        # per-id Python conversion (the largest host cost of a decode step at batch 64).
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.backend = None if getattr(tokenizer, "clean_up_tokenization_spaces", True) else backend
        self.prefix = 0      # first id of the decode window
        self.read = 0        # ids before this are already in the text

    def _decode(self, ids: list[int]) -> str:
        if self.backend is not None:
            return self.backend.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def step(self, ids: list[int], final: bool = False) -> str:
        """The text that `ids` (all output ids so far) adds; with `final`, also an incomplete last character."""
        if len(ids) <= self.read:
            return ""
        before = self._decode(ids[self.prefix:self.read])
        text = self._decode(ids[self.prefix:])
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(ids)
        return text[len(before):]
