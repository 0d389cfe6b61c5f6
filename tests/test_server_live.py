"""A live `coserve serve` process on loopback, driven by the official `openai` client and raw HTTP:
completions, chat, streaming, adapters in parallel, admin API, metrics, disconnects and bad input."""
from __future__ import annotations

import json
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from server_proc import EngineProcess
from coserve_testlib import ADAPTERS, make_peft_adapter

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(llama_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    for seed, name in enumerate(["qv-r4", "attn-r8"]):
        make_peft_adapter(llama_dir, data / "adapters" / name, seed, **ADAPTERS[name])
    shutil.copytree(llama_dir, data / "model")
    proc = EngineProcess(llama_dir, data, TOKEN, "--num-kv-blocks", "64", "--max-model-len", "512")
    for name in ("qv-r4", "attn-r8"):
        r = httpx.put(f"{proc.url}/admin/adapters/{name}", json={"path": f"adapters/{name}"}, headers=AUTH)
        assert r.status_code == 200, r.text
    yield proc
    proc.stop()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_models_list_base_and_adapters(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny", "attn-r8", "qv-r4"]


def test_completion_non_streaming_and_streaming_agree(client):
    args = dict(prompt="Hello, world! How", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(model="tiny", **args)
    assert full.usage.completion_tokens == 12 and full.choices[0].finish_reason == "length"
    assert full.usage.prompt_tokens > 0
    chunks = list(client.completions.create(model="tiny", stream=True, **args))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_completion_uses_the_chat_template(client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tell me a joke"}]
    out = client.chat.completions.create(model="qv-r4", messages=msgs, max_tokens=8, temperature=0,
                                         logprobs=True, extra_body={"ignore_eos": True})
    assert out.choices[0].message.role == "assistant" and out.usage.completion_tokens == 8
    assert len(out.choices[0].logprobs.content) == 8
    stream = client.chat.completions.create(model="qv-r4", messages=msgs, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == out.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 8


def test_two_adapters_and_base_in_parallel_match_their_solo_answers(client):
    jobs = [(m, p) for m in ("tiny", "qv-r4", "attn-r8") for p in ("One, two, three", "The quick brown fox")]

    def ask(job):
        m, p = job
        return client.completions.create(model=m, prompt=p, max_tokens=10, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text

    solo = [ask(j) for j in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        parallel = list(pool.map(ask, jobs))
    assert parallel == solo
    assert len({solo[0], solo[2], solo[4]}) == 3, "each adapter changes the output"


def test_seeded_sampling_is_reproducible_over_http(client):
    args = dict(model="tiny", prompt="Monday, Tuesday", max_tokens=10, temperature=1.0, seed=11)
    assert client.completions.create(**args).choices[0].text == client.completions.create(**args).choices[0].text


def test_admin_api_requires_the_token_and_stays_under_the_data_root(server):
    assert httpx.get(server.url + "/admin/capacity").status_code == 401
    assert httpx.get(server.url + "/admin/capacity", headers={"Authorization": "Bearer nope"}).status_code == 401
    cap = httpx.get(server.url + "/admin/capacity", headers=AUTH).json()
    assert cap["kv_blocks_total"] == 64 and cap["adapter_slots_free"] == cap["adapter_slots_total"] - 2
    for path in ("../escape", "/etc", "adapters/../../x"):
        r = httpx.put(server.url + "/admin/adapters/x", json={"path": path}, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["param"] == "path", path
    r = httpx.put(server.url + "/admin/adapters/x", json={"path": "adapters/none"}, headers=AUTH)
    assert r.status_code == 404
    r = httpx.put(server.url + "/admin/adapters/x", json={"path": "model"}, headers=AUTH)
    assert r.status_code == 400 and "adapter_config.json" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/admin/adapters/x", headers=AUTH).status_code == 404
    assert httpx.delete(server.url + "/admin/adapters/x", headers=AUTH).status_code == 404


def test_unload_and_reload_an_adapter(server, client):
    r = httpx.put(server.url + "/admin/adapters/temp", json={"path": "adapters/qv-r4"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["rank"] == 4
    assert "temp" in [m.id for m in client.models.list().data]
    assert httpx.delete(server.url + "/admin/adapters/temp", headers=AUTH).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="temp", prompt="hi", max_tokens=2)


@pytest.mark.parametrize("body, param", [
    ({"model": "nope", "prompt": "hi"}, "model"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "temperature": -1}, "temperature"),
    ({"model": "tiny", "prompt": "word " * 600}, "prompt"),
    ({"model": "tiny", "prompt": ""}, "prompt"),
    ({"model": "tiny"}, "prompt"),
    ({"model": "tiny", "prompt": "hi", "n": 3}, "n"),
    ({"model": "tiny", "prompt": ["a", "b"]}, "prompt"),
])
def test_bad_completion_requests_get_4xx_naming_the_field(server, body, param):
    r = httpx.post(server.url + "/v1/completions", json=body)
    assert 400 <= r.status_code < 500
    err = r.json()["error"]
    assert err["param"] == param and err["message"]
    assert server.alive()


def test_bad_chat_requests_and_malformed_json(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages.0.role")
    r = httpx.post(server.url + "/v1/completions", content=b'{"model": "tiny", "prompt": ',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    ok = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200


def wait_idle(server, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        cap = httpx.get(server.url + "/admin/capacity", headers=AUTH).json()
        if cap["running"] == 0 and cap["waiting"] == 0 or time.monotonic() > deadline:
            return cap


def counter(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def test_client_disconnect_aborts_and_frees_kv_blocks(server):
    body = json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 500, "ignore_eos": True,
                       "stream": True}).encode()
    for streaming in (True, False):
        aborted = counter(server, 'coserve_requests_total{reason="abort"}')
        finished = counter(server, 'coserve_requests_total{reason="length"}')
        payload = body if streaming else body.replace(b'"stream": true', b'"stream": false')
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        if streaming:
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        else:
            time.sleep(0.1)
        sock.close()
        cap = wait_idle(server)
        assert cap["running"] == 0 and cap["kv_blocks_free"] == cap["kv_blocks_total"]
        assert counter(server, 'coserve_requests_total{reason="abort"}') == aborted + 1
        assert counter(server, 'coserve_requests_total{reason="length"}') == finished


def test_metrics_expose_latency_histograms_and_usage(server, client):
    client.completions.create(model="tiny", prompt="Hello", max_tokens=4)
    text = httpx.get(server.url + "/metrics").text
    for name in ("coserve_time_to_first_token_seconds_bucket", "coserve_time_per_output_token_seconds_bucket",
                 'coserve_tokens_total{kind="generation"}', "coserve_requests_running",
                 "coserve_requests_waiting", "coserve_kv_cache_usage_ratio"):
        assert name in text, name


def test_health_and_ready(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").json()["model"] == "tiny"
