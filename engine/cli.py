"""The `coserve` command."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from coserve.engine.config import EngineConfig
from coserve.engine.logs import FORMATS, configure_logging
from coserve.engine.serving_mode import MODE_HELP, ServingMode

if TYPE_CHECKING:
    import uvicorn


def parse_adapters(values: list[str]) -> dict[str, str]:
    adapters = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise argparse.ArgumentTypeError(f"--adapter expects NAME=PATH, got {v!r}")
        adapters[name] = path
    return adapters


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from coserve.engine.async_engine import AsyncEngine
    from coserve.engine.engine import LLMEngine
    from coserve.engine.paths import resolve_under
    from coserve.engine.server import create_app, load_token

    dtype = None if args.dtype == "auto" else args.dtype
    config = EngineConfig(model=args.model, data_root=args.data_root, device=args.device, dtype=dtype,
                          host=args.host, port=args.port, num_kv_blocks=args.num_kv_blocks,
                          kv_cache_memory=args.kv_cache_memory, max_model_len=args.max_model_len,
                          max_num_seqs=args.max_num_seqs, max_batched_tokens=args.max_batched_tokens,
                          max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                          tpot_slo_ms=args.tpot_slo_ms, idle_iteration_ms=args.idle_iteration_ms,
                          max_finetune_jobs=args.max_finetune_jobs,
                          mode=args.mode, temporal_interval=args.temporal_interval,
                          cuda_graphs=not args.enforce_eager, fast_path=False if args.no_fast_path else None,
                          enable_prefix_caching=not args.no_enable_prefix_caching,
                          overlap_outputs=not args.no_overlap_outputs,
                          async_scheduling=False if args.no_async_scheduling else None,
                          served_model_name=args.served_model_name, shutdown_grace_s=args.shutdown_grace,
                          admin_token=load_token(args.admin_token_file, os.environ.get("COSERVE_ADMIN_TOKEN")),
                          adapters=parse_adapters(args.adapter), max_body_bytes=args.max_body_bytes,
                          max_prompt_chars=args.max_prompt_chars, enable_docs=args.enable_docs)
    engine = LLMEngine(config)
    for name, path in config.adapters.items():
        engine.loras.load(name, resolve_under(config.data_root, path), path, Path(config.data_root).resolve())
    engine.finetune.restore()
    async_engine = AsyncEngine(engine)
    async_engine.start()
    logging.getLogger("coserve").info("serving %s on http://%s:%d", engine.model_name, args.host, args.port)
    # With JSON logs uvicorn gets no log config of its own: its loggers then propagate to our JSON handler.
    uvicorn_logs = {"log_config": None} if args.log_format == "json" else {}
    server_config = uvicorn.Config(create_app(async_engine), host=args.host, port=args.port,
                                   log_level=args.log_level, timeout_graceful_shutdown=args.shutdown_grace,
                                   **uvicorn_logs)
    try:
        _run_server(server_config, engine.finetune.request_stop)
    except KeyboardInterrupt:   # uvicorn re-raises Ctrl-C once it has shut down cleanly
        return 130
    finally:
        async_engine.shutdown()
    return 0


def _run_server(config: "uvicorn.Config", on_signal: Callable[[], object]) -> None:
    """Run uvicorn so that SIGTERM/SIGINT first asks the engine to checkpoint its running jobs, which then
    happens while open connections drain; the app's shutdown waits for it within the grace period."""
    import uvicorn

    class CheckpointingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            on_signal()
            super().handle_exit(sig, frame)

    CheckpointingServer(config).run()


