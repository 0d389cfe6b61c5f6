"""How coserve slots in where vLLM runs, on a live `coserve serve` started with vLLM's flag names and JSON logs:
the model server protocol metrics parsed from /metrics as the inference gateway's endpoint picker parses them,
vLLM's adapter, tokenize, detokenize and version routes driven with the bodies vLLM's clients send, and the
structured log lines of a job's lifecycle, adapter loads and preemptions."""
from __future__ import annotations

import importlib.metadata
import json
import logging
import threading
import time

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer

from api_app import write_lora
from coserve_testlib import write_task
from server_proc import EngineProcess
from coserve.engine.api.vllm_routes import special_wrap
from coserve.engine.cli import build_parser
from coserve.engine.kv_cache import BlockManager
from coserve.engine.lora import write_adapter
from coserve.engine.logs import JsonFormatter
from coserve.engine.sampling import SamplingParams
from coserve.engine.scheduler import Scheduler
from coserve.engine.sequence import Sequence

TOKEN = "vllm-compat-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_LORAS = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm-compat")


@pytest.fixture(scope="module")
def server(llama_dir, data):
    write_task(data)
    for seed, name in enumerate(("sql", "chat", "spare")):
        write_lora(llama_dir, data / "adapters" / name, seed=seed)
    cfg = json.loads((llama_dir / "config.json").read_text())
    hidden, kv = cfg["hidden_size"], cfg["num_key_value_heads"] * cfg["hidden_size"] // cfg["num_attention_heads"]
    huge = {f"model.layers.{i}.self_attn.{m}": (torch.full((4, hidden), 1e30), torch.full((out, 4), 1e30))
            for i in range(cfg["num_hidden_layers"]) for m, out in (("q_proj", hidden), ("v_proj", kv))}
    write_adapter(data / "huge", huge, 4, 8, str(llama_dir))   # finite weights whose loss overflows
    proc = EngineProcess(llama_dir, data, TOKEN, "--num-kv-blocks", "128", "--max-model-len", "512",
                         "--max-num-seqs", "1", "--max-loras", str(MAX_LORAS), "--max-lora-rank", "16",
                         "--max-num-batched-tokens", "256", "--tpot-slo-ms", "200", "--log-format", "json")
    yield proc
    proc.stop()


def post(server, path: str, body: dict, headers: dict | None = AUTH) -> httpx.Response:
    """JSON with ASCII escapes, so a lone surrogate travels as `\\ud800`, as a JSON client may send it."""
    return httpx.post(server.url + path, content=json.dumps(body),
                      headers={**(headers or {}), "content-type": "application/json"}, timeout=60)


