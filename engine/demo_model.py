"""The embedded default: a tiny Llama-architecture model written as a real Hugging Face directory
(config.json, model.safetensors, tokenizer), so every code path is the one real checkpoints take."""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class TinyModelSpec:
    arch: str = "llama"          # llama | qwen2 | mistral
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    seed: int = 0


def build_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """Train a byte-level BPE on the shipped corpus and save it so `AutoTokenizer` loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = resources.files("coserve.engine").joinpath("data/corpus.txt").read_text().splitlines()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))


def hf_config(spec: TinyModelSpec, tokens: dict[str, int]) -> dict:
    archs = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
    cfg = {
        "architectures": [archs[spec.arch]],
        "model_type": spec.arch,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.hidden_size // spec.num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "bos_token_id": tokens["<s>"],
        "eos_token_id": tokens["</s>"],
        "torch_dtype": "float32",
    }
    if spec.arch == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    if spec.arch == "qwen2":
        cfg.update(use_sliding_window=False, sliding_window=None)
    if spec.arch == "mistral":
        cfg.update(sliding_window=None)
    return cfg


def random_weights(spec: TinyModelSpec) -> dict[str, torch.Tensor]:
    """Seeded weights with the spread of a trained model's, so logits are neither flat nor saturated."""
    g = torch.Generator().manual_seed(spec.seed)
    h, i, hd = spec.hidden_size, spec.intermediate_size, spec.hidden_size // spec.num_heads

    def normal(*shape: int, std: float = 0.08) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    w = {"model.embed_tokens.weight": normal(spec.vocab_size, h, std=0.5), "model.norm.weight": 1 + normal(h)}
    for layer in range(spec.num_layers):
        p = f"model.layers.{layer}."
        w[p + "self_attn.q_proj.weight"] = normal(spec.num_heads * hd, h)
        w[p + "self_attn.k_proj.weight"] = normal(spec.num_kv_heads * hd, h)
        w[p + "self_attn.v_proj.weight"] = normal(spec.num_kv_heads * hd, h)
        w[p + "self_attn.o_proj.weight"] = normal(h, spec.num_heads * hd)
        if spec.arch == "qwen2":
            w[p + "self_attn.q_proj.bias"] = normal(spec.num_heads * hd)
            w[p + "self_attn.k_proj.bias"] = normal(spec.num_kv_heads * hd)
            w[p + "self_attn.v_proj.bias"] = normal(spec.num_kv_heads * hd)
        w[p + "mlp.gate_proj.weight"] = normal(i, h)
        w[p + "mlp.up_proj.weight"] = normal(i, h)
        w[p + "mlp.down_proj.weight"] = normal(h, i)
        w[p + "input_layernorm.weight"] = 1 + normal(h)
        w[p + "post_attention_layernorm.weight"] = 1 + normal(h)
    if not spec.tie_word_embeddings:
        w["lm_head.weight"] = normal(spec.vocab_size, h, std=0.3)
    return w


def write_tiny_model(out_dir: str | Path, spec: TinyModelSpec | None = None) -> Path:
    """Write the tiny model directory; the same spec always gives the same files."""
    spec = spec or TinyModelSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out, spec.vocab_size)
    tokens = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    cfg = hf_config(spec, tokens)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = {"bos_token_id": tokens["<s>"], "eos_token_id": [tokens["</s>"], tokens["<|im_end|>"]]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    weights = {k: v.contiguous() for k, v in random_weights(spec).items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
