"""On a GPU, finetuning layer units replayed from CUDA graphs train exactly the adapter that eager units train
(the graphs capture the same kernels; this checks the static buffers, the replays and the gradient sums)."""
from __future__ import annotations

import json

import pytest
import torch

from coserve_testlib import make_engine
from coserve.engine.cost_model import CostModel
from coserve.engine.finetune.backward import UnitGraphs
from coserve.engine.finetune.job import FinetuneJob, JobState
from coserve.engine.finetune.manager import build_job
from coserve.engine.finetune.spec import JobSpec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def engine_and_job(model_dir, data_root, graphs: bool, dtype: str, job_id: str, steps: int):
    """A CUDA engine (with or without graphs) at an unbounded target, and an AdamW job over data.jsonl."""
    engine = make_engine(model_dir, data_root=str(data_root), device="cuda", dtype=dtype, cuda_graphs=graphs,
                         fast_path=True, num_kv_blocks=256, tpot_slo_ms=1e6, cost_model=CostModel(0.0, 1e-6, 0.0, 1e-6))
    spec = JobSpec.model_validate({
        "id": job_id, "dataset": {"path": "data.jsonl", "format": "text"}, "output": f"out-{job_id}",
        "lora": {"r": 8, "alpha": 16, "target_modules": TARGETS},
        "training": {"optimizer": "adamw", "lr": 1e-2, "max_steps": steps, "shuffle": False, "seed": 1}})
    return engine, build_job(engine, spec)


def train(model_dir, data_root, graphs: bool, dtype: str) -> tuple[dict, UnitGraphs | None]:
    """The adapter a 4-step job trains, and its unit graphs (None without graphs)."""
    engine, job = engine_and_job(model_dir, data_root, graphs, dtype, f"g{int(graphs)}", 4)
    engine.finetune.add(job)
    graphs = None
    while engine.has_work():
        engine.step()
        graphs = graphs or job.unit_graphs
    assert job.state is JobState.SUCCEEDED, job.error
    return {k: v.detach().clone() for k, v in job.adapter.named_parameters().items()}, graphs


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_graphed_units_train_the_same_adapter_as_eager_units(llama_dir, tmp_path, dtype, tol):
    text = "every finetuning unit recomputes one layer and sends its gradients back " * 3
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps({"text": text}) for _ in range(4)) + "\n")
    eager, none = train(llama_dir, tmp_path, False, dtype)
    graphed, graphs = train(llama_dir, tmp_path, True, dtype)
    assert none is None and graphs.graphs, "the second step's units must have been captured and replayed"
    for name, value in eager.items():
        torch.testing.assert_close(graphed[name], value, rtol=tol, atol=tol)


def test_a_graph_serves_every_start_in_its_bucket_of_past_keys(llama_dir, tmp_path, monkeypatch):
    """Units of 16 positions (starts 0, 16, 32, 48, ...: past-key buckets 0, 16, 32, 64, 64) replay graphs shared
    by several starts and across layers' sequences, and train what exact eager units train."""
    monkeypatch.setattr(FinetuneJob, "unit_span", lambda self, length: 16)
    text = "a long sequence cut into units of sixteen positions, each attending to all before it " * 2
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps({"text": text}) for _ in range(4)) + "\n")
    eager, _ = train(llama_dir, tmp_path, False, "float32")
    graphed, graphs = train(llama_dir, tmp_path, True, "float32")
    buckets = {key[2] for key in graphs.graphs}
    assert len(buckets) >= 4 and graphs.replays >= 3 * graphs.captures, (buckets, graphs.replays, graphs.captures)
    for name, value in eager.items():
        torch.testing.assert_close(graphed[name], value, rtol=1e-5, atol=1e-5)


