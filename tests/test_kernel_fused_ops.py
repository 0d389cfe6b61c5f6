"""Triton RMSNorm(+residual), rotary and SiLU-and-mul equal their PyTorch twins, and the twins equal the unfused
model's numerics. On a CPU the kernels run in Triton's interpreter (tests/conftest.py); on a GPU at real shapes."""
from __future__ import annotations

import pytest
import torch

from coserve.kernels import fused_ops, norm_rotary

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

pytestmark = pytest.mark.skipif(not fused_ops.AVAILABLE, reason="Triton cannot be imported on this platform")


def ulps(dtype: torch.dtype) -> dict[str, float]:
    """Kernel vs twin: a rounding may land one unit apart (reduction order, FMA contraction); Triton's
    interpreter rounds fp32 to bf16 toward zero, so on a CPU bf16 results may be two units apart."""
    bf16_rtol = 2 ** -7 if CUDA else 2 ** -6
    return {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=bf16_rtol),
            torch.float16: dict(atol=1e-3, rtol=2 ** -10)}[dtype]


def rand(*shape: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 64), (5, 1000), (33, 4096), (3, 20000)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_equals_twin(tokens, hidden, dtype, with_residual):
    g = torch.Generator().manual_seed(hidden + tokens)
    x = rand(tokens, hidden, dtype=dtype, gen=g)
    residual = rand(tokens, hidden, dtype=dtype, gen=g) if with_residual else None
    weight = 1 + 0.1 * rand(hidden, dtype=dtype, gen=g)
    out, res_out = fused_ops.rms_norm(x, weight, 1e-5, residual)
    ref, ref_res = norm_rotary.rms_norm(x, weight, 1e-5, residual)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, ref, **ulps(dtype))
    if residual is None:
        assert res_out is x
    elif CUDA or dtype != torch.bfloat16:
        assert torch.equal(res_out, ref_res)   # one correctly rounded add, as torch adds
    else:
        torch.testing.assert_close(res_out, ref_res, **ulps(dtype))


def test_rms_norm_reads_strided_rows():
    g = torch.Generator().manual_seed(3)
    wide = rand(6, 2 * 256, dtype=torch.float32, gen=g)
    x, residual, weight = wide[:, :256], wide[:, 256:], rand(256, dtype=torch.float32, gen=g)
    out, res_out = fused_ops.rms_norm(x, weight, 1e-6, residual)
    ref, ref_res = norm_rotary.rms_norm(x.contiguous(), weight, 1e-6, residual.contiguous())
    torch.testing.assert_close(out, ref, **ulps(torch.float32))
    torch.testing.assert_close(res_out, ref_res, atol=0, rtol=0)


def rope(d: int, max_pos: int) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    return norm_rotary.rotary_cache(inv_freq.to(DEVICE), max_pos)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hq,hkv,d", [(1, 4, 1, 16), (5, 8, 2, 64), (33, 6, 2, 128)])
def test_rotary_in_place_on_qkv_slices_equals_twin(tokens, hq, hkv, d, dtype):
    g = torch.Generator().manual_seed(tokens * d)
    qkv = rand(tokens, (hq + 2 * hkv) * d, dtype=dtype, gen=g)
    q = qkv[:, :hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d:(hq + hkv) * d].view(tokens, hkv, d)
    assert tokens == 1 or q.stride(0) == k.stride(0) == (hq + 2 * hkv) * d   # rows of the merged output
    positions = torch.randint(0, 4096, (tokens,), generator=g).to(DEVICE)
    cache = rope(d, 4096)
    expected = qkv.clone()
    norm_rotary.rotary(expected[:, :hq * d].view(tokens, hq, d), expected[:, hq * d:(hq + hkv) * d].view(
        tokens, hkv, d), positions, cache)
    v_before = qkv[:, (hq + hkv) * d:].clone()
    fused_ops.rotary(q, k, positions, cache)
    torch.testing.assert_close(qkv[:, :(hq + hkv) * d], expected[:, :(hq + hkv) * d], **ulps(dtype))
    assert torch.equal(qkv[:, (hq + hkv) * d:], v_before)   # values untouched