def assert_error(r: httpx.Response, status: int, param: str | None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status and err["param"] == param
    return err["message"]


def picker_view(server) -> dict:
    """What the endpoint picker takes from a scrape with its default (vLLM) metric names: the first series of
    each gauge, and of the LoRA info the series with the largest value that has adapters in its labels."""
    text = httpx.get(server.url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    gauge = {name: families[name].samples[0].value for name in
             ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
              "vllm:gpu_cache_usage_perc")}
    assert all(families[n].type == "gauge" for n in gauge)
    lora = [s for s in families["vllm:lora_requests_info"].samples
            if s.labels["running_lora_adapters"] or s.labels["waiting_lora_adapters"]]
    latest = max(lora, key=lambda s: s.value).labels if lora else None
    cache = families["vllm:cache_config_info"].samples[0].labels

    def names(csv: str) -> list[str]:
        return [n for n in csv.split(",") if n]
    return {**gauge, "max_lora": int(latest["max_lora"]) if latest else None,
            "running_adapters": names(latest["running_lora_adapters"]) if latest else [],
            "waiting_adapters": names(latest["waiting_lora_adapters"]) if latest else [],
            "block_size": int(cache["block_size"]), "num_gpu_blocks": int(cache["num_gpu_blocks"])}


def wait_for(check, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_vllm_flag_names_are_aliases_of_ours():
    args = build_parser().parse_args(
        ["serve", "--model", "m", "--max-model-len", "2048", "--max-num-seqs", "32", "--max-loras", "3",
         "--max-lora-rank", "32", "--served-model-name", "base", "--gpu-memory-utilization", "0.85",
         "--max-num-batched-tokens", "1024", "--dtype", "auto"])
    assert (args.max_model_len, args.max_num_seqs, args.max_loras, args.max_lora_rank, args.served_model_name,
            args.kv_cache_memory, args.max_batched_tokens, args.dtype) == (2048, 32, 3, 32, "base", 0.85, 1024,
                                                                           "auto")
    assert build_parser().parse_args(["serve", "--model", "m"]).log_format == "text"


def test_load_and_unload_lora_adapter_as_vllm_clients_call_them(server, data):
    cap = httpx.get(server.url + "/admin/capacity", headers=AUTH).json()
    assert (cap["adapter_slots_total"], cap["max_lora_rank"], cap["max_model_len"]) == (MAX_LORAS, 16, 512)
    # the inference gateway's LoRA syncer: an absolute path and the base model's name; AIBrix: a relative path
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": str(data / "adapters" / "sql"),
                                               "base_model_name": "tiny"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain") and "sql" in r.text
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "chat", "lora_path": "adapters/chat"})
    assert r.status_code == 200, r.text
    models = {m["id"]: m for m in httpx.get(server.url + "/v1/models").json()["data"]}
    assert {k: (m["parent"], m["root"]) for k, m in models.items()} == {
        "tiny": (None, "tiny"), "sql": ("tiny", "sql"), "chat": ("tiny", "chat")}
    assert all(str(data) not in json.dumps(m) for m in models.values())
    r = post(server, "/v1/completions", {"model": "sql", "prompt": "SELECT", "max_tokens": 2}, headers=None)
    assert r.status_code == 200 and r.json()["model"] == "sql"
    loaded = httpx.get(server.url + "/admin/adapters/sql", headers=AUTH).json()
    assert loaded["path"] == "adapters/sql", "shown relative to the data root"

    assert_error(post(server, "/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": "adapters/chat"}),
                 400, "lora_name")
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": "adapters/chat", "load_inplace": True})
    assert r.status_code == 200 and httpx.get(server.url + "/admin/adapters/sql", headers=AUTH).json()["path"] == \
        "adapters/chat"

    r = post(server, "/v1/unload_lora_adapter", {"lora_name": "sql"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "sql" not in [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]
    assert_error(post(server, "/v1/unload_lora_adapter", {"lora_name": "sql"}), 404, "lora_name")


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/load_lora_adapter", {"lora_path": "adapters/sql"}, 400, "lora_name"),
    ("/v1/load_lora_adapter", {"lora_name": "x"}, 400, "lora_path"),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": ""}, 400, "lora_path"),
    ("/v1/load_lora_adapter", {"lora_name": "-x", "lora_path": "adapters/sql"}, 400, "lora_name"),
    ("/v1/load_lora_adapter", {"lora_name": "tiny", "lora_path": "adapters/sql"}, 400, "lora_name"),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "../outside"}, 400, "lora_path"),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/etc"}, 400, "lora_path"),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "adapters/none"}, 404, "lora_path"),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "task.jsonl"}, 404, "lora_path"),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "adapters"}, 400, "lora_path"),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "adapters/sql", "load_inplace": "maybe"}, 400,
     "load_inplace"),
    ("/v1/unload_lora_adapter", {}, 400, "lora_name"),
    ("/v1/unload_lora_adapter", {"lora_name": 7}, 400, "lora_name"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400, "prompt"),
    ("/tokenize", {"model": "tiny"}, 400, "prompt"),
    ("/tokenize", {"prompt": "a", "model": "nope"}, 404, "model"),
    ("/tokenize", {"prompt": "a" * 5000}, 400, "prompt"),
    ("/tokenize", {"messages": []}, 400, "messages"),
    ("/tokenize", {"messages": [{"role": "wizard", "content": "b"}]}, 400, "messages.0.role"),
    ("/tokenize", {"prompt": "a\ud800"}, 400, "prompt"),
    ("/detokenize", {"tokens": [1, -1]}, 400, "tokens"),
    ("/detokenize", {"tokens": [10 ** 30]}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
])
def test_bad_vllm_requests_answer_4xx_naming_the_field(server, path, body, status, param):
    assert_error(post(server, path, body), status, param)


