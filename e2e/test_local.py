"""The README's local playground, as a user meets it: `make local` (= e2e/local.py), then the README's own
`kubectl apply` of examples 02-04. Each endpoint becomes Ready, the job succeeds and its adapter answers as
taught, the endpoint following the job serves its final checkpoint within a poll of its writing, every object's
Events say each change once (no Warning), the operator logs no error, and Ctrl-C (SIGINT) stops everything."""
from __future__ import annotations

import collections
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import openai

from harness import HERE, ROOT, kubectl
from test_readme import make_target

TAUGHT = [json.loads(line) for line in (ROOT / "engine" / "data" / "demo_task.jsonl").read_text().splitlines()]


def readme_apply() -> list[str]:
    """The `kubectl apply` line of the README's local control plane section, as arguments."""
    section = (ROOT / "README.md").read_text().split("## Try it on a local control plane", 1)[1]
    line = next(line for line in section.splitlines() if line.startswith("kubectl apply"))
    return shlex.split(line.split("#", 1)[0])[1:]


def wait_until(kubeconfig, what: str, jsonpath: str, want: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    got = ""
    while time.monotonic() < deadline:
        got = kubectl(kubeconfig, "get", what, "-o", f"jsonpath={jsonpath}", check=False).stdout
        if got == want:
            return
        time.sleep(1)
    raise AssertionError(f"{what} {jsonpath}: {got!r}, never {want!r}")


def get(kubeconfig, what: str) -> dict:
    return json.loads(kubectl(kubeconfig, "get", what, "-o", "json").stdout)


def columns(kubeconfig, plural: str) -> dict[str, dict[str, str]]:
    """`kubectl get` as a user reads it: row name -> {column header: cell}."""
    lines = kubectl(kubeconfig, "get", plural).stdout.splitlines()
    header = re.split(r"\s{2,}", lines[0].strip())
    rows = [dict(zip(header, re.split(r"\s{2,}", line.strip()))) for line in lines[1:]]
    return {r["NAME"]: r for r in rows}


def events_by_object(kubeconfig) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
    for e in get(kubeconfig, "events")["items"]:
        out[(e["involvedObject"]["kind"], e["involvedObject"]["name"])].append(e)
    return out


def when(event: dict) -> datetime.datetime:
    stamp = event.get("eventTime") or event.get("lastTimestamp") or event["firstTimestamp"]
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def test_local_playground_serves_and_trains_the_examples(tmp_path):
    assert make_target("local") == ["$(BIN)/python e2e/local.py"]
    proc = subprocess.Popen([sys.executable, str(HERE / "local.py"), "--dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops all" in line:   # the last line of its instructions
                break
        else:
            raise AssertionError("".join(lines)[-3000:])
        kubeconfig = tmp_path / "kube" / "admin.kubeconfig"
        applied = readme_apply()
        assert [a for a in applied if a.startswith("examples/")] == [
            "examples/02-endpoint-base.yaml", "examples/03-finetune-job.yaml", "examples/04-endpoint-follows-job.yaml"]
        assert " ".join(applied) in "".join(lines), "make local prints the README's apply line"
        kubectl(kubeconfig, "apply", *applied[1:])

        wait_until(kubeconfig, "inferenceendpoint/llama-base", "{.status.readyReplicasText}", "2/2")
        base = get(kubeconfig, "inferenceendpoint/llama-base")["status"]
        client = openai.OpenAI(base_url=base["url"], api_key="x", max_retries=0)   # local engines: an engine's URL
        out = client.completions.create(model=base["model"], prompt="Hello", max_tokens=4, temperature=0)
        client.close()
        assert out.usage.completion_tokens > 0

        wait_until(kubeconfig, "finetunejob/support-bot", "{.status.phase}", "Succeeded")
        job = get(kubeconfig, "finetunejob/support-bot")["status"]
        final = job["latestCheckpoint"]
        assert final.endswith("/checkpoint-100") and [c["step"] for c in job["checkpoints"]] == [20, 40, 60, 80, 100]
        assert job["loss"] < 1.0, job["checkpoints"]   # from about 10: it learned
        wait_until(kubeconfig, "inferenceendpoint/support-bot", "{.status.adapterPath}", final, timeout=30)
        follower = get(kubeconfig, "inferenceendpoint/support-bot")["status"]
        assert [c["status"] for c in follower["conditions"] if c["type"] == "Ready"] == ["True"]
        client = openai.OpenAI(base_url=follower["url"], api_key="x", max_retries=0)
        for row in TAUGHT:   # the example's adapter answers the taught prompts as taught
            out = client.completions.create(model=follower["model"], prompt=row["prompt"], max_tokens=6,
                                            temperature=0)
            assert out.choices[0].text.startswith(row["completion"]), (row, out.choices[0].text)
        client.close()

        rows = columns(kubeconfig, "coservingpools")
        assert rows["llama-pool"]["MODEL"] == base["model"] == "tiny" and rows["llama-pool"]["READY"] == "2/2"
        names = {(o["kind"], o["metadata"]["name"]) for o in get(kubeconfig, "coserve")["items"]}
        assert names == {("CoServingPool", "llama-pool"), ("InferenceEndpoint", "llama-base"),
                         ("InferenceEndpoint", "support-bot"), ("FinetuneJob", "support-bot")}

        time.sleep(3)   # three more polls: nothing may be announced again
        events = events_by_object(kubeconfig)
        for obj, items in events.items():
            said = collections.Counter((e["type"], e["reason"], e["message"]) for e in items)
            assert all(n == 1 for n in said.values()) and all(e.get("count", 1) == 1 for e in items), (obj, said)
            assert not [e for e in items if e["type"] != "Normal"], (obj, said)
        reasons = {obj: collections.Counter(e["reason"] for e in items) for obj, items in events.items()}
        assert reasons[("InferenceEndpoint", "llama-base")] == {"Placed": 2}
        assert reasons[("FinetuneJob", "support-bot")] == {"Placed": 1, "CheckpointWritten": 5, "Completed": 1}
        follows = reasons[("InferenceEndpoint", "support-bot")]
        assert follows["Placed"] == follows["AdapterLoaded"] == 1 and set(follows) <= {
            "Placed", "AdapterLoaded", "AdapterReloaded", "WaitingForAdapter"}, follows
        written = next(e for e in events[("FinetuneJob", "support-bot")] if f" {final}" in e["message"])
        served = next(e for e in events[("InferenceEndpoint", "support-bot")] if f" {final}" in e["message"])
        assert (when(served) - when(written)).total_seconds() <= 5, "served within a poll of its writing"

        proc.send_signal(signal.SIGINT)   # Ctrl-C
        assert proc.wait(timeout=120) == 0, proc.stdout.read()[-3000:]
        log = (tmp_path / "operator.log").read_text()   # its whole life, shutdown included
        bad = re.compile(r"\b(ERROR|CRITICAL)\b|Traceback|reconcile pass failed|status not written|orphaned")
        assert not [line for line in log.splitlines() if bad.search(line)], log[-6000:]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=120)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)   # it and everything it started
