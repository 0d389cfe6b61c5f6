"""OpenAI-compatible request bodies (the fields we honour; unknown fields are ignored as OpenAI's are). Every
field is bounded and every number finite, so a value the engine cannot take is a 400 naming it, never a 500."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

GREEDY_BELOW = 1e-5          # temperatures (dividing logits by them overflows) and top_p (rounding to 0 in
                             # float32 keeps no token) below this sample greedily
MAX_SEED = 2**63             # seeds are in [0, 2**63)
MAX_STOP = 16                # stop strings per request
MAX_STOP_CHARS = 1000        # characters per stop string (a stream holds back that many)
MAX_STOP_TOKEN_IDS = 1024
MAX_TOKENS = 2**31 - 1
MAX_TOP_K = 1 << 20
MAX_MESSAGES = 10_000


def _valid_unicode(text: str) -> str:
    """JSON escapes can carry lone surrogates, which are not text: no tokenizer or encoder takes them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("holds invalid Unicode (a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]


class Finite(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(Finite):
    include_usage: bool = False


class SamplingFields(Finite):
    model: Text
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, le=MAX_TOP_K, description="0 or -1: no limit")
    seed: int | None = Field(None, ge=0, lt=MAX_SEED)
    stop: Annotated[Text, Field(max_length=MAX_STOP_CHARS)] | Annotated[
        list[Annotated[Text, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: list[int] = Field(default_factory=list, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False
    n: int = Field(1, ge=1, le=1, description="only one choice per request is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def effective_temperature(self) -> float:
        return 0.0 if self.temperature < GREEDY_BELOW else self.temperature

    def effective_top_k(self) -> int:
        """-1 means no limit, as 0 does; a top_p that keeps only the most likely token is top_k 1."""
        return 1 if self.top_p < GREEDY_BELOW else max(self.top_k, 0)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: Text | list[int] | list[Text] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKENS)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


class TextPart(Finite):
    type: Literal["text"]
    text: Text


class ChatMessage(Finite):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=0, description="only the chosen token's logprob is returned")


class AdapterLoad(Finite):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    path: Text = Field(min_length=1)


class LoadLoRAAdapterRequest(Finite):
    """vLLM's `POST /v1/load_lora_adapter` body; other fields vLLM's clients send (`base_model_name`) are
    ignored."""

    lora_name: Text = Field(min_length=1)
    lora_path: Text = Field(min_length=1)
    load_inplace: bool = Field(False, description="replace an adapter already loaded under this name")


class UnloadLoRAAdapterRequest(Finite):
    """vLLM's `POST /v1/unload_lora_adapter` body (`lora_int_id` is vLLM-internal and ignored)."""

    lora_name: Text = Field(min_length=1)


class TokenizeRequest(Finite):
    """vLLM's `POST /tokenize`: a `prompt`, or chat `messages` rendered through the chat template."""

    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    add_special_tokens: bool = Field(False, description="the default is what generation does: it adds none "
                                                        "(chat templates write their own)")
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(Finite):
    model: Text | None = None
    tokens: list[int] = Field(max_length=1 << 20)