def test_adapter_routes_check_the_token_before_the_body(server):
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        for headers in (None, {"Authorization": "Bearer wrong"}):
            for content in (b"{not json", b'{"unknown": 1}', b""):
                r = httpx.post(server.url + path, content=content,
                               headers={**(headers or {}), "content-type": "application/json"})
                message = assert_error(r, 401, None)
                assert "lora" not in message


def test_tokenize_and_detokenize_agree_with_generation(server, llama_dir):
    tok = AutoTokenizer.from_pretrained(llama_dir)
    prompt = "Monday, Tuesday, Wednesday"
    r = post(server, "/tokenize", {"model": "tiny", "prompt": prompt}, headers=None)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["tokens"] == tok(prompt, add_special_tokens=False).input_ids
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == 512
    completion = post(server, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 1}, None).json()
    assert completion["usage"]["prompt_tokens"] == out["count"]
    special = post(server, "/tokenize", {"prompt": prompt, "add_special_tokens": True, "return_token_strs": True},
                   headers=None).json()
    assert special["tokens"] == tok(prompt, add_special_tokens=True).input_ids
    assert special["token_strs"] == tok.convert_ids_to_tokens(special["tokens"])

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tell me a joke"}]
    chat = post(server, "/tokenize", {"model": "tiny", "messages": messages}, headers=None).json()
    answer = post(server, "/v1/chat/completions", {"model": "tiny", "messages": messages, "max_tokens": 1}, None)
    assert chat["count"] == answer.json()["usage"]["prompt_tokens"]
    def rendered(generation_prompt: bool) -> list[int]:
        text = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
        return tok(text, add_special_tokens=False).input_ids

    assert chat["tokens"] == rendered(True)
    bare = post(server, "/tokenize", {"messages": messages, "add_generation_prompt": False}, headers=None).json()
    assert bare["tokens"] == rendered(False)
    assert bare["count"] < chat["count"]

    r = post(server, "/detokenize", {"model": "tiny", "tokens": out["tokens"]}, headers=None)
    assert r.status_code == 200 and r.json() == {"prompt": prompt}
    assert httpx.get(server.url + "/version").json() == {"version": importlib.metadata.version("coserve")}