def test_sequences_of_any_length_replay_the_graphs_of_padded_last_spans(llama_dir, tmp_path, monkeypatch):
    """Sequences of four lengths end in spans of four remainders (most not a power of two); padded to their bucket
    of rows they share graphs of a few shapes and train what exact eager units train."""
    monkeypatch.setattr(FinetuneJob, "unit_span", lambda self, length: 16)
    words = "padded rows add nothing to the gradients of the real ones".split()
    texts = [" ".join(words[:k] * 3) for k in (6, 7, 9, 10)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    eager, _ = train(llama_dir, tmp_path, False, "float32")
    graphed, graphs = train(llama_dir, tmp_path, True, "float32")
    layers = len(eager) // (2 * len(TARGETS))
    rows = {key[1] for key in graphs.graphs}
    assert rows <= {1, 2, 4, 8, 16}, rows
    assert graphs.captures == len(graphs.graphs) and len(graphs.graphs) % layers == 0, "once per shape and layer"
    for name, value in eager.items():   # padded GEMMs sum in another order; AdamW magnifies that for tiny grads
        torch.testing.assert_close(graphed[name], value, rtol=1e-4, atol=1e-4)


def train_beside_inference(model_dir, data_root, graphs: bool) -> tuple[dict, dict]:
    """A job trained while decode requests run in every iteration; counts of its units by how they ran."""
    from coserve.engine.sampling import SamplingParams

    engine, job = engine_and_job(model_dir, data_root, graphs, "float32", f"s{int(graphs)}", 3)
    for i in range(4):
        engine.add_request(f"r{i}", [5 + i, 6, 7], SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    engine.finetune.add(job)
    counts = {"served": 0, "eager": 0, "captured": 0}
    while job.active:
        engine.step()
        s = engine.last_step
        assert s.prefill_tokens or s.decode_tokens, "inference runs in every iteration of this test"
        counts["served"] += s.backward_units
        counts["eager"] += s.eager_units
        counts["captured"] += s.unit_captures
    assert job.state is JobState.SUCCEEDED, job.error
    return {k: v.detach().clone() for k, v in job.adapter.named_parameters().items()}, counts


def test_units_beside_inference_are_captured_and_replayed(llama_dir, tmp_path):
    """Units that share iterations with inference are captured where the iteration has room and replayed after
    (one grid of spans per sequence length), training the adapter that eager units train under the same load."""
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps({"text": "units ride beside decode tokens " * 4})
                                                    for _ in range(3)) + "\n")
    eager, _ = train_beside_inference(llama_dir, tmp_path, False)
    graphed, counts = train_beside_inference(llama_dir, tmp_path, True)
    layers = len(eager) // (2 * len(TARGETS))
    assert counts["captured"] == layers, "one graph per layer: every sequence has the same grid"
    assert counts["eager"] == 3, "only the loss head (one unit a sequence) runs eagerly"
    assert counts["served"] == 3 * (layers + 1)
    for name, value in eager.items():
        torch.testing.assert_close(graphed[name], value, rtol=1e-5, atol=1e-5)


def test_bf16_gradients_on_the_gpu_match_peft_autograd(llama_dir, tmp_path):
    """The fast path (Triton forward, SDPA units, blocked loss, graphs) in bf16 against PEFT's bf16 autograd."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from coserve_testlib import make_peft_adapter, rel_err
    from coserve.engine.lora import read_adapter

    make_peft_adapter(llama_dir, tmp_path / "init", 0, r=8, lora_alpha=16, target_modules=TARGETS)
    text = "the scheduler admits decode tokens first, then prefill chunks, then finetuning work " * 2
    (tmp_path / "data.jsonl").write_text(json.dumps({"text": text}) + "\n")
    engine = make_engine(llama_dir, data_root=str(tmp_path), device="cuda", dtype="bfloat16", fast_path=True,
                         num_kv_blocks=256, tpot_slo_ms=1e6, cost_model=CostModel(0.0, 1e-6, 0.0, 1e-6))
    spec = JobSpec.model_validate({
        "id": "bf16", "dataset": {"path": "data.jsonl", "format": "text"}, "output": "out", "init_from": "init",
        "lora": {"r": 8, "alpha": 16, "target_modules": TARGETS},
        "training": {"optimizer": "sgd", "lr": 1.0, "max_steps": 1, "shuffle": False}})
    job = build_job(engine, spec)
    ids = job.sequences[0].ids
    engine.finetune.add(job)
    while engine.has_work():
        engine.step()
    assert job.state is JobState.SUCCEEDED, job.error
    _, init = read_adapter(tmp_path / "init")
    _, final = read_adapter(tmp_path / "out" / "checkpoint-1")
    ours = torch.cat([(init[m][ab] - final[m][ab]).float().flatten() for m in sorted(init) for ab in "AB"])
    x = torch.tensor([ids], device="cuda")

    def peft_grads(dtype: torch.dtype) -> torch.Tensor:
        base = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=dtype).cuda()
        model = PeftModel.from_pretrained(base, str(tmp_path / "init"), is_trainable=True)
        logits = model(x).logits[0].float()
        torch.nn.functional.cross_entropy(logits[:-1], x[0, 1:]).backward()
        grads = {}
        for name, p in model.named_parameters():
            if "lora_" in name:
                module = name.split("base_model.model.", 1)[1].split(".lora_")[0]
                grads[f"{module}.{'A' if 'lora_A' in name else 'B'}"] = p.grad.float().cpu()
        return torch.cat([grads[f"{m}.{ab}"].flatten() for m in sorted(init) for ab in "AB"])

    exact, peft_bf16 = peft_grads(torch.float32), peft_grads(torch.bfloat16)
    bf16_noise = rel_err(peft_bf16, exact)
    assert rel_err(ours.cpu(), exact) <= 2 * bf16_noise + 1e-2, f"PEFT's own bf16 error is {bf16_noise:.3g}"
