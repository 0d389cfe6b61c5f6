"""What every benchmark script shares: importing coserve from the source tree, the random-weight model
directories of the measured shapes, the run header (device, date, versions) and finetuning job specs."""
from __future__ import annotations

import json
import platform
import sys
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
               num_kv_heads=8, max_position_embeddings=8192),
    "1p5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                 num_kv_heads=2, max_position_embeddings=8192, tie_word_embeddings=True),
    "small": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, max_position_embeddings=2048),
}
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def import_coserve() -> None:
    """Use the installed package, or map the source folders when the machine has not installed it."""
    try:
        import coserve.engine  # noqa: F401
    except ImportError:
        import importlib.util
        import types
        pkg = types.ModuleType("coserve")
        pkg.__path__ = []
        sys.modules["coserve"] = pkg
        for name in ("kernels", "engine"):
            spec = importlib.util.spec_from_file_location(f"coserve.{name}", ROOT / name / "__init__.py",
                                                          submodule_search_locations=[str(ROOT / name)])
            module = importlib.util.module_from_spec(spec)
            sys.modules[f"coserve.{name}"] = module
            spec.loader.exec_module(module)


def sync() -> None:
    """Wait for the GPU, so host timers measure the work and not its launch."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def emit(result: dict, out: Path | None) -> None:
    """Print a benchmark's JSON, and write it to `out` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.write_text(text)


def run_header(benchmark: str, device: str) -> dict:
    """Device, date and library versions: a result is only comparable with one taken under the same."""
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version()}
    for name in ("triton", "peft"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return {"benchmark": benchmark, "device": torch.cuda.get_device_name() if device == "cuda" else
            platform.processor() or "cpu", "date": date.today().isoformat(), "versions": versions}


def write_model(out: Path, shape: dict, device: str) -> Path:
    """A sharded Hugging Face Llama directory, loadable by our engine and by transformers alike, with random weights
    drawn on the device (fast for 8B) and the project's tokenizer (only its ids matter here)."""
    from safetensors.torch import save_file

    from coserve.engine.demo_model import TinyModelSpec, write_tiny_model

    spec = TinyModelSpec(**shape)
    out.mkdir(parents=True, exist_ok=True)
    write_tiny_model(out / "_tok", TinyModelSpec())
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (out / "_tok" / f).exists():
            (out / f).write_bytes((out / "_tok" / f).read_bytes())
    h, hd = spec.hidden_size, spec.hidden_size // spec.num_heads
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": spec.vocab_size,
           "hidden_size": h, "intermediate_size": spec.intermediate_size, "num_hidden_layers": spec.num_layers,
           "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads, "head_dim": hd,
           "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": spec.max_position_embeddings,
           "tie_word_embeddings": spec.tie_word_embeddings, "torch_dtype": "bfloat16", "bos_token_id": 1,
           "eos_token_id": 2}
    (out / "config.json").write_text(json.dumps(cfg))
    shapes = {"model.embed_tokens.weight": (spec.vocab_size, h), "model.norm.weight": (h,)}
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (spec.num_heads * hd, h),
                       p + "self_attn.k_proj.weight": (spec.num_kv_heads * hd, h),
                       p + "self_attn.v_proj.weight": (spec.num_kv_heads * hd, h),
                       p + "self_attn.o_proj.weight": (h, spec.num_heads * hd),
                       p + "mlp.gate_proj.weight": (spec.intermediate_size, h),
                       p + "mlp.up_proj.weight": (spec.intermediate_size, h),
                       p + "mlp.down_proj.weight": (h, spec.intermediate_size),
                       p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
    shard, size, total, index = {}, 0, 0, {}
    names = list(shapes)
    for n, name in enumerate(names):
        dims = shapes[name]
        t = torch.ones(dims, device=device) if len(dims) == 1 else torch.randn(dims, device=device) * 0.02
        shard[name] = t.to(torch.bfloat16).cpu()
        size += shard[name].numel() * 2
        if size > 4 << 30 or n == len(names) - 1:
            file = f"model-{len(set(index.values())):05d}.safetensors"
            save_file(shard, str(out / file), metadata={"format": "pt"})
            index.update({k: file for k in shard})
            shard, total, size = {}, total + size, 0
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": index}))
    return out


def kv_bytes_per_token(shape: dict, dtype_bytes: int = 2) -> int:
    """K and V of every layer for one token."""
    hd = shape["hidden_size"] // shape["num_heads"]
    return 2 * shape["num_layers"] * shape["num_kv_heads"] * hd * dtype_bytes


def job_spec(data_root: Path, seq_len: int, rows: int, job_id: str, targets: list[str] | None = None,
             chunk_tokens: int | None = None, sequences_per_step: int = 1, steps: int | None = None):
    """A job over `rows` sequences of random numbers, each at least `seq_len` tokens and cut to it, in file
    order. chunk_tokens stays the engine's default unless given."""
    from coserve.engine.finetune.spec import JobSpec
    g = torch.Generator().manual_seed(0)
    lines = [{"text": " ".join(str(int(x)) for x in torch.randint(0, 999, (seq_len,), generator=g))}
             for _ in range(rows)]
    (data_root / f"{job_id}.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    training = {"lr": 1e-4, "max_steps": steps or rows // sequences_per_step, "max_seq_len": seq_len,
                "sequences_per_step": sequences_per_step, "shuffle": False}
    if chunk_tokens is not None:
        training["chunk_tokens"] = chunk_tokens
    return JobSpec.model_validate({"id": job_id, "dataset": {"path": f"{job_id}.jsonl", "format": "text"},
                                   "output": f"out-{job_id}",
                                   "lora": {"r": 16, "alpha": 32, "target_modules": targets or ["q_proj", "v_proj"]},
                                   "training": training})
