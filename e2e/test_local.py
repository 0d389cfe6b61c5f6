"""The README's local playground (`make local` = e2e/local.py): it comes up, the examples apply to it, and
`kubectl get coserve` shows them served and trained; Ctrl-C (SIGINT) stops everything."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import openai

from harness import HERE, kubectl
from test_readme import make_target


def wait_until(kubeconfig, what: str, jsonpath: str, want: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    got = ""
    while time.monotonic() < deadline:
        got = kubectl(kubeconfig, "get", what, "-o", f"jsonpath={jsonpath}", check=False).stdout
        if got == want:
            return
        time.sleep(1)
    raise AssertionError(f"{what} {jsonpath}: {got!r}, never {want!r}")


def test_local_playground_serves_and_trains_the_examples(tmp_path):
    assert make_target("local") == ["$(BIN)/python e2e/local.py"]
    proc = subprocess.Popen([sys.executable, str(HERE / "local.py"), "--dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready."):
                break
        else:
            raise AssertionError("".join(lines)[-3000:])
        kubeconfig = tmp_path / "kube" / "admin.kubeconfig"
        kubectl(kubeconfig, "apply", "-f", "examples/02-endpoint-base.yaml", "-f", "examples/03-finetune-job.yaml",
                "-f", "examples/04-endpoint-follows-job.yaml")
        wait_until(kubeconfig, "inferenceendpoint/llama-base", "{.status.readyReplicasText}", "2/2")
        url, model = kubectl(kubeconfig, "get", "inferenceendpoint/llama-base", "-o",
                             "jsonpath={.status.url} {.status.model}").stdout.split()
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)   # local engines: the URL is an engine's
        out = client.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0)
        client.close()
        assert out.usage.completion_tokens > 0
        wait_until(kubeconfig, "finetunejob/support-bot", "{.status.phase}", "Succeeded")
        wait_until(kubeconfig, "inferenceendpoint/support-bot", '{.status.conditions[?(@.type=="Ready")].status}',
                   "True")
        listed = kubectl(kubeconfig, "get", "coserve", "-o", "json").stdout
        names = {(o["kind"], o["metadata"]["name"]) for o in json.loads(listed)["items"]}
        assert names == {("CoServingPool", "llama-pool"), ("InferenceEndpoint", "llama-base"),
                         ("InferenceEndpoint", "support-bot"), ("FinetuneJob", "support-bot")}
    finally:
        proc.send_signal(signal.SIGINT)   # Ctrl-C
        try:
            assert proc.wait(timeout=120) == 0, proc.stdout.read()[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)   # it and everything it started
