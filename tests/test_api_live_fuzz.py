"""A live `coserve serve` process fuzzed from its own OpenAPI schema (schemathesis, valid and invalid inputs,
a fixed derandomized budget): no answer is a 5xx, every 4xx has OpenAI's error shape, and the server is healthy
afterwards. Plus the limits that need real sockets: /health answers while a huge prompt is tokenized, and
bodies over the limit (declared or chunked) are refused with 413."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from coserve_testlib import write_task
from server_proc import EngineProcess

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES_PER_OPERATION = 25
BODY_LIMIT = 4 << 20


@pytest.fixture(scope="module")
def server(llama_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("fuzz")
    write_task(data)
    proc = EngineProcess(llama_dir, data, TOKEN, "--num-kv-blocks", "32", "--max-model-len", "64",
                         "--enable-docs", "--max-body-bytes", str(BODY_LIMIT), "--max-prompt-chars", "4000000")
    yield proc
    proc.stop()


def check_answer(response) -> None:
    request = response.request
    sent = getattr(request, "body", None) or getattr(request, "content", b"")
    assert response.status_code < 500, (request.method, str(request.url), sent, response.content[:500])
    if response.status_code >= 400:
        err = json.loads(response.content)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == response.status_code


def reaching_the_engine(case):
    """Valid bodies name the served model and an existing dataset, so they get past the lookups and are run."""
    if isinstance(case.body, dict):
        if case.path.startswith("/v1/"):
            case.body = {**case.body, "model": "tiny"}
        elif case.path == "/admin/finetune/jobs" and isinstance(case.body.get("dataset"), dict):
            case.body = {**case.body, "dataset": {**case.body["dataset"], "path": "task.jsonl"}}
    return case


def test_fuzzed_requests_never_answer_5xx(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/admin/finetune/jobs",
                                              "/admin/adapters/{name}"}
    called = []
    for op in operations:
        valid = op.as_strategy(GenerationMode.POSITIVE).map(reaching_the_engine)
        cases = st.one_of(valid, op.as_strategy(GenerationMode.NEGATIVE))

        @settings(max_examples=EXAMPLES_PER_OPERATION, derandomize=True, database=None, deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=cases)
        def check(case) -> None:
            response = case.call(base_url=server.url, headers=AUTH, timeout=60)
            called.append((op.method, op.path, response.status_code))
            check_answer(response)

        check()
    assert len(called) >= 5 * len(operations)
    assert sum(path.startswith("/v1/") and status == 200 for _, path, status in called) >= 5, "fuzzing ran the model"
    assert server.alive()
    assert httpx.get(server.url + "/health").status_code == 200
    for job in httpx.get(server.url + "/admin/finetune/jobs", headers=AUTH).json()["jobs"]:
        check_answer(httpx.delete(f"{server.url}/admin/finetune/jobs/{job['id']}", headers=AUTH))
    ok = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 4})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_health_answers_while_a_huge_prompt_is_tokenized(server):
    prompt = "the quick brown fox jumps over the lazy dog " * 60000   # 2.6 M characters, seconds to tokenize
    latencies = []
    with ThreadPoolExecutor(1) as pool:
        big = pool.submit(httpx.post, server.url + "/v1/completions", json={"model": "tiny", "prompt": prompt},
                          timeout=120)
        while not big.done():
            start = time.monotonic()
            assert httpx.get(server.url + "/health", timeout=30).status_code == 200
            latencies.append(time.monotonic() - start)
            time.sleep(0.05)
        answer = big.result()
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "prompt"
    assert "tokens" in answer.json()["error"]["message"], "refused after tokenizing, for its token count"
    assert len(latencies) >= 4, "the prompt was tokenized while /health was asked"
    assert max(latencies) < 1.0, latencies


def test_bodies_over_the_limit_answer_413(server):
    def chunks():   # no Content-Length: counted as it arrives
        for _ in range(BODY_LIMIT // 4096):
            yield b" " * 4096
        yield b"  "

    json_body = {"content-type": "application/json"}
    for content in (chunks(), b" " * (2 * BODY_LIMIT)):
        r = httpx.post(server.url + "/v1/completions", content=content, headers=json_body, timeout=60)
        assert r.status_code == 413 and r.json()["error"]["code"] == 413
    assert httpx.get(server.url + "/health").status_code == 200
