"""Datasets: the three formats give the right loss masks, truncation and packing keep labels aligned, and a
bad line is named."""
from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from coserve.engine.finetune.dataset import IGNORE, DatasetError, Example, epoch_order, read_examples, to_sequences


@pytest.fixture(scope="module")
def tok(llama_dir):
    return AutoTokenizer.from_pretrained(str(llama_dir))


def write(tmp_path, rows) -> object:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_text_learns_every_token_and_ends_with_eos(tok, tmp_path):
    (ex,) = read_examples(write(tmp_path, [{"text": "Hello, world!"}]), "text", tok)
    assert ex.ids[-1] == tok.eos_token_id and ex.labels == ex.ids


def test_prompt_completion_learns_only_the_completion(tok, tmp_path):
    (ex,) = read_examples(write(tmp_path, [{"prompt": "One, two,", "completion": " three"}]), "prompt_completion", tok)
    n_prompt = len(tok("One, two,", add_special_tokens=False).input_ids)
    assert ex.labels[:n_prompt] == [IGNORE] * n_prompt
    assert tok.decode([t for t in ex.labels if t != IGNORE], skip_special_tokens=True) == " three"


def test_chat_learns_only_assistant_turns(tok, tmp_path):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tell me a joke"},
            {"role": "assistant", "content": "why did the tensor cross the bus"},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": "to reach the core"}]
    (ex,) = read_examples(write(tmp_path, [{"messages": msgs}]), "chat", tok)
    learned = tok.decode([t for t in ex.labels if t != IGNORE])
    assert "why did the tensor cross the bus" in learned and "to reach the core" in learned
    assert "joke" not in learned and "brief" not in learned and "again" not in learned


@pytest.mark.parametrize("rows, fmt, message", [
    ([{"text": "ok"}, "{not json"], "text", "line 2: not valid JSON"),
    ([{"text": "ok"}, {"text": 3}], "text", "line 2: field 'text' must be a string"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a"}], "prompt_completion", "line 2: field 'completion'"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "chat", "line 1: a chat example needs"),
    ([{"messages": "hi"}], "chat", "line 1: 'messages' must be"),
    (["[1, 2]"], "text", "line 1: each line must be a JSON object"),
])
def test_bad_lines_are_named(tok, tmp_path, rows, fmt, message):
    with pytest.raises(DatasetError, match=message):
        read_examples(write(tmp_path, rows), fmt, tok)


def test_truncation_and_packing():
    examples = [Example([1, 2, 3, 4, 5], [1, 2, 3, 4, 5]), Example([6, 7], [IGNORE, 7])]
    assert [s.ids for s in to_sequences(examples, 3, packing=False)] == [[1, 2, 3], [6, 7]]
    packed = to_sequences(examples, 3, packing=True)
    assert [s.ids for s in packed] == [[1, 2, 3], [4, 5, 6]]   # the one-token tail has nothing to learn
    assert packed[1].labels == [4, 5, IGNORE]


def test_epoch_order_is_a_seeded_permutation():
    a, b = epoch_order(10, 0, 1, True), epoch_order(10, 1, 1, True)
    assert sorted(a) == list(range(10)) and a != b and a == epoch_order(10, 0, 1, True)
    assert epoch_order(5, 3, 1, False) == [0, 1, 2, 3, 4]
