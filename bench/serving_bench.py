"""The co-serving experiment through the real server (issue 12): `coserve serve` in each mode, open-loop arrival
traces replayed with the official `openai` client (streaming), and a finetuning job through the admin API the whole
time. Per (mode, trace, rate): SLO attainment, TTFT/TPOT p50/p99, inference and finetuning tokens/s, GPU busy.

    python bench/serving_bench.py --out bench/results/serving_bench-h100-DATE.json     # 8B shape, random weights
    python bench/serving_bench.py --smoke --out /tmp/smoke.json                        # tiny model on the CPU

One engine start per mode (rates swept within it): finetune-only, inference-only, coserve, temporal-N for each N
of --temporal-intervals. Writes the JSON after every point (a run cut short keeps what it measured) and, at the
end, two PNG plots beside it. The default GPU sweep is sized to finish in about 8 minutes on one H100.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from serving_workload import SMOKE, Request, Workload, requests, write_finetune_dataset  # noqa: E402

TOKEN = "serving-bench"
JOB_PREFIX = "bench"


@dataclass
class Settings:
    """One run's knobs (from the command line); recorded in the JSON."""

    smoke: bool
    modes: list[str]
    rates: list[float]
    gamma_rates: list[float]
    duration_s: float
    drain_cap_s: float            # after a trace's last window, anything still running is cancelled
    ttft_slo_s: float
    tpot_slo_s: float
    engine_tpot_ms: float
    chunk_tokens: int
    sequences_per_step: int
    engine_args: list[str]
    time_budget_s: float | None   # windows and modes that would end past it are skipped (and listed)
    model: Path | None = None     # a Hugging Face model directory to serve instead of the generated one
    workload: Workload = field(default_factory=Workload)


@dataclass
class Record:
    """One request as the client saw it (times from time.perf_counter). A request is cancelled the moment it can
    no longer meet the SLO; its TTFT and TPOT are then lower bounds, taken at that moment."""

    trace: str
    rate: float
    arrival_s: float
    prompt_tokens: int
    max_tokens: int
    sent: float | None = None
    first: float | None = None
    last: float | None = None
    end: float | None = None
    chunks: int = 0
    completion_tokens: int | None = None
    status: int | None = None
    error: str | None = None
    missed: bool = False          # cancelled as a certain SLO miss

    @property
    def done(self) -> bool:
        return self.error is None and self.completion_tokens is not None

    @property
    def ttft(self) -> float | None:
        if self.first is not None:
            return self.first - self.sent
        return self.end - self.sent if self.missed else None

    @property
    def tpot(self) -> float | None:
        """Seconds per output token after the first, as serving benchmarks define it (0 for one token)."""
        if self.first is None or not (self.done or self.missed):
            return None
        last, tokens = (self.last, self.completion_tokens) if self.done else (self.end, self.max_tokens)
        return (last - self.first) / (tokens - 1) if tokens > 1 else 0.0

    def meets(self, slo_ttft: float, slo_tpot: float) -> bool:
        return self.done and self.ttft <= slo_ttft and self.tpot <= slo_tpot

    def row(self, origin: float) -> list:
        return [self.trace, self.rate, round(self.arrival_s, 4), self.prompt_tokens, self.max_tokens,
                _round(self.ttft), _round(self.tpot), self.completion_tokens if self.done else self.chunks,
                self.done, self.missed, _round(self.last - origin if self.last is not None else None), self.status]


RECORD_COLUMNS = ["trace", "rate", "arrival_s", "prompt_tokens", "max_tokens", "ttft_s", "tpot_s", "tokens",
                  "finished", "cancelled_as_miss", "last_token_s", "status"]


def _round(x: float | None, digits: int = 5) -> float | None:
    return None if x is None else round(x, digits)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


