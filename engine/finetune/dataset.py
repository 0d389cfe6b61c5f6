"""JSONL datasets in three formats, tokenised with labels (-100 where no loss is taken), checked line by line
when a job is created so a bad line is reported before any training."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE = -100


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the line."""


@dataclass
class Example:
    ids: list[int]
    labels: list[int]     # aligned with ids; position t's target is labels[t + 1]

    @property
    def num_targets(self) -> int:
        return sum(1 for x in self.labels[1:] if x != IGNORE)


def _require_str(row: dict, key: str, line: int) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise DatasetError(f"line {line}: field {key!r} must be a string")
    return _text(value, key, line)


def _text(value: str, key: str, line: int) -> str:
    """JSON escapes can encode lone surrogates, which no tokenizer takes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DatasetError(f"line {line}: field {key!r} holds invalid Unicode (a lone surrogate)") from exc
    return value


def _chat_example(tokenizer, messages: object, line: int) -> Example:
    """Loss on assistant turns only, located by rendering the chat template turn by turn."""
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"line {line}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DatasetError(f"line {line}: messages[{i}] needs string 'role' and 'content'")
        _text(m["role"] + m["content"], f"messages[{i}]", line)
    if not any(m["role"] == "assistant" for m in messages):
        raise DatasetError(f"line {line}: a chat example needs at least one assistant message")
    render = tokenizer.apply_chat_template
    text = render(messages, tokenize=False)
    spans = []
    for j, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(render(messages[:j], tokenize=False, add_generation_prompt=True)) if j else 0
            spans.append((start, len(render(messages[:j + 1], tokenize=False))))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [tok if any(s <= a < e for s, e in spans) else IGNORE
              for tok, (a, _) in zip(enc.input_ids, enc.offset_mapping)]
    return Example(list(enc.input_ids), labels)


def read_examples(path: Path, fmt: str, tokenizer) -> list[Example]:
    """Parse and tokenise every line; raises DatasetError naming the first bad line."""
    if not path.is_file():
        raise DatasetError(f"dataset file {path.name!r} does not exist")
    if fmt == "chat" and tokenizer.chat_template is None:
        raise DatasetError("format 'chat' needs a tokenizer with a chat template")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples = []
    with path.open("rb") as f:
        for line_no, raw_bytes in enumerate(f, start=1):
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetError(f"line {line_no}: not valid UTF-8 (byte {exc.start})") from exc
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"line {line_no}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise DatasetError(f"line {line_no}: each line must be a JSON object")
            if fmt == "text":
                ids = tokenizer(_require_str(row, "text", line_no), add_special_tokens=False).input_ids + eos
                examples.append(Example(ids, list(ids)))
            elif fmt == "prompt_completion":
                p = tokenizer(_require_str(row, "prompt", line_no), add_special_tokens=False).input_ids
                c = tokenizer(_require_str(row, "completion", line_no), add_special_tokens=False).input_ids + eos
                examples.append(Example(p + c, [IGNORE] * len(p) + c))
            else:
                examples.append(_chat_example(tokenizer, row.get("messages"), line_no))
    if not examples:
        raise DatasetError("the dataset has no examples")
    return examples


def to_sequences(examples: list[Example], max_len: int, packing: bool) -> list[Example]:
    """Truncate each example to max_len, or pack them all into max_len blocks; drop those with no target."""
    if packing:
        ids = [t for e in examples for t in e.ids]
        labels = [t for e in examples for t in e.labels]
        seqs = [Example(ids[i:i + max_len], labels[i:i + max_len]) for i in range(0, len(ids), max_len)]
    else:
        seqs = [Example(e.ids[:max_len], e.labels[:max_len]) for e in examples]
    seqs = [s for s in seqs if s.num_targets > 0]
    if not seqs:
        raise DatasetError("no example has a token to learn after truncation to max_seq_len")
    return seqs


def epoch_order(n: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    """The same seed and epoch always give the same order, so a resumed job sees the same data."""
    if not shuffle:
        return list(range(n))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch)).tolist()
