"""The one-row linear kernel (batch-1 decode) equals its twin, F.linear, at several shapes and dtypes, with and
without bias and with K and N that do not fill its tiles; on a CPU through Triton's interpreter."""
from __future__ import annotations

import pytest
import torch

from coserve.kernels import gemv

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

pytestmark = pytest.mark.skipif(not gemv.AVAILABLE, reason="Triton cannot be imported on this platform")

SHAPES = [(64, 96), (200, 1000), (4096, 1536), (13, 513)] + ([(6144, 4096), (4096, 14336), (128256, 4096)]
                                                              if CUDA else [])


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_one_row_linear_equals_twin(n, k, dtype, with_bias):
    g = torch.Generator().manual_seed(n * 7 + k)
    x = torch.randn(1, k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if with_bias else None
    y = gemv.linear_one_row(x, w, b)
    ref = torch.nn.functional.linear(x.double(), w.double(), b.double() if b is not None else None)
    assert y.shape == (1, n) and y.dtype == dtype
    # both round one fp32 sum: they may differ by the last unit of the output dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=2 ** -7)
    torch.testing.assert_close(y.double(), ref, **tol)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), **tol)


def test_one_row_linear_refuses_other_shapes():
    x = torch.randn(2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="x \\[1, K\\]"):
        gemv.linear_one_row(x, torch.randn(8, 16, device=DEVICE))
    with pytest.raises(ValueError):
        gemv.linear_one_row(x[:1], torch.randn(16, 8, device=DEVICE).T)
