"""The per-object reconcile loop (operator/loops.py): an error of any pass becomes a condition and one Warning
(not a retry storm), a standing state is announced once, a recovered object says so once, and an endpoint
following a job is woken by the job's new checkpoint rather than by its next poll."""
from __future__ import annotations

import asyncio
import logging

from coserve.operator import loops
from coserve.operator.conditions import set_condition

LOG = logging.getLogger("test")


class Stopped:
    """kopf's daemon flag as the loop uses it: falsy until set, and awaitable through wait()."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def __bool__(self) -> bool:
        return self.event.is_set()

    async def wait(self) -> None:
        await self.event.wait()


def body(name: str = "ep", spec: dict | None = None) -> dict:
    return {"apiVersion": "coserve.dev/v1alpha1", "kind": "InferenceEndpoint",
            "metadata": {"name": name, "namespace": "ns", "generation": 1, "uid": name},
            "spec": spec or {"pool": "pool"}, "status": {}}


async def drive(step, passes: int, poll: float = 0.01, obj: dict | None = None) -> tuple[list[dict], list]:
    """Run a loop until `step` has been called `passes` times; what it wrote and what it posted."""
    writes: list[dict] = []
    posted: list = []
    stopped, calls = Stopped(), [0]

    async def counted(current: dict):
        calls[0] += 1
        if calls[0] >= passes:
            stopped.event.set()
        return await step(current)

    async def write(patch: dict) -> None:
        writes.append(patch)

    loop = loops.Loops().open("inferenceendpoints", "ns", "ep")
    await asyncio.wait_for(loops.run(loop, obj or body(), stopped, counted, write, posted.extend, poll, LOG), 10)
    return writes, posted


def test_a_failing_pass_is_one_condition_and_one_warning_then_recovery_is_announced_once():
    calls = [0]

    async def step(current: dict):
        calls[0] += 1
        if calls[0] <= 5:
            return {}["url"]   # the class of bug issue 9 met: a status field assumed present
        status = current["status"]
        return {**status, "url": "http://x/v1"}, []

    writes, posted = asyncio.run(drive(step, 8))
    assert [e[:2] for e in posted] == [("Warning", "ReconcileError"), ("Normal", "Recovered")]
    assert posted[0][2] == "KeyError: 'url'"
    failed = writes[0]["conditions"]
    assert [(c["type"], c["status"], c["reason"]) for c in failed] == [("Reconciled", "False", "ReconcileError")]
    assert len(writes) == 2, "the same failure is written once, not on every poll"
    assert writes[1]["url"] == "http://x/v1" and writes[1]["conditions"][0]["status"] == "True"


def test_standing_states_are_announced_once_and_changes_each_time():
    answers = iter([["pool missing"], ["pool missing"], ["pool missing"], ["loaded a"], ["loaded b"],
                    ["loaded b"], ["pool missing"]])

    async def step(current: dict):
        events = [("Warning" if m == "pool missing" else "Normal", "X", m) for m in next(answers)]
        return {**current["status"], "seen": events[0][2]}, events

    _, posted = asyncio.run(drive(step, 7))
    assert [e[2] for e in posted] == ["pool missing", "loaded a", "loaded b", "pool missing"]


def test_a_restarted_loop_does_not_repeat_what_the_conditions_already_say():
    ready = set_condition([], "Ready", False, "PoolNotReady", "CoServingPool 'p' does not exist in ns", 1)
    previous_run = body()
    previous_run["status"] = {"conditions": ready}

    async def step(current: dict):
        return current["status"], [("Warning", "PoolNotReady", "CoServingPool 'p' does not exist in ns")]

    writes, posted = asyncio.run(drive(step, 2, obj=previous_run))
    assert posted == [] and writes == []


def test_a_new_checkpoint_wakes_the_endpoints_following_the_job():
    """Poll every 60 s: the follower's second pass can only come from the job's watch event."""
    registry = loops.Loops()
    follower = registry.open("inferenceendpoints", "ns", "ep")
    stranger = registry.open("inferenceendpoints", "ns", "other")
    stopped, passes = Stopped(), []
    obj = body(spec={"pool": "pool", "adapter": {"fromFinetuneJob": {"name": "teach"}}})

    async def step(current: dict):
        passes.append(asyncio.get_running_loop().time())
        if len(passes) == 2:
            stopped.event.set()
        return current["status"], []

    async def write(patch: dict) -> None:
        pass

    async def scenario() -> float:
        task = asyncio.create_task(loops.run(follower, obj, stopped, step, write, lambda e: None, 60, LOG))
        while not passes:
            await asyncio.sleep(0.01)
        job = {"metadata": {"namespace": "ns", "name": "teach"},
               "status": {"phase": "Running", "latestCheckpoint": "adapters/ns/teach/checkpoint-10"}}
        registry.job_seen(job)
        assert not stranger.wake.is_set()   # follows no job
        await asyncio.wait_for(task, 5)
        return passes[1] - passes[0]

    assert asyncio.run(scenario()) < 1
    assert follower.follows == "teach"


def test_an_unchanged_job_or_spec_wakes_nothing():
    registry = loops.Loops()
    follower = registry.open("inferenceendpoints", "ns", "ep")
    follower.follows, follower.generation = "teach", 1
    job = {"metadata": {"namespace": "ns", "name": "teach"}, "status": {"latestCheckpoint": "c-10"}}
    registry.job_seen(job)
    follower.wake.clear()
    registry.job_seen({**job, "status": {"latestCheckpoint": "c-10", "loss": 1.0}})   # progress only
    registry.spec_seen("inferenceendpoints", {"metadata": {"namespace": "ns", "name": "ep", "generation": 1}})
    assert not follower.wake.is_set()
    registry.spec_seen("inferenceendpoints", {"metadata": {"namespace": "ns", "name": "ep", "generation": 2}})
    assert follower.wake.is_set()
    follower.wake.clear()
    registry.job_seen(job, gone=True)   # deleted: its followers learn it at once, and it is forgotten
    assert follower.wake.is_set() and registry.job_marks == {}


def test_merge_patch_removes_fields_and_keeps_unchanged_ones_out():
    assert loops.changes({"a": 1, "b": 2, "gone": 3}, {"a": 1, "b": 5}) == {"b": 5, "gone": None}
    assert loops.stored({"placement": None, "phase": "Pending"}) == {"phase": "Pending"}


def test_argo_cd_reads_a_failing_operator_pass_as_degraded_and_recovery_as_before():
    from argocd_health import argocd_health

    ready = set_condition([], "Ready", True, "Serving", "1/1 replicas serving", 1)
    for kind, status in (("InferenceEndpoint", {"observedGeneration": 1, "conditions": ready}),
                         ("CoServingPool", {"observedGeneration": 1, "conditions": ready}),
                         ("FinetuneJob", {"observedGeneration": 1, "phase": "Succeeded"})):
        obj = {**body(), "kind": kind, "status": status}
        assert argocd_health(kind, obj)["status"] == "Healthy"
        failed, _ = loops.failed_pass(status, 1, KeyError("url"))
        health = argocd_health(kind, {**obj, "status": failed})
        assert health == {"status": "Degraded", "message": "ReconcileError: KeyError: 'url'"}, kind
        again, _ = loops.recovered(failed, 1, [])
        assert argocd_health(kind, {**obj, "status": again})["status"] == "Healthy", kind