def test_rotary_on_head_strided_views():
    g = torch.Generator().manual_seed(7)
    q_big = rand(5, 8, 2 * 32, dtype=torch.float32, gen=g)
    k_big = rand(5, 3, 32, dtype=torch.float32, gen=g)
    q, k = q_big[:, ::2, :32], k_big[:, 1:]          # every other head; a head-offset view
    positions = torch.tensor([0, 3, 3, 100, 7]).to(DEVICE)
    cache = rope(32, 128)
    q_ref, k_ref = q.clone(), k.clone()
    norm_rotary.rotary(q_ref, k_ref, positions, cache)
    untouched = q_big[:, 1::2].clone(), k_big[:, 0].clone(), q_big[:, ::2, 32:].clone()
    fused_ops.rotary(q, k, positions, cache)
    torch.testing.assert_close(q, q_ref, **ulps(torch.float32))
    torch.testing.assert_close(k, k_ref, **ulps(torch.float32))
    assert torch.equal(q_big[:, 1::2], untouched[0]) and torch.equal(k_big[:, 0], untouched[1])
    assert torch.equal(q_big[:, ::2, 32:], untouched[2])


def test_rotary_twin_from_the_cache_equals_rotating_by_fresh_frequencies():
    g = torch.Generator().manual_seed(2)
    d, positions = 64, torch.tensor([0, 5, 17, 900]).to(DEVICE)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)).to(DEVICE)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    for dtype in DTYPES:
        q, k = rand(4, 4, d, dtype=dtype, gen=g), rand(4, 2, d, dtype=dtype, gen=g)
        want_q, want_k = norm_rotary.rotate(q, freqs.cos(), freqs.sin()), norm_rotary.rotate(k, freqs.cos(), freqs.sin())
        norm_rotary.rotary(q, k, positions, norm_rotary.rotary_cache(inv_freq, 1000))
        assert torch.equal(q, want_q) and torch.equal(k, want_k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,inter", [(1, 64), (5, 1000), (33, 3000)])
def test_silu_and_mul_equals_twin(tokens, inter, dtype):
    g = torch.Generator().manual_seed(inter)
    x = 3 * rand(tokens, 2 * inter, dtype=dtype, gen=g)
    out = fused_ops.silu_and_mul(x)
    assert out.shape == (tokens, inter) and out.dtype == dtype
    torch.testing.assert_close(out, norm_rotary.silu_and_mul(x), **ulps(dtype))
    exact = torch.nn.functional.silu(x[:, :inter].double()) * x[:, inter:].double()
    torch.testing.assert_close(out.double(), exact, **ulps(dtype))


def test_empty_batches():
    x = torch.empty(0, 64, device=DEVICE)
    assert fused_ops.rms_norm(x, torch.ones(64, device=DEVICE), 1e-6, x)[0].shape == (0, 64)
    assert fused_ops.silu_and_mul(torch.empty(0, 128, device=DEVICE)).shape == (0, 64)
    fused_ops.rotary(torch.empty(0, 2, 16, device=DEVICE), torch.empty(0, 1, 16, device=DEVICE),
                     torch.empty(0, dtype=torch.int64, device=DEVICE), rope(16, 8))


@pytest.mark.skipif(not CUDA, reason="realistic shapes need a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_realistic_shapes_on_gpu(dtype):
    g = torch.Generator().manual_seed(0)
    tokens, hidden, inter, hq, hkv, d = 512, 4096, 14336, 32, 8, 128
    x, residual = rand(tokens, hidden, dtype=dtype, gen=g), rand(tokens, hidden, dtype=dtype, gen=g)
    weight = rand(hidden, dtype=dtype, gen=g)
    out, res_out = fused_ops.rms_norm(x, weight, 1e-5, residual)
    ref, ref_res = norm_rotary.rms_norm(x, weight, 1e-5, residual)
    torch.testing.assert_close(out, ref, **ulps(dtype))
    assert torch.equal(res_out, ref_res)
    up = rand(tokens, 2 * inter, dtype=dtype, gen=g)
    torch.testing.assert_close(fused_ops.silu_and_mul(up), norm_rotary.silu_and_mul(up), **ulps(dtype))
    qkv = rand(tokens, (hq + 2 * hkv) * d, dtype=dtype, gen=g)
    expected = qkv.clone()
    positions = torch.randint(0, 131072, (tokens,), generator=g).to(DEVICE)
    cache = rope(d, 131072)
    split = (hq * d, hkv * d, hkv * d)
    norm_rotary.rotary(*(t.view(tokens, -1, d) for t in expected.split(split, -1)[:2]), positions, cache)
    fused_ops.rotary(*(t.view(tokens, -1, d) for t in qkv.split(split, -1)[:2]), positions, cache)
    torch.testing.assert_close(qkv, expected, **ulps(dtype))