def test_picker_metrics_with_a_running_and_a_waiting_lora_request(server):
    for name in ("chat", "spare"):
        assert post(server, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": f"adapters/{name}",
                                                      "load_inplace": True}).status_code == 200
    idle = picker_view(server)
    assert (idle["vllm:num_requests_running"], idle["vllm:num_requests_waiting"]) == (0, 0)
    assert idle["max_lora"] == MAX_LORAS and idle["running_adapters"] == ["chat", "spare"]
    assert idle["waiting_adapters"] == [] and idle["vllm:kv_cache_usage_perc"] == 0.0
    assert (idle["block_size"], idle["num_gpu_blocks"]) == (16, 128)

    streaming = threading.Event()
    stop = threading.Event()

    def long_stream() -> None:   # holds the engine's only batch slot (--max-num-seqs 1) until told to stop
        body = {"model": "chat", "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            for _ in r.iter_lines():
                streaming.set()
                if stop.is_set():
                    return

    def queued() -> None:
        post(server, "/v1/completions", {"model": "spare", "prompt": "hello", "max_tokens": 2}, headers=None)

    runner = threading.Thread(target=long_stream)
    runner.start()
    assert streaming.wait(30)
    waiter = threading.Thread(target=queued)
    waiter.start()
    try:
        busy = wait_for(lambda: (v := picker_view(server))["vllm:num_requests_waiting"] == 1 and v)
        assert busy, "the second request was meant to wait for the batch slot"
        assert busy["vllm:num_requests_running"] == 1
        assert busy["running_adapters"] == ["chat", "spare"] and busy["waiting_adapters"] == ["spare"]
        assert 0 < busy["vllm:kv_cache_usage_perc"] == busy["vllm:gpu_cache_usage_perc"] <= 1
    finally:
        stop.set()
        runner.join(60)
        waiter.join(60)
    done = wait_for(lambda: (v := picker_view(server))["vllm:num_requests_running"] == 0 and v)
    assert done and done["waiting_adapters"] == [] and done["vllm:num_requests_waiting"] == 0


def events(server) -> list[dict]:
    """Every line the engine logged is a JSON object; those that carry an event."""
    lines = [json.loads(line) for line in server.log.read_text().splitlines() if line.strip()]
    assert all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    return [line for line in lines if "event" in line]


def test_json_logs_tell_a_jobs_lifecycle_and_adapter_loads(server):
    body = {"id": "teach", "dataset": {"path": "task.jsonl", "format": "prompt_completion"},
            "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            "training": {"lr": 0.01, "max_steps": 4, "chunk_tokens": 8}, "output": "adapters/teach",
            "checkpoint_every": 2}
    assert post(server, "/admin/finetune/jobs", body).status_code == 201
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "logged", "lora_path": "adapters/spare"}).status_code \
        == 200
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "logged"}).status_code == 200
    failing = {**body, "id": "blows-up", "output": "adapters/blows-up", "init_from": "huge"}
    assert post(server, "/admin/finetune/jobs", failing).status_code == 201
    job = wait_for(lambda: (j := httpx.get(server.url + "/admin/finetune/jobs/teach", headers=AUTH).json())
                   ["state"] == "succeeded" and j)
    assert job, "the job did not finish"
    assert wait_for(lambda: httpx.get(server.url + "/admin/finetune/jobs/blows-up", headers=AUTH).json()["state"]
                    == "failed")
    lines = wait_for(lambda: (e := events(server)) and any(x.get("event") == "job_failed" for x in e) and e, 10)

    teach = [(e["event"], e.get("step"), e.get("sha256")) for e in lines if e.get("job_id") == "teach"]
    sums = {c["step"]: c["sha256"] for c in job["checkpoints"]}
    assert teach == [("job_created", 0, None), ("job_started", 0, None), ("job_checkpoint", 2, sums[2]),
                     ("job_checkpoint", 4, sums[4]), ("job_finished", 4, None)]
    failed = [e for e in lines if e.get("job_id") == "blows-up" and e["event"] == "job_failed"]
    assert len(failed) == 1 and failed[0]["level"] == "WARNING" and "loss is nan" in failed[0]["reason"]
    assert failed[0]["state"] == "failed"

    adapters = [(e["event"], e.get("path")) for e in lines if e.get("adapter") == "logged"]
    assert adapters == [("adapter_loaded", "adapters/spare"), ("adapter_unloaded", "adapters/spare")]
    assert all(not e.get("path", "").startswith("/") for e in lines)


def test_a_preemption_logs_one_event_naming_the_request(caplog):
    sched = Scheduler(BlockManager(2, 4), max_num_seqs=4, max_batched_tokens=16)
    a, b = (Sequence(rid, [1, 2, 3, 4], SamplingParams(max_tokens=4)) for rid in ("a", "b"))
    sched.add(a)
    sched.add(b)
    with caplog.at_level(logging.INFO, logger="coserve.scheduler"):
        for chunk in sched.schedule():
            chunk.seq.num_computed += chunk.length
            chunk.seq.output_ids.append(7)   # each sampled a token: both need a second block, one is free
        sched.schedule()
    preempted = [r for r in caplog.records if getattr(r, "event", None) == "request_preempted"]
    assert len(preempted) == 1 and b.num_preemptions == 1
    line = json.loads(JsonFormatter().format(preempted[0]))
    assert line["request_id"] == "b" and line["reason"] and line["logger"] == "coserve.scheduler"


def test_add_special_tokens_wraps_a_chat_prompt_as_the_tokenizer_wraps_text(llama_dir):
    tok = AutoTokenizer.from_pretrained(llama_dir)
    bos, eos = tok.bos_token, tok.eos_token
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tok.convert_tokens_to_ids(bos)),
                                                   (eos, tok.convert_tokens_to_ids(eos))])
    before, after = special_wrap(tok)
    assert (before, after) == ([tok.bos_token_id], [tok.eos_token_id])
    text = "<|im_start|>user\nhello there<|im_end|>\n"
    assert before + tok(text, add_special_tokens=False).input_ids + after == tok(text).input_ids
