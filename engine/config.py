"""The engine's settings, in one place (the CLI and tests fill it)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineConfig:
    model: str
    data_root: str = "."
    device: str = "cpu"
    dtype: str | None = None            # default: bfloat16 on cuda, float32 on cpu
    block_size: int = 16
    num_kv_blocks: int | None = None    # default: from kv_cache_memory
    kv_cache_memory: float = 0.5        # GiB on cpu; fraction of free memory on cuda
    max_model_len: int | None = None    # default: the model's max_position_embeddings, capped by the cache
    max_num_seqs: int = 256             # batch slots (vLLM's default); co-served iterations run toward the TPOT
                                        # target, so a request holds its slot longer than with inference alone
    max_batched_tokens: int = 512
    max_loras: int = 8
    max_lora_rank: int = 128
    tpot_slo_ms: float = 50.0           # latency target of one iteration; finetuning fills what inference leaves
    idle_iteration_ms: float = 200.0    # what an iteration of finetuning alone plans (no inference waits): a request
                                        # that arrives waits at most about this long for its first iteration
    max_finetune_jobs: int = 2          # jobs trained at once; more wait queued
    finetune_kv_reserve: float = 0.1    # fraction of KV blocks finetuning never takes
    mode: str = "coserve"               # coserve | temporal | inference-only | finetune-only (serving_mode.py)
    temporal_interval: int = 128        # temporal mode: inference iterations between whole finetuning steps
    fast_path: bool | None = None       # Triton kernels; default: on for cuda (off on cpu: the twins serve there)
    cuda_graphs: bool = True            # decode iterations replay captured CUDA graphs (cuda only)
    overlap_outputs: bool = True        # a step makes the previous iteration's outputs while this one runs
    async_scheduling: bool | None = None  # steady decode queues the next iteration before reading this one's
                                          # tokens; default: on with CUDA graphs on cuda
    enable_prefix_caching: bool = True  # requests sharing a prompt prefix (same adapter) reuse its KV blocks
    shutdown_grace_s: float = 20.0      # on SIGTERM/SIGINT, time allowed to checkpoint running jobs
    host: str = "127.0.0.1"
    port: int = 8000
    admin_token: str | None = None
    served_model_name: str | None = None
    adapters: dict[str, str] = field(default_factory=dict)   # name -> path under data_root
    max_body_bytes: int = 16 * 2**20    # larger request bodies answer 413 before they are parsed
    max_prompt_chars: int | None = None  # default: 8 characters per token of max_model_len, checked before tokenizing
    enable_docs: bool = False           # serve /docs, /redoc and /openapi.json

    @property
    def use_fast_path(self) -> bool:
        return self.fast_path if self.fast_path is not None else self.device.startswith("cuda")

    @property
    def torch_dtype_name(self) -> str:
        return self.dtype or ("bfloat16" if self.device.startswith("cuda") else "float32")