def cmd_demo_model(args: argparse.Namespace) -> int:
    from coserve.engine.demo_model import TinyModelSpec, write_tiny_model

    out = write_tiny_model(args.dir, TinyModelSpec(arch=args.arch, seed=args.seed))
    print(f"wrote a tiny {args.arch} model to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from coserve.engine.demo import run_demo

    return run_demo(Path(args.workdir))


def cmd_operator(args: argparse.Namespace) -> int:
    from coserve.operator.main import run

    run()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coserve", description="Co-serving LLM inference and LoRA finetuning.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the engine: OpenAI-compatible API, admin API and /metrics",
                           description="Load a Hugging Face model directory and serve it over HTTP.")
    serve.add_argument("--model", required=True, help="Hugging Face model directory (config.json + safetensors)")
    serve.add_argument("--data-root", default=".", help="folder that every path in an admin request is under")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--admin-token-file", help="file holding the admin API bearer token "
                                                  "(else COSERVE_ADMIN_TOKEN; neither disables the admin API)")
    serve.add_argument("--device", default="cuda" if _cuda() else "cpu", choices=["cuda", "cpu"])
    serve.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"],
                       help="weights and KV cache dtype (default, or auto: bfloat16 on cuda, float32 on cpu)")
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                       help="load a PEFT LoRA adapter at start (PATH under --data-root); repeatable")
    serve.add_argument("--served-model-name", help="name of the base model in the API (default: folder name)")
    serve.add_argument("--num-kv-blocks", type=int, help="KV cache blocks (default: from --kv-cache-memory)")
    serve.add_argument("--kv-cache-memory", "--gpu-memory-utilization", type=float, default=0.5,
                       help="KV cache size: GiB on cpu, fraction of free GPU memory on cuda (vLLM's "
                            "--gpu-memory-utilization is taken as this fraction)")
    serve.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    serve.add_argument("--max-num-seqs", type=int, default=256, help="requests in one batch at most (co-served "
                                                                       "requests hold a slot longer: keep it high)")
    serve.add_argument("--max-batched-tokens", "--max-num-batched-tokens", type=int, default=512,
                       help="tokens in one iteration at most")
    serve.add_argument("--max-loras", type=int, default=8, help="adapter slots")
    serve.add_argument("--max-lora-rank", type=int, default=128, help="largest adapter rank accepted")
    serve.add_argument("--tpot-slo-ms", type=_positive_ms, default=50.0,
                       help="latency target of one iteration (time per output token); finetuning work fills "
                            "what inference leaves of it")
    serve.add_argument("--idle-iteration-ms", type=_positive_ms, default=200.0,
                       help="what an iteration of finetuning alone plans when no inference waits (fewer, larger "
                            "iterations train faster; a request that arrives waits at most about this long)")
    serve.add_argument("--max-finetune-jobs", type=int, default=2, help="finetuning jobs trained at once")
    serve.add_argument("--mode", default=ServingMode.COSERVE.value, choices=[m.value for m in ServingMode],
                       help="how inference and finetuning share the engine (baselines for comparison): " +
                            "; ".join(f"{m.value}: {text}" for m, text in MODE_HELP.items()))
    serve.add_argument("--temporal-interval", type=_positive_int, default=128, metavar="N",
                       help="--mode temporal: inference iterations between two whole finetuning steps")
    serve.add_argument("--max-body-bytes", type=int, default=16 * 2**20,
                       help="largest request body; larger ones answer 413 before they are read")
    serve.add_argument("--max-prompt-chars", type=int,
                       help="longest prompt in characters, refused before tokenizing "
                            "(default: 8 per token of --max-model-len)")
    serve.add_argument("--enable-docs", action="store_true", help="serve /docs, /redoc and /openapi.json")
    serve.add_argument("--enforce-eager", action="store_true",
                       help="never replay CUDA graphs (debugging; graphs are only used on cuda anyway)")
    serve.add_argument("--no-fast-path", action="store_true",
                       help="serve with the plain-PyTorch twins instead of the Triton kernels (debugging)")
    serve.add_argument("--no-enable-prefix-caching", action="store_true",
                       help="do not reuse cached KV blocks of equal prompt prefixes")
    serve.add_argument("--no-overlap-outputs", action="store_true",
                       help="make each iteration's outputs before the next is launched, not while it runs "
                            "(debugging)")
    serve.add_argument("--no-async-scheduling", action="store_true",
                       help="read each decode iteration's tokens before the next is queued, not one iteration "
                            "later (debugging)")
    serve.add_argument("--shutdown-grace", type=_seconds, default=20.0,
                       help="seconds allowed on SIGTERM/SIGINT to checkpoint running finetuning jobs (and to let "
                            "open requests finish) before the process exits")
    serve.add_argument("--log-level", default="info", help="level of the HTTP server's logs")
    serve.add_argument("--log-format", choices=FORMATS, default="text",
                       help="json: one JSON object per line (ts, level, logger, msg and event fields such as "
                            "event, job_id, request_id, step, sha256, reason, adapter)")
    serve.set_defaults(func=cmd_serve)

    dm = sub.add_parser("demo-model", help="write the embedded tiny model as a Hugging Face directory",
                        description="Build a tiny Llama-family model (random seeded weights, a byte-level BPE "
                                    "tokenizer trained on shipped text) that loads like a real checkpoint.")
    dm.add_argument("dir")
    dm.add_argument("--arch", default="llama", choices=["llama", "qwen2", "mistral"])
    dm.add_argument("--seed", type=int, default=0)
    dm.set_defaults(func=cmd_demo_model)

    demo = sub.add_parser("demo", help="the main job: serve the tiny model while a LoRA job trains beside it",
                          description="Co-serving demo on the embedded tiny model (no downloads): inference "
                                      "requests and a finetuning job share the engine's iterations.")
    demo.add_argument("--workdir", default="coserve-demo", help="where the model, data and adapters go")
    demo.set_defaults(func=cmd_demo)

    op = sub.add_parser("operator", help="run the Kubernetes operator (kopf) for coserve.dev resources",
                        description="Reconciles CoServingPool, InferenceEndpoint and FinetuneJob objects. Settings "
                                    "come from COSERVE_* environment variables (see charts/coserve/values.yaml).")
    op.set_defaults(func=cmd_operator)
    return parser


def _seconds(value: str) -> float:
    seconds = float(value)
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a non-negative number of seconds, got {value!r}")
    return seconds


def _positive_ms(value: str) -> float:
    number = float(value)
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of milliseconds, got {value!r}")
    return number


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "log_format", "text"))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
