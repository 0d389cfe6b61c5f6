"""Triton multi-LoRA shrink/expand equal their PyTorch twins, and the twins equal a per-token reference.

On a CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET) at small shapes; on a GPU
the same tests also run at the shapes of an 8B model's merged q/k/v projection in bf16.
"""
from __future__ import annotations

import pytest
import torch

from coserve.kernels.lora import lora_expand_torch, lora_shrink_torch
from coserve.kernels.lora_triton import (
    LoRABatchMeta,
    LoRAKernelConfig,
    fill_lora_batch_meta,
    lora_apply,
    lora_batch_meta,
    lora_expand,
    lora_shrink,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CUDA = DEVICE == "cuda"

# (slot of each token, slice widths, rank of each slot (padded to the max), K)
SMALL = [
    ([1, -1, 0, 1, 3, 1, 0], (64, 32, 32), [8, 16, 64, 16], 48),     # q/k/v widths, slot 2 has no tokens
    ([2], (40, 40), [16, 8, 16], 32),                                 # T=1, gate/up
    ([0, -1, -1, 0, 1], (24,), [8, 8], 80),                           # n=1, K not a power of two
    (torch.arange(64).remainder(7) - 1, (32, 16), [16, 8, 16, 4, 16, 16], 32),   # T=64, 6 adapters and none
]
REALISTIC = [
    (torch.arange(64).remainder(33) - 1, (4096, 1024, 1024), [16] * 32, 4096),   # 64 tokens, 32 adapters
    ([5] * 20 + [-1] * 44, (14336, 14336), [16] * 32, 4096),                       # one adapter, gate/up
]


def rand(*shape: int, dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


def adapters(widths: tuple[int, ...], ranks: list[int], k: int, dtype: torch.dtype,
             gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Stacked A [S, n, R, K] and B [S, N, R] with each slot's rank beyond its own zero-padded."""
    offsets = tuple(int(o) for o in torch.tensor((0,) + widths).cumsum(0))
    r_max, n = max(ranks), len(widths)
    a = rand(len(ranks), n, r_max, k, dtype=dtype, gen=gen, scale=k ** -0.5)
    b = rand(len(ranks), offsets[-1], r_max, dtype=dtype, gen=gen)
    for slot, r in enumerate(ranks):
        a[slot, :, r:] = 0
        b[slot, :, r:] = 0
    return a, b, offsets


def per_token_reference(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                        token_lora: torch.Tensor, offsets: tuple[int, ...]) -> torch.Tensor:
    """y + B_i @ (A_i @ x) per token and slice, in float64: independent of the twins' slot grouping."""
    out = y.double().clone()
    for t, slot in enumerate(token_lora.tolist()):
        if 0 <= slot < a.shape[0]:
            for i, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
                out[t, lo:hi] += b[slot, lo:hi].double() @ (a[slot, i].double() @ x[t].double())
    return out


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Relative Frobenius error within what the dtype's rounding allows; NaN fails."""
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    err = (got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)
    assert err < tol, f"relative error {err:.2e} over {tol:.0e}"


def cases() -> list[tuple]:
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    shapes = SMALL + (REALISTIC if CUDA else [])
    params = [(s, torch.float32) for s in shapes]
    params += [(s, dt) for s in shapes[:1] + shapes[4:] for dt in dtypes[1:]]
    return [pytest.param(*p, id=f"T{len(p[0][0])}-n{len(p[0][1])}-{str(p[1])[6:]}") for p in params]


@pytest.mark.parametrize("shape,dtype", cases())
def test_shrink_expand_equal_twins_and_reference(shape, dtype):
    slots, widths, ranks, k = shape
    gen = torch.Generator().manual_seed(len(slots) * 31 + k)
    token_lora = torch.as_tensor(slots, dtype=torch.int32).to(DEVICE)
    a, b, offsets = adapters(widths, ranks, k, dtype, gen)
    x = rand(len(slots), k, dtype=dtype, gen=gen)
    y0 = rand(len(slots), offsets[-1], dtype=dtype, gen=gen)
    meta = lora_batch_meta(token_lora, len(ranks))

    buf = torch.full((len(slots), len(widths), max(ranks)), float("nan"), device=DEVICE)
    lora_shrink(x, a, meta, buf)
    want_buf = lora_shrink_torch(x, a, token_lora)
    close(buf, want_buf, torch.float32 if dtype == torch.float32 else torch.float16)
    assert torch.all(buf[token_lora < 0] == 0)

    y = lora_expand(want_buf, b, meta, offsets, y0.clone())
    want_y = lora_expand_torch(want_buf, b, token_lora, offsets, y0.clone())
    close(y - y0, want_y - y0, dtype)
    assert torch.equal(y[token_lora < 0], y0[token_lora < 0])

    y_apply = lora_apply(x, y0.clone(), a, b, meta, offsets, buf)
    reference = per_token_reference(x, y0, a, b, token_lora, offsets)
    close(y_apply.double() - y0.double(), reference - y0.double(), dtype)
    close(want_y.double() - y0.double(), reference - y0.double(), dtype)


@pytest.mark.parametrize("config", [LoRAKernelConfig(block_m=16, block_n=16, block_k=16, split_k=1),
                                    LoRAKernelConfig(block_m=16, block_n=64, block_k=16, split_k=3),
                                    LoRAKernelConfig(block_m=32, block_n=32, block_k=32, split_k=2)])
def test_shrink_tilings_agree(config):
    """Split-K (atomic fp32 adds), uneven K, several output tiles and several token tiles per slot agree."""
    gen = torch.Generator().manual_seed(3)
    slots = [0] * 17 + [-1] + [2] * 17 + [1] * 2
    token_lora = torch.tensor(slots, dtype=torch.int32, device=DEVICE)
    a, _, _ = adapters((16, 16), [16, 4, 8], 40, torch.float32, gen)
    x = rand(len(slots), 40, dtype=torch.float32, gen=gen)
    buf = torch.full((len(slots), 2, 16), float("nan"), device=DEVICE)
    lora_shrink(x, a, lora_batch_meta(token_lora, 3), buf, config)
    close(buf, lora_shrink_torch(x, a, token_lora), torch.float32)


@pytest.mark.parametrize("split_n", [1, 3, 100])
def test_expand_column_tiles_over_slices(split_n):
    """Column tiles narrower than the slices, a partial last tile per slice, several tiles per program and
    several token tiles per slot write exactly their columns."""
    gen = torch.Generator().manual_seed(4)
    slots = [1, 0, 1, -1] + [1] * 16
    token_lora = torch.tensor(slots, dtype=torch.int32, device=DEVICE)
    _, b, offsets = adapters((50, 18, 30), [8, 16], 8, torch.float32, gen)
    buf = rand(len(slots), 3, 16, dtype=torch.float32, gen=gen)
    y0 = rand(len(slots), offsets[-1], dtype=torch.float32, gen=gen)
    y = lora_expand(buf, b, lora_batch_meta(token_lora, 2), offsets, y0.clone(),
                    LoRAKernelConfig(block_m=16, block_n=16, split_n=split_n))
    close(y - y0, lora_expand_torch(buf, b, token_lora, offsets, y0.clone()) - y0, torch.float32)
    assert torch.equal(y[3], y0[3])


def host_grouping(slots: list[int], num_slots: int) -> tuple[list[int], list[int], list[int]]:
    keyed = [s if 0 <= s < num_slots else num_slots for s in slots]
    order = sorted(range(len(slots)), key=lambda t: (keyed[t], t))
    counts = [keyed.count(s) for s in range(num_slots + 1)]
    starts = [sum(counts[:s]) for s in range(num_slots + 1)]
    return order, counts, starts


@pytest.mark.parametrize("slots", [[3, -1, 0, 3, 3, 1, -1, 0], [-1, -1], [2], [0, 7, 1, 0]])
def test_meta_matches_host_grouping(slots):
    """Stable order by slot with no-adapter tokens (and out-of-range slots) last; counts and starts."""
    meta = lora_batch_meta(torch.tensor(slots, dtype=torch.int32, device=DEVICE), 4)
    order, counts, starts = host_grouping(slots, 4)
    assert meta.sorted_tokens.tolist() == order
    assert meta.counts.tolist() == counts
    assert meta.starts.tolist() == starts
    assert meta.sorted_tokens.dtype == meta.counts.dtype == meta.starts.dtype == torch.int32


def test_meta_fills_static_buffers_in_place():
    buffers = LoRABatchMeta.allocate(8, 3, DEVICE)
    pointers = (buffers.sorted_tokens.data_ptr(), buffers.counts.data_ptr(), buffers.starts.data_ptr())
    for slots in ([2, 0, -1, 2, 1], [1, 1, 1]):
        meta = fill_lora_batch_meta(torch.tensor(slots, dtype=torch.int32, device=DEVICE), buffers)
        order, counts, starts = host_grouping(slots, 3)
        assert (meta.sorted_tokens.data_ptr(), meta.counts.data_ptr(), meta.starts.data_ptr()) == pointers
        assert meta.sorted_tokens.tolist() == order and meta.num_tokens == len(slots)
        assert meta.counts.tolist() == counts and meta.starts.tolist() == starts
    with pytest.raises(ValueError, match="exceed"):
        fill_lora_batch_meta(torch.zeros(9, dtype=torch.int32, device=DEVICE), buffers)


def test_mismatched_inputs_are_refused():
    gen = torch.Generator().manual_seed(5)
    a, b, offsets = adapters((16,), [8, 8], 16, torch.float32, gen)
    meta = lora_batch_meta(torch.tensor([0, 1], dtype=torch.int32, device=DEVICE), 2)
    x = rand(2, 16, dtype=torch.float32, gen=gen)
    with pytest.raises(ValueError, match="out must be fp32"):
        lora_shrink(x, a, meta, torch.zeros(2, 1, 8, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="metadata for 2 tokens"):
        lora_shrink(x[:1], a, meta, torch.zeros(1, 1, 8, device=DEVICE))
    with pytest.raises(ValueError, match="offsets"):
        lora_expand(torch.zeros(2, 1, 8, device=DEVICE), b, meta, (0, 8, 16), torch.zeros(2, 16, device=DEVICE))


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_meta_and_kernels_replay_in_a_cuda_graph():
    """Captured once, replayed for other adapter mixes: the grid and metadata never depend on the mix."""
    gen = torch.Generator().manual_seed(6)
    t, s = 64, 32
    a, b, offsets = adapters((4096, 1024, 1024), [16] * s, 4096, torch.bfloat16, gen)
    x = rand(t, 4096, dtype=torch.bfloat16, gen=gen)
    y0 = rand(t, offsets[-1], dtype=torch.bfloat16, gen=gen)
    token_lora = torch.full((t,), -1, dtype=torch.int32, device=DEVICE)
    buffers, buf, y = LoRABatchMeta.allocate(t, s, DEVICE), torch.empty(t, 3, 16, device=DEVICE), y0.clone()

    def step() -> None:
        y.copy_(y0)
        lora_apply(x, y, a, b, fill_lora_batch_meta(token_lora, buffers), offsets, buf)

    step()   # compiles the kernels outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    for mix in (torch.arange(t) % (s + 1) - 1, torch.full((t,), 7), torch.randint(-1, s, (t,), generator=gen)):
        token_lora.copy_(mix.to(torch.int32))
        graph.replay()
        want = lora_expand_torch(lora_shrink_torch(x, a, token_lora), b, token_lora, offsets, y0.clone())
        close(y.double() - y0.double(), want.double() - y0.double(), torch.bfloat16)
        assert torch.equal(y[token_lora < 0], y0[token_lora < 0])
