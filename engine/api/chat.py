"""Chat prompts tokenized so that only the template's own markers become special tokens: a user who types
`<|im_start|>system` gets those characters as text, never the control token (no forged turns)."""
from __future__ import annotations

import secrets

from tokenizers import Tokenizer


class ChatTemplateError(ValueError):
    """The chat template could not render the messages; the message says why."""


class ChatEncoder:
    """Renders a tokenizer's chat template and tokenizes the result with the template's markers special and
    message content literal. Tokenizer calls here release the GIL, so callers run this on a worker thread."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.special_ids = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        self.literal: Tokenizer | None = None    # a fast tokenizer's twin that never matches special tokens
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            self.literal = Tokenizer.from_str(backend.to_str())
            self.literal.encode_special_tokens = True

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      tokenize=False)
        except Exception as exc:  # a template is user-supplied Jinja: any error it raises is the request's
            raise ChatTemplateError(f"the chat template rejected the messages: {exc}") from exc
        if not isinstance(text, str):
            raise ChatTemplateError("the chat template did not render text")
        return text

    def content_spans(self, messages: list[dict[str, str]],
                      add_generation_prompt: bool = True) -> tuple[str, list[tuple[int, int]]] | None:
        """The rendered prompt and where each message's content lies in it, found by rendering unguessable
        placeholders first; None when the template alters or repeats content (then spans are unknown)."""
        nonce = secrets.token_hex(8)
        marks = [f"\ue000{nonce}:{i}\ue001" for i in range(len(messages))]
        skeleton = self.render([{**m, "content": mark} for m, mark in zip(messages, marks)], add_generation_prompt)
        text, spans, pos = "", [], 0
        for mark, message in zip(marks, messages):
            at = skeleton.find(mark, pos)
            if at < 0 or skeleton.count(mark) != 1:
                return None
            text += skeleton[pos:at]
            spans.append((len(text), len(text) + len(message["content"])))
            text += message["content"]
            pos = at + len(mark)
        return text + skeleton[pos:], spans

    def encode(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the chat prompt (by default with the generation prompt); content never yields special
        tokens."""
        located = self.content_spans(messages, add_generation_prompt) if self.literal is not None else None
        if located is None:
            return self._encode_unlocated(messages, add_generation_prompt)
        text, spans = located
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc.input_ids), list(enc.offset_mapping)

        def in_content(start: int, end: int) -> bool:
            return any(s < end and start < e for s, e in spans)

        if not any(t in self.special_ids and in_content(a, b) for t, (a, b) in zip(ids, offsets)):
            return ids
        # Keep the template's own special tokens; everything between them is encoded as literal text.
        markers = [(a, b, t) for t, (a, b) in zip(ids, offsets) if t in self.special_ids and not in_content(a, b)]
        pieces, cuts, pos = [], [], 0
        for a, b, t in markers:
            pieces.append(text[pos:a])
            cuts.append(t)
            pos = b
        pieces.append(text[pos:])
        encoded = self.literal.encode_batch(pieces, add_special_tokens=False)
        out: list[int] = []
        for i, piece in enumerate(encoded):
            out.extend(piece.ids)
            if i < len(cuts):
                out.append(cuts[i])
        return out

    def _encode_unlocated(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
        """A template that rewrites content, or a tokenizer without a fast twin: safe only when no content holds
        a special token's text."""
        names = [self.tokenizer.convert_ids_to_tokens(i) for i in sorted(self.special_ids)]
        for i, m in enumerate(messages):
            typed = [n for n in names if n and n in m["content"]]
            if typed:
                raise ChatTemplateError(f"messages[{i}].content contains the special token {typed[0]!r}, which "
                                        "this model's chat template does not let us keep as text")
        return list(self.tokenizer(self.render(messages, add_generation_prompt), add_special_tokens=False).input_ids)
