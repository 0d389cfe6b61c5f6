"""A linear layer for one row (batch-1 decode) in Triton: y = x W^T + b streams W once, each program reducing a
few output rows over K in fp32. cuBLAS's kernels for one row read an 8B model's weights at 2.4-2.9 TB/s on an
H100, this at 2.7-3.1 (bench/NOTES.md); every step of batch-1 decode is those reads. The twin is
`torch.nn.functional.linear`: same result up to the order of the fp32 sums, rounded once to x's dtype."""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    AVAILABLE = True
except ImportError:   # CPU-only installs: F.linear serves
    AVAILABLE = False

BLOCK_N = 8       # output rows per program: enough programs to cover the SMs for any projection
INTERPRET_BLOCK_N = 128   # Triton's interpreter (CPU tests) pays per program, not per element
MAX_BLOCK_K = 512


def linear_one_row(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K] @ weight [N, K]^T (+ bias [N]) -> [1, N] in x's dtype; the row-major weight is read once."""
    if not AVAILABLE:
        raise RuntimeError("Triton is not installed; use torch.nn.functional.linear")
    rows, k = x.shape
    n, k_w = weight.shape
    if rows != 1 or k_w != k or weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(f"linear_one_row takes x [1, K] and a row-major weight [N, K]; got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    block_n = BLOCK_N if x.is_cuda else INTERPRET_BLOCK_N
    block_k = min(MAX_BLOCK_K, triton.next_power_of_2(k))
    big = k >= 8192 or n >= 65536
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, y, n, k, weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
        EVEN_N=n % block_n == 0, num_warps=8 if big else 4, num_stages=3)
    return y


if AVAILABLE:
    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_w, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
        """BLOCK_N outputs: elementwise products accumulated per (row, lane) over K tiles, reduced once."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_w + offs_k[None, :]
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K and EVEN_N:
                w = tl.load(w_ptrs)
                x = tl.load(x_ptr + k0 + offs_k)
            else:
                k_mask = k0 + offs_k < K
                w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
                x = tl.load(x_ptr + k0 + offs_k, mask=k_mask, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
            w_ptrs += BLOCK_K
        out = tl.sum(acc, 1)
        if HAS_BIAS:
            out += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_mask)