# ---- the engine process ------------------------------------------------------------------------------------
class Engine:
    """`coserve serve` in one mode, on a free loopback port."""

    def __init__(self, model: Path, data_root: Path, label: str, settings: Settings, log: Path):
        mode, _, interval = label.partition("-") if label.startswith("temporal-") else (label, "", "")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        (data_root / "admin-token").write_text(TOKEN + "\n")
        args = [sys.executable, "-m", "coserve.engine.cli", "serve", "--model", str(model), "--data-root",
                str(data_root), "--port", str(self.port), "--admin-token-file", str(data_root / "admin-token"),
                "--served-model-name", "bench", "--mode", mode, "--tpot-slo-ms", str(settings.engine_tpot_ms),
                "--log-level", "warning", *settings.engine_args]
        if interval:
            args += ["--temporal-interval", interval]
        env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if settings.smoke else {})}
        self.log = log
        self.proc = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the engine exited with {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the engine was not ready within {timeout_s:.0f} s: {self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---- samplers ------------------------------------------------------------------------------------------------
class GpuSampler:
    """GPU utilization (NVML's share of time a kernel ran) every 100 ms on a thread; None without NVML or GPU."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self.handle = None
        try:
            import pynvml
            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._nvml = pynvml
        except Exception:   # no NVML library, no driver, no GPU: the fraction is reported as null
            return
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            util = self._nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu
            self.samples.append((time.perf_counter(), util / 100))

    def busy(self, t0: float, t1: float) -> float | None:
        window = [u for t, u in self.samples if t0 <= t <= t1]
        return statistics.fmean(window) if self.handle is not None and window else None

    def close(self) -> None:
        self._stop.set()


@dataclass
class Sample:
    t: float
    inflight: int
    ft_tokens: int
    ft_step: int


@dataclass
class Client:
    """The `openai` client, the SLO it gives up at, and what it has in flight and received."""

    api: object
    ttft_slo_s: float
    tpot_slo_s: float
    model: str = "bench"
    inflight: int = 0
    tokens: int = 0


class JobSampler:
    """Polls the finetuning job every 200 ms (tokens, step) beside the client's in-flight count."""

    def __init__(self, http: httpx.AsyncClient, job_id: str, client: Client):
        self.http, self.job_id, self.client = http, job_id, client
        self.samples: list[Sample] = []
        self.task: asyncio.Task | None = None

    async def run(self) -> None:
        while True:
            try:
                r = await self.http.get(f"/admin/finetune/jobs/{self.job_id}")
                job = r.json() if r.status_code == 200 else {}
            except httpx.HTTPError:
                job = {}
            self.samples.append(Sample(time.perf_counter(), self.client.inflight, job.get("tokens", 0),
                                       job.get("step", 0)))
            await asyncio.sleep(0.2)

    def rate(self, t0: float, t1: float) -> tuple[float, int, str]:
        """Finetuning tokens/s in [t0, t1]: between the first and last optimizer-step boundary in the window when
        there are two (a sequence's tokens are counted as its forward runs, so a window cut mid-backward would
        read low or high by a sequence), else over the whole window. Also the steps finished and the method."""
        s = [x for x in self.samples if t0 <= x.t <= t1]
        if len(s) < 2:
            return 0.0, 0, "window"
        bounds = [b for a, b in zip(s, s[1:]) if b.ft_step != a.ft_step]
        steps = s[-1].ft_step - s[0].ft_step
        if len(bounds) >= 2:
            return (bounds[-1].ft_tokens - bounds[0].ft_tokens) / (bounds[-1].t - bounds[0].t), steps, "steps"
        return (s[-1].ft_tokens - s[0].ft_tokens) / (s[-1].t - s[0].t), steps, "window"


# ---- the client ----------------------------------------------------------------------------------------------
GRACE_S = 0.1   # past the SLO before a request is given up, so borderline ones are judged by what was measured


async def send(client: Client, req: Request, rec: Record) -> None:
    """One streamed completion: its first token at the first chunk with a choice, its token count from the
    closing usage chunk. It is cancelled once it certainly misses the SLO: no first token `ttft_slo` after it
    was sent, or decode time already past (max_tokens - 1) x `tpot_slo`."""
    import openai

    loop = asyncio.get_running_loop()
    task = asyncio.current_task()

    def give_up() -> None:
        rec.missed = True
        task.cancel()

    client.inflight += 1
    rec.sent = time.perf_counter()
    watchdog = loop.call_later(client.ttft_slo_s + GRACE_S, give_up)
    try:
        stream = await client.api.completions.create(
            model=client.model, prompt=req.prompt_ids, max_tokens=req.max_tokens, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async with stream:   # a request given up closes its connection, so the server aborts it
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.choices:
                    if rec.first is None:
                        rec.first = now
                        watchdog.cancel()
                        watchdog = loop.call_later((req.max_tokens - 1) * client.tpot_slo_s + GRACE_S, give_up)
                    rec.last = now
                    rec.chunks += 1
                    client.tokens += 1
                if chunk.usage is not None:
                    rec.completion_tokens = chunk.usage.completion_tokens
        rec.status = 200
    except openai.APIStatusError as exc:
        rec.status, rec.error = exc.status_code, str(exc)[:200]
    except openai.APIError as exc:
        rec.error = f"{type(exc).__name__}: {str(exc)[:200]}"
    except asyncio.CancelledError:
        rec.error = "cancelled: certain SLO miss" if rec.missed else "cancelled: still running at the drain cap"
        if not rec.missed:
            raise
    finally:
        watchdog.cancel()
        rec.end = time.perf_counter()
        client.inflight -= 1


async def at(when: float, coro) -> None:
    await asyncio.sleep(max(0.0, when - time.perf_counter()))
    await coro


@dataclass
class ModeRun:
    """What one engine start measured."""

    label: str
    points: list[dict] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    windows: list[list] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    origin: float = 0.0
    notes: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        o = self.origin
        return {"label": self.label, "notes": self.notes, "windows": self.windows, "record_columns": RECORD_COLUMNS,
                "records": [r.row(o) for r in self.records],
                "timeline_columns": ["t_s", "inflight", "finetune_tokens", "finetune_step"],
                "timeline": [[round(s.t - o, 3), s.inflight, s.ft_tokens, s.ft_step] for s in self.samples]}


def job_spec(settings: Settings, label: str, max_seq_len: int) -> dict:
    """A job that outlasts the run (it is cancelled at the end of the mode)."""
    return {"id": f"{JOB_PREFIX}-{label}", "dataset": {"path": "ft/data.jsonl", "format": "text"},
            "output": f"ft/{label}",
            "lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"]},
            "training": {"lr": 1e-4, "epochs": 100000, "max_steps": 10**8,
                         "sequences_per_step": settings.sequences_per_step,
                         "max_seq_len": max_seq_len, "packing": True, "chunk_tokens": settings.chunk_tokens or None,
                         "seed": 0}}


@dataclass
class Window:
    """One rate's arrival period [t0, t1) and its requests (they may finish after t1)."""

    trace: str
    rate: float
    t0: float
    t1: float
    records: list[Record]
    tokens0: int
    tokens1: int
    metrics0: dict[str, float] = field(default_factory=dict)   # the engine's iteration counters at t0 and t1
    metrics1: dict[str, float] = field(default_factory=dict)


ITERATION_SERIES = re.compile(r'^(coserve_iteration_seconds_(?:sum|count))\{holds="(\w+)"\} (\S+)$|'
                              r'^coserve_finetune_(aside_iterations|unit_captures)_total (\S+)$|'
                              r'^coserve_cost_model_(margin|relative_error) (\S+)$', re.M)


async def iteration_counters(http: httpx.AsyncClient) -> dict[str, float]:
    """The engine's iteration histogram sums and counts by what iterations held, how many iterations finetuning
    stood aside, how many unit graphs it captured, and the cost model's margin and error, from /metrics (empty if
    the scrape fails)."""
    try:
        text = (await http.get("/metrics")).text
    except httpx.HTTPError:
        return {}
    out = {}
    for m in ITERATION_SERIES.finditer(text):
        if m.group(1):
            out[f"{m.group(1).rsplit('_', 1)[1]}:{m.group(2)}"] = float(m.group(3))
        elif m.group(4):
            out[m.group(4)] = float(m.group(5))
        else:
            out[m.group(6)] = float(m.group(7))
    return out


def iteration_stats(before: dict[str, float], after: dict[str, float]) -> dict:
    """Per window: iterations by what they held, their mean wall time, those finetuning stood aside, the unit
    graphs captured (host time the device waits through), and the cost model's margin and error at its end."""
    stats: dict = {}
    for holds in ("inference", "both", "finetune"):
        n = after.get(f"count:{holds}", 0) - before.get(f"count:{holds}", 0)
        total = after.get(f"sum:{holds}", 0) - before.get(f"sum:{holds}", 0)
        stats[holds] = {"iterations": int(n), "mean_ms": round(1000 * total / n, 2) if n else None}
    stats["finetune_aside"] = int(after.get("aside_iterations", 0) - before.get("aside_iterations", 0))
    stats["unit_captures"] = int(after.get("unit_captures", 0) - before.get("unit_captures", 0))
    margin = after.get("margin") or None      # an unset gauge reads 0: no co-served iterations learned yet
    stats["cost_margin"], stats["cost_error"] = margin, after.get("relative_error") if margin else None
    return stats


async def measure_mode(engine: Engine, run: ModeRun, settings: Settings, gpu: GpuSampler, vocab: int,
                       max_context: int, save, deadline: float) -> None:
    """Start the job, warm the engine, then replay each trace's rates (those that fit before `deadline`);
    `save` is called after each trace."""
    import openai

    mode = run.label.split("-")[0] if run.label.startswith("temporal-") else run.label
    api = openai.AsyncOpenAI(base_url=engine.url + "/v1", api_key="none", max_retries=0, timeout=600)
    client = Client(api, settings.ttft_slo_s, settings.tpot_slo_s)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=engine.url, headers=headers, timeout=60) as http:
        r = await http.post("/admin/finetune/jobs", json=job_spec(settings, run.label, max_seq_len=max_context))
        run.notes["finetune_job_status"] = r.status_code
        if mode != "inference-only" and r.status_code != 201:
            raise RuntimeError(f"the finetuning job was refused: {r.text}")
        if mode == "inference-only":
            run.notes["finetune_job_refusal"] = r.json().get("error")
        sampler = JobSampler(http, f"{JOB_PREFIX}-{run.label}", client)
        sampler.task = asyncio.create_task(sampler.run())
        run.origin = time.perf_counter()
        try:
            if mode == "finetune-only":
                probe = Record("probe", 0, 0, 4, 2)
                await send(client, Request(0, [11, 12, 13, 14], 2), probe)
                run.notes["inference_refusal"] = {"status": probe.status, "error": probe.error}
            else:
                warm = [Request(0, [random.Random(i).randrange(10, vocab) for _ in range(n)], 8)
                        for i, n in enumerate([8, 32, 128, 512, 16, 64, 256, 8])]
                warm = [w for w in warm if len(w.prompt_ids) < max_context // 2]
                await asyncio.gather(*(send(client, w, Record("warm", 0, 0, 0, 0)) for w in warm))
            if mode != "inference-only":
                await wait_for_training(sampler, 120)
            if mode == "finetune-only":
                await replay(run, sampler, gpu, client, settings, "none", [0.0], vocab, max_context, deadline,
                             2 * settings.duration_s)
                save()
                return
            for trace, rates in (("poisson", settings.rates), ("gamma", settings.gamma_rates)):
                await replay(run, sampler, gpu, client, settings, trace, rates, vocab, max_context, deadline,
                             settings.duration_s)
                save()
        finally:
            sampler.task.cancel()
            await asyncio.gather(sampler.task, return_exceptions=True)
            run.samples = sampler.samples
            if mode != "inference-only":
                await http.delete(f"/admin/finetune/jobs/{sampler.job_id}")
            await api.close()


async def wait_for_training(sampler: JobSampler, timeout_s: float) -> None:
    """The job has finished an optimizer step before any window starts: its kernels are compiled and its unit
    graphs captured (one-time costs that no window should carry, in any mode)."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if sampler.samples and sampler.samples[-1].ft_step > 0:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the finetuning job made no progress within {timeout_s:.0f} s")


async def replay(run: ModeRun, sampler: JobSampler, gpu: GpuSampler, client: Client, settings: Settings,
                 trace: str, rates: list[float], vocab: int, max_context: int, deadline: float,
                 duration_s: float) -> None:
    """Open-loop arrivals of one trace, its rates back to back (ascending, so each window starts loaded as a
    steady state at a lower rate would leave it), then one drain: requests end, or are cancelled as certain
    SLO misses, or at the drain cap."""
    windows: list[Window] = []
    tasks: list[asyncio.Task] = []
    for rate in rates:
        if time.perf_counter() + duration_s + EXPECTED_DRAIN_S > deadline:
            run.notes.setdefault("skipped_for_time", []).append([trace, rate])
            continue
        reqs = requests(settings.workload, trace, rate, duration_s, vocab, max_context)
        metrics0 = await iteration_counters(sampler.http)
        t0, tokens0 = time.perf_counter(), client.tokens
        recs = [Record(trace, rate, r.arrival_s, len(r.prompt_ids), r.max_tokens) for r in reqs]
        tasks += [asyncio.create_task(at(t0 + r.arrival_s, send(client, r, rec))) for r, rec in zip(reqs, recs)]
        await asyncio.sleep(max(0.0, t0 + duration_s - time.perf_counter()))
        t1, tokens1 = time.perf_counter(), client.tokens
        windows.append(Window(trace, rate, t0, t1, recs, tokens0, tokens1, metrics0,
                              await iteration_counters(sampler.http)))
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=settings.drain_cap_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for w in windows:
        run.records += w.records
        run.windows.append([w.trace, w.rate, round(w.t0 - run.origin, 3), round(w.t1 - run.origin, 3)])
        run.points.append(score(w, run.label, sampler, gpu, settings))
        print(json.dumps(run.points[-1]), file=sys.stderr, flush=True)


EXPECTED_DRAIN_S = 10.0   # for the time budget: a long request still running when its trace's last window ends


def score(w: Window, label: str, sampler: JobSampler, gpu: GpuSampler, settings: Settings) -> dict:
    """One point of the curves. Latency percentiles are over every request (cancelled ones as lower bounds);
    token rates over the window's wall time, whichever window's requests the tokens belonged to."""
    recs = w.records
    ttfts = [r.ttft for r in recs if r.ttft is not None]
    tpots = [r.tpot for r in recs if r.tpot is not None]
    ft_rate, ft_steps, ft_method = sampler.rate(w.t0, w.t1)
    return {"mode": label, "trace": w.trace, "rate": w.rate, "requests": len(recs),
            "finished": sum(r.done for r in recs), "cancelled_as_miss": sum(r.missed for r in recs),
            "errors": sum(r.error is not None and not r.missed for r in recs),
            "slo_attainment": (sum(r.meets(settings.ttft_slo_s, settings.tpot_slo_s) for r in recs) / len(recs)
                               if recs else None),
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
            "tpot_p50_s": percentile(tpots, 50), "tpot_p99_s": percentile(tpots, 99),
            "inference_tokens_per_s": (w.tokens1 - w.tokens0) / (w.t1 - w.t0), "finetune_tokens_per_s": ft_rate,
            "finetune_steps": ft_steps, "finetune_rate_method": ft_method,
            "gpu_busy_fraction": gpu.busy(w.t0, w.t1), "window_s": w.t1 - w.t0,
            "engine_iterations": iteration_stats(w.metrics0, w.metrics1)}


# ---- summary -------------------------------------------------------------------------------------------------
def summarize(points: list[dict], slo_target: float = 0.99) -> tuple[dict, dict]:
    """The issue's four numbers, on the Poisson sweep, and notes saying which points they came from."""
    def curve(label: str) -> dict[float, dict]:
        return {p["rate"]: p for p in points if p["mode"] == label and p["trace"] == "poisson"}

    inference, coserve = curve("inference-only"), curve("coserve")
    ft_only = next((p["finetune_tokens_per_s"] for p in points if p["mode"] == "finetune-only"), None)
    good = [r for r, p in inference.items() if (p["slo_attainment"] or 0) >= slo_target]
    max_rate = max(good) if good else None
    notes: dict = {"coserve_slo99_wherever_inference_only_slo99": all(
        r in coserve and (coserve[r]["slo_attainment"] or 0) >= slo_target for r in good) if good else None}
    summary = {"max_rate_inference_only_slo99": max_rate, "coserve_slo_attainment_at_max_rate": None,
               "coserve_over_temporal_ft_at_max_rate": None, "coserve_ft_kept_at_half_rate": None}
    if max_rate is None or max_rate not in coserve:
        return summary, notes
    co = coserve[max_rate]
    summary["coserve_slo_attainment_at_max_rate"] = co["slo_attainment"]
    temporal = [p for p in points if p["mode"].startswith("temporal-") and p["trace"] == "poisson"
                and p["rate"] == max_rate]
    fair = [p for p in temporal if (p["slo_attainment"] or 0) >= (co["slo_attainment"] or 0)]
    best = max(fair or temporal, key=lambda p: p["finetune_tokens_per_s"], default=None)
    if best is not None:
        notes["temporal_compared"] = {"mode": best["mode"], "slo_attainment": best["slo_attainment"],
                                      "finetune_tokens_per_s": best["finetune_tokens_per_s"],
                                      "at_equal_or_better_slo": bool(fair)}
        if best["finetune_tokens_per_s"] > 0:
            summary["coserve_over_temporal_ft_at_max_rate"] = (co["finetune_tokens_per_s"]
                                                               / best["finetune_tokens_per_s"])
        else:
            notes["temporal_compared"]["why_no_ratio"] = "the temporal run made no finetuning progress"
    meeting = [p for p in temporal if (p["slo_attainment"] or 0) >= slo_target and p["finetune_tokens_per_s"] > 0]
    if meeting:   # the baseline a platform team would run: the best temporal N that still meets the SLO target
        m = max(meeting, key=lambda p: p["finetune_tokens_per_s"])
        notes["temporal_meeting_slo_target"] = {"mode": m["mode"], "slo_attainment": m["slo_attainment"],
                                                "finetune_tokens_per_s": m["finetune_tokens_per_s"],
                                                "coserve_over_it": co["finetune_tokens_per_s"]
                                                / m["finetune_tokens_per_s"]}
    half = min(coserve, key=lambda r: (abs(r - max_rate / 2), r))
    notes["half_rate_used"] = half
    if ft_only:
        summary["coserve_ft_kept_at_half_rate"] = coserve[half]["finetune_tokens_per_s"] / ft_only
    return summary, notes


# ---- the run -------------------------------------------------------------------------------------------------
def build_model(work: Path, smoke: bool) -> Path:
    """The tiny demo model (--smoke), else a Llama-3.1-8B-shaped directory with random bf16 weights."""
    if smoke:
        from coserve.engine.demo_model import TinyModelSpec, write_tiny_model
        return write_tiny_model(work / "model", TinyModelSpec())
    import torch
    from inference_bench import SHAPES, write_model
    path = write_model(work / "model", SHAPES["8b"], "cuda")
    torch.cuda.empty_cache()
    return path


def versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for name in ("torch", "triton", "transformers", "openai", "fastapi", "uvicorn"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    try:
        out["coserve_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=BENCH, capture_output=True,
                                               text=True, timeout=10).stdout.strip() or None
    except OSError:
        out["coserve_commit"] = None
    return out


def device_name() -> str:
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or "cpu")


def run(settings: Settings, out: Path | None, workdir: Path) -> dict:
    from transformers import AutoTokenizer

    started = time.perf_counter()
    deadline = started + (settings.time_budget_s or float("inf")) - 15   # the plots and the last save

    model = settings.model or build_model(workdir, settings.smoke)
    print(f"model ready at {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    config = json.loads((model / "config.json").read_text())
    max_context = min(config["max_position_embeddings"], 8192)
    lengths = write_finetune_dataset(workdir / "data" / "ft" / "data.jsonl", AutoTokenizer.from_pretrained(model),
                                     settings.workload)
    recorded = {k: str(v) if isinstance(v, Path) else v for k, v in vars(settings).items() if k != "workload"}
    result = {"benchmark": "serving", "device": device_name(), "date": date.today().isoformat(),
              "versions": versions(), "settings": recorded,
              "workload": {**settings.workload.to_dict(), "finetune_lengths": lengths}, "points": [], "runs": {},
              "errors": {}, "skipped_modes": [], "summary": {}}
    gpu = GpuSampler()

    def save() -> None:
        result["points"] = [p for r in runs for p in r.points]
        result["summary"], result["summary_notes"] = summarize(result["points"])
        result["runs"] = {r.label: r.to_dict() for r in runs}
        result["elapsed_s"] = time.perf_counter() - started
        if out is not None:
            out.write_text(json.dumps(result, indent=1))

    runs: list[ModeRun] = []
    for label in settings.modes:
        if time.perf_counter() + 2 * settings.duration_s + EXPECTED_DRAIN_S > deadline:
            result["skipped_modes"].append(label)
            continue
        mode_run = ModeRun(label)
        runs.append(mode_run)
        data_root = workdir / "data"
        t_start = time.perf_counter()
        engine = Engine(model, data_root, label, settings, workdir / f"engine-{label}.log")
        try:
            engine.wait_ready(min(600.0, deadline - time.perf_counter()))
            mode_run.notes["engine_start_s"] = round(time.perf_counter() - t_start, 1)
            asyncio.run(measure_mode(engine, mode_run, settings, gpu, config["vocab_size"], max_context, save,
                                     deadline))
        except Exception as exc:    # one mode's failure is recorded; the others still run
            result["errors"][label] = f"{type(exc).__name__}: {exc}\n{engine.tail()}"
            print(f"{label} failed: {exc}", file=sys.stderr, flush=True)
        finally:
            t_stop = time.perf_counter()
            engine.stop()
            mode_run.notes["engine_stop_s"] = round(time.perf_counter() - t_stop, 1)
        save()
        print(f"{label} done at {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    gpu.close()
    if out is not None:
        result["plots"] = plot(result, out)
        save()
    return result


def plot(result: dict, out: Path) -> list[str]:
    """Both PNGs beside the JSON: <stem>-sweep.png and <stem>-timeline.png."""
    from serving_plots import plot_sweep, plot_timeline
    return [str(plot_sweep(result, out.with_name(out.stem + "-sweep.png"))),
            str(plot_timeline(result, out.with_name(out.stem + "-timeline.png")))]


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, short windows: checks the harness")
    p.add_argument("--out", type=Path, help="JSON result path; the PNG plots go beside it")
    p.add_argument("--model", type=Path, help="serve this Hugging Face model directory instead of generating the "
                                              "8B shape (or the tiny model with --smoke)")
    p.add_argument("--workdir", type=Path, help="model, dataset and engine logs (default: a temporary folder, "
                                                "in /dev/shm when it exists)")
    p.add_argument("--modes", help="comma-separated: finetune-only, inference-only, coserve, temporal-N "
                                   "(default: all, temporal-N for each --temporal-intervals)")
    p.add_argument("--temporal-intervals", default=None,
                   help="N of the temporal baselines (default 128,512; the paper also runs 64)")
    p.add_argument("--rates", help="Poisson arrival rates, requests/s (default 12,24,48,96)")
    p.add_argument("--gamma-rates", help="bursty Gamma arrival rates, requests/s (default 12; none with --smoke)")
    p.add_argument("--duration", type=float, help="seconds of arrivals per point (default 8)")
    p.add_argument("--drain-cap", type=float, help="seconds allowed after a trace's last window before requests "
                                                   "still running are cancelled (default 60; a request is "
                                                   "cancelled anyway once it certainly misses the SLO)")
    p.add_argument("--ttft-slo", type=float, help="TTFT SLO in seconds (default 5, the paper's for 8B)")
    p.add_argument("--tpot-slo", type=float, help="TPOT SLO in seconds (default 0.045, the paper's for 8B)")
    p.add_argument("--engine-tpot-ms", type=float, help="the engine's --tpot-slo-ms, its per-iteration target "
                                                        "(default: --tpot-slo itself)")
    p.add_argument("--chunk-tokens", type=int, help="the job's largest forward chunk (default 0: no cap, the engine "
                                                     "sizes each chunk to the iteration's room; v8 and earlier: 256)")
    p.add_argument("--sequences-per-step", type=int, help="the job's sequences per optimizer step (default 4; each "
                                                           "one's forward runs beside the previous one's backward; "
                                                           "v9 and earlier: 1)")
    p.add_argument("--gamma-cv", type=float, help="coefficient of variation of the Gamma trace (default 3)")
    p.add_argument("--engine-arg", action="append", default=[],
                   help="extra `coserve serve` argument, e.g. --engine-arg=--max-num-seqs=128 (repeatable)")
    p.add_argument("--time-budget", type=float, help="seconds the whole run may take; windows and modes that "
                                                     "would end later are skipped and listed (default 570; none "
                                                     "with --smoke)")
    p.add_argument("--replot", type=Path, metavar="JSON", help="only redraw the plots of a saved result")
    a = p.parse_args(argv)
    smoke = a.smoke
    intervals = a.temporal_intervals or ("4" if smoke else "128,512")
    modes = a.modes.split(",") if a.modes else (["finetune-only", "inference-only", "coserve"] +
                                                 [f"temporal-{n}" for n in intervals.split(",")])
    tpot = a.tpot_slo if a.tpot_slo is not None else (1.0 if smoke else 0.045)
    workload = SMOKE if smoke else Workload()
    if a.gamma_cv is not None:
        workload = dataclasses.replace(workload, gamma_cv=a.gamma_cv)
    engine_args = list(a.engine_arg) + (["--device", "cpu"] if smoke else [])
    settings = Settings(
        smoke=smoke, modes=modes, rates=floats(a.rates or ("2,4" if smoke else "12,24,48,96")),
        gamma_rates=floats(a.gamma_rates if a.gamma_rates is not None else ("" if smoke else "12")),
        duration_s=a.duration or (1.5 if smoke else 8.0), drain_cap_s=a.drain_cap or (30.0 if smoke else 60.0),
        ttft_slo_s=a.ttft_slo or (10.0 if smoke else 5.0), tpot_slo_s=tpot,
        engine_tpot_ms=a.engine_tpot_ms or 1000 * tpot,
        chunk_tokens=a.chunk_tokens if a.chunk_tokens is not None else (16 if smoke else 0),
        sequences_per_step=a.sequences_per_step or 4,
        engine_args=engine_args, workload=workload, model=a.model.resolve() if a.model else None,
        time_budget_s=a.time_budget if a.time_budget is not None else (None if smoke else 570.0))
    return settings, a


def scratch_parent(smoke: bool) -> str | None:
    """/dev/shm when it can hold the model (the engine of each mode loads it again, from memory), else the
    system's temporary folder."""
    shm = Path("/dev/shm")
    need = 1 << 30 if smoke else 40 << 30
    return str(shm) if shm.is_dir() and shutil.disk_usage(shm).free > need else None


def main(argv: list[str] | None = None) -> None:
    settings, a = parse_args(argv)
    if a.replot:
        print("\n".join(plot(json.loads(a.replot.read_text()), a.replot)))
        return
    with tempfile.TemporaryDirectory(prefix="serving-bench-", dir=None if a.workdir else
                                     scratch_parent(settings.smoke)) as tmp:
        workdir = a.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        result = run(settings, a.out, workdir)
    print(json.dumps({"summary": result["summary"], "summary_notes": result.get("summary_notes"),
                      "errors": list(result["errors"]), "elapsed_s": round(result["elapsed_s"], 1)}, indent=1))


if __name__ == "__main__":
    main()
