"""The engine loop: requests in, one scheduled iteration per `step()`, text deltas out."""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from coserve.engine.config import EngineConfig
from coserve.engine.cost_model import CostModel, DeviceClock, Forward, Work, context, profile
from coserve.engine.detokenizer import IncrementalDetokenizer
from coserve.engine.finetune.manager import BackwardWork, FinetuneManager
from coserve.engine.kv_cache import BlockManager, allocate_kv_caches, kv_bytes_per_block
from coserve.engine.lora import LoRARegistry
from coserve.engine.model.loader import DTYPES, load_model
from coserve.engine.runner import InFlight, Runner, StepResult
from coserve.engine.sampling import SamplingParams
from coserve.engine.scheduler import Chunk, Scheduler
from coserve.engine.sequence import RequestOutput, Sequence, Status
from coserve.engine.serving_mode import ServingPolicy


class RequestError(ValueError):
    """A request the engine refuses; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: int = 400):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass
class StepStats:
    """What the last iteration did, for metrics."""

    prefill_tokens: int = 0
    decode_tokens: int = 0
    finetune_tokens: int = 0
    backward_units: int = 0
    unit_tokens: int = 0
    duration_s: float = 0.0
    eager_units: int = 0            # units launched kernel by kernel (the rest replayed CUDA graphs)
    unit_captures: int = 0          # units whose CUDA graph was captured in this iteration
    graphed_forward: bool = False   # the forward replayed a CUDA graph (decode or mixed)
    finetune_yielded: bool = False  # finetuning stood aside: requests waited for admission (see stands_aside)

    @property
    def holds(self) -> str | None:
        """What the iteration ran: "inference", "finetune", "both", or None for nothing."""
        inference = self.prefill_tokens + self.decode_tokens > 0
        finetune = self.finetune_tokens + self.backward_units > 0
        return ("both" if finetune else "inference") if inference else "finetune" if finetune else None


class LLMEngine:
    def __init__(self, config: EngineConfig, cost_model: CostModel | None = None):
        self.config = config
        dtype = DTYPES[config.torch_dtype_name]
        self.model = load_model(config.model, config.device, config.torch_dtype_name, config.use_fast_path,
                                config.data_root)
        self.model_config = self.model.cfg
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        num_blocks = config.num_kv_blocks or self._blocks_for_memory(dtype)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        capacity = num_blocks * config.block_size
        self.max_model_len = min(config.max_model_len or self.model_config.max_position_embeddings, capacity)
        self.kv_caches = allocate_kv_caches(self.model_config, num_blocks, config.block_size, config.device, dtype)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_batched_tokens)
        self.loras = LoRARegistry(self.model, config.max_loras, config.max_lora_rank)
        self.runner = Runner(self.model, self.kv_caches, self.blocks, self.loras, config.device,
                             config.cuda_graphs, config.max_num_seqs, self.max_model_len, config.max_batched_tokens,
                             config.max_finetune_jobs)
        self.requests: dict[str, Sequence] = {}     # open requests: their last output is not emitted yet
        self._pending: list[tuple[Sequence, str | None, bool]] = []   # sampled tokens whose text waits
        self._ahead: tuple[list[Chunk], InFlight, Forward] | None = None   # a decode iteration queued behind
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else config.cuda_graphs and config.device.startswith("cuda"))
        self.eos_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.last_step = StepStats()
        self.model_name = config.served_model_name or Path(config.model).name
        self.finetune = FinetuneManager(self, config.max_finetune_jobs, config.finetune_kv_reserve)
        self.mode = ServingPolicy(config.mode, config.temporal_interval)
        self.runner.warmup()
        self.clock = DeviceClock(config.device)
        self.cost = cost_model or profile(self)
        self.cost.pad = self.runner.padded_tokens
        if config.device.startswith("cuda"):   # the model, caches and graphs stay: full collections skip them
            gc.collect()                         # (tens of ms of pause in a serving iteration otherwise)
            gc.freeze()

    def _blocks_for_memory(self, dtype: torch.dtype) -> int:
        per_block = kv_bytes_per_block(self.model_config, self.config.block_size, dtype)
        if self.config.device.startswith("cuda"):
            free, _ = torch.cuda.mem_get_info()
            budget = free * self.config.kv_cache_memory
        else:
            budget = self.config.kv_cache_memory * 2**30
        return max(1, int(budget // per_block))

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    adapter: str | None = None) -> None:
        if not self.mode.serves_inference:
            raise RequestError(f"this engine serves finetuning only (--mode {self.mode.mode.value}); send "
                               "inference requests to another engine", "model", 503)
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already running", "request_id")
        if not prompt_ids:
            raise RequestError("the prompt is empty", "prompt")
        if any(not 0 <= t < self.model_config.vocab_size for t in prompt_ids):
            raise RequestError(f"prompt token ids must be in [0, {self.model_config.vocab_size})", "prompt")
        if len(prompt_ids) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens; this model's context is "
                               f"{self.max_model_len} tokens, including the completion", "prompt")
        if adapter is not None and adapter not in self.loras.adapters:
            raise RequestError(f"the model {adapter!r} does not exist", "model", 404)
        seq = Sequence(request_id, list(prompt_ids), params, adapter_name=adapter)
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer)
        if adapter is not None:
            seq.adapter_slot = self.loras.acquire(adapter)
            seq.cache_salt = f"{adapter}#{self.loras.adapters[adapter].load_id}"
        self.requests[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        """End a request now; a finished one whose last output is still pending ends without it."""
        seq = self.requests.pop(request_id, None)
        if seq is not None and seq.status is not Status.FINISHED:
            self._release(seq, "abort")

    def _release(self, seq: Sequence, reason: str) -> None:
        """Finish the sequence in the scheduler: its blocks and adapter slot go back. It stays in `requests`
        until its last output is emitted."""
        self.scheduler.finish(seq, reason)
        if seq.adapter_slot is not None:
            self.loras.release(seq.adapter_slot)

    def has_work(self) -> bool:
        return (self.scheduler.has_work() or (self.mode.trains and self.finetune.has_work()) or bool(self._pending)
                or self._ahead is not None)

    def step(self) -> list[RequestOutput]:
        """One iteration: inference chunks first, then the finetuning forward chunks and backward units that
        fit in what the latency target leaves (with no inference in the iteration: in `idle_iteration_ms`).
        Returns the deltas of the previous iteration's tokens, made while this one runs on the device (with
        `overlap_outputs`; otherwise of this one's), and this one's when no further inference iteration follows.
        With `async_scheduling`, steady decode runs one iteration ahead: the next one is queued, fed by this one's
        sampled tokens on the device, before this one's are read."""
        start = time.perf_counter()
        self.clock.start()
        steps, saves = self.finetune.counters()
        captures = self.runner.captures()
        turn = self.mode.turn(self.scheduler.has_work(), self.finetune)
        ft_chunks: list = []
        ahead, self._ahead = self._ahead, None
        chunks = ahead[0] if ahead is not None else self.scheduler.schedule() if turn.inference else []
        inference_tokens = sum(c.length for c in chunks)
        budget = (self.config.tpot_slo_ms if chunks else self.config.idle_iteration_ms) / 1000
        trains = turn.finetune and self.finetune.has_work()
        aside = trains and self.finetune.stands_aside(bool(chunks) and bool(self.scheduler.waiting))
        trains = trains and not aside
        if ahead is not None:       # queued by the last step: nothing to plan
            _, flight, forward = ahead
        else:
            if trains:
                room = self.config.max_batched_tokens - inference_tokens if chunks else self.max_model_len
                ft_chunks = self.finetune.plan_forward(budget, inference_tokens,
                                                       sum(context(c.start, c.length) for c in chunks), room,
                                                       self.cost, self.runner.mixed is not None)
            flight, forward = self._launch(chunks, ft_chunks)
        left = budget - (self.cost.forward_s(forward.tokens, forward.graphed, forward.pairs, forward.lora)
                         if forward else 0.0)
        if self.async_scheduling and flight is not None and not ft_chunks:
            self._launch_ahead(chunks, flight)
        outputs = self._emit()
        if flight is not None:
            self.finetune.forward_done(ft_chunks, flight.kept)
        backward = BackwardWork()
        if trains and self.finetune.has_work():   # queued before the tokens are read: no device gap
            backward = self.finetune.run_backward(left, self.cost, must_progress=not chunks)
        if flight is not None:
            outputs += self._check_tokens(flight.result())
        self.mode.done(turn, self.finetune, bool(ft_chunks) or backward.units > 0)
        self.finetune.settle()
        if not self.config.overlap_outputs or not self.scheduler.has_work():
            outputs += self._emit()
        steps_after, saves_after = self.finetune.counters()
        saved = saves_after > saves or backward.captures > 0 or self.runner.captures() > captures
        if saved:
            self.clock.discard()
        work = Work(forward, tuple(backward.run), steps_after - steps, saved, bool(ft_chunks) or backward.units > 0,
                    inference_tokens > 0)
        for done, seconds in self.clock.stop(work):
            if isinstance(done, Work):
                self.cost.observe(done, seconds)
            else:
                self.cost.observe_piece(done, seconds)
        decode = sum(1 for c in chunks if c.length == 1 and c.start >= len(c.seq.prompt_ids))
        self.last_step = StepStats(inference_tokens - decode, decode, sum(c.length for c in ft_chunks),
                                   backward.units, backward.tokens, time.perf_counter() - start, backward.eager,
                                   backward.captures, forward is not None and forward.graphed, aside)
        return outputs

    def _launch(self, chunks: list[Chunk], ft_chunks: list[Chunk],
                behind: InFlight | None = None) -> tuple[InFlight | None, Forward | None]:
        """Queue the iteration on the device (timed as its forward); the inference chunks count as computed.
        `behind`: the iteration in flight whose sampled tokens `ahead` chunks take as input."""
        every = chunks + ft_chunks
        if not every:
            return None, None
        forward = Forward(self.runner.rows(every), sum(context(c.start, c.length) for c in every),
                          self.runner.graphed(every), any(c.seq.adapter_slot is not None for c in every))
        with self.clock.timing(forward):
            flight = self.runner.launch(every, behind)
        for c in chunks:
            c.seq.num_computed += c.length
        return flight, forward

    def _launch_ahead(self, chunks: list[Chunk], flight: InFlight) -> None:
        """Queue the next decode iteration behind `flight`, fed by its sampled tokens on the device, when it is
        certain to be the same requests decoding: nobody waits, no finetuning asks for room, and no request ends
        by length with `flight`'s token (an end by eos or a stop is seen late, and the token sampled behind it
        dropped, as with stop strings). The host then plans while the device computes."""
        if not self.runner.decode_only(chunks) or (self.mode.trains and self.finetune.has_work()):
            return
        limit = self.max_model_len
        if any(len(c.seq.output_ids) + 1 >= c.seq.params.max_tokens or c.seq.num_tokens + 1 >= limit
               for c in chunks):
            return
        ahead = self.scheduler.decode_ahead(flight.seqs)
        if ahead is None:
            return
        queued, forward = self._launch(ahead, [], behind=flight)
        self._ahead = (ahead, queued, forward)

    def _fail(self, seq: Sequence, message: str) -> RequestOutput:
        """End one request with an error; the rest of the batch goes on."""
        self._release(seq, "error")
        del self.requests[seq.request_id]
        return RequestOutput(seq.request_id, "", [], [], True, "error", len(seq.prompt_ids), len(seq.output_ids),
                             error=message)

    def _check_tokens(self, result: StepResult) -> list[RequestOutput]:
        """Right after the sync, only what the next schedule depends on: append each token and end requests by
        stop ids, eos, max_tokens or the context. Text, stop strings and outputs wait in `_pending`. A request a
        stop string ended while this iteration ran (found one iteration late) drops its token."""
        failed = []
        eos, limit = self.eos_ids, self.max_model_len
        for seq, token, logprob, bad in zip(result.seqs, result.tokens, result.logprobs, result.bad):
            if seq.status is Status.FINISHED:
                continue
            if bad:
                failed.append(self._fail(seq, "the model produced non-finite logits for this request"))
                continue
            out = seq.output_ids
            out.append(token)
            seq.output_logprobs.append(logprob)
            p = seq.params
            by_token = token in p.stop_token_ids or (not p.ignore_eos and token in eos)
            reason = "stop" if by_token else (
                "length" if len(out) >= p.max_tokens or len(seq.prompt_ids) + len(out) >= limit else None)
            if reason is not None:
                self._release(seq, reason)
            self._pending.append((seq, reason, by_token))
        return failed

    def _emit(self) -> list[RequestOutput]:
        """The text deltas of the pending tokens, for requests still open."""
        pending, self._pending = self._pending, []
        return [self._text_delta(seq, reason, by_token) for seq, reason, by_token in pending
                if self.requests.get(seq.request_id) is seq]

    def _text_delta(self, seq: Sequence, reason: str | None, by_token: bool) -> RequestOutput:
        """Detokenize the request's newest token, cut at a stop string, and hold back what may still grow into
        one; a stop string ends the request here."""
        p = seq.params
        text_ids = seq.output_ids[:-1] if by_token else seq.output_ids
        text = seq.text + seq.detokenizer.step(text_ids, final=reason is not None)
        for s in p.stop:
            idx = text.find(s, max(0, len(seq.text) - len(s)))
            if idx != -1:
                text, reason = text[:idx], "stop"
                break
        seq.text = text
        finished = reason is not None
        # Hold back anything that may still grow into a stop string.
        hold = 0 if finished else max([len(s) - 1 for s in p.stop] + [0])
        visible = len(text) - hold
        delta = text[seq.emitted_chars:max(visible, seq.emitted_chars)]
        seq.emitted_chars += len(delta)
        new_ids = seq.output_ids[seq.emitted_tokens:]
        new_lps = seq.output_logprobs[seq.emitted_tokens:]
        seq.emitted_tokens = len(seq.output_ids)
        if finished:
            if seq.status is not Status.FINISHED:
                self._release(seq, reason)
            seq.finish_reason = reason
            del self.requests[seq.request_id]
        return RequestOutput(seq.request_id, delta, new_ids, new_lps, finished, reason,
                             len(seq.prompt_ids), len(seq.output_ids))

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 adapters: list[str | None] | None = None) -> list[Sequence]:
        """Run prompts to completion in one continuous batch (for scripts and tests)."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        adapters = adapters or [None] * len(prompts)
        seqs = []
        for i, (ids, p, a) in enumerate(zip(prompts, params_list, adapters)):
            rid = f"gen-{id(prompts)}-{i}"
            self.add_request(rid, ids, p, a)
            seqs.append(self.requests[rid])
        while any(self.requests.get(s.request_id) is s for s in seqs):
            self.step()
        return seqs
