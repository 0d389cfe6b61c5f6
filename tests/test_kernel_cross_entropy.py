"""The fused cross-entropy backward equals its twin (loss per row, and the gradient written over the logits) at
several shapes and dtypes, with ignored rows and a vocabulary that does not fill the kernel's tiles; on a CPU
through Triton's interpreter, on a GPU with the vocabulary of a Llama-3 head."""
from __future__ import annotations

import pytest
import torch

from coserve.kernels import cross_entropy

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
IGNORE = -100

pytestmark = pytest.mark.skipif(not cross_entropy.AVAILABLE, reason="Triton cannot be imported on this platform")

SHAPES = [(1, 7), (5, 1024), (33, 3000), (16, 2049)] + ([(1024, 128256), (130, 151936)] if CUDA else [])


@pytest.mark.parametrize("rows,vocab", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cross_entropy_backward_equals_twin(rows, vocab, dtype):
    g = torch.Generator().manual_seed(rows * 31 + vocab)
    logits = (4 * torch.randn(rows, vocab, generator=g)).to(DEVICE, dtype)
    targets = torch.randint(0, vocab, (rows,), generator=g).to(DEVICE)
    targets[1::3] = IGNORE
    ours, ref = logits.clone(), logits.clone()
    loss = cross_entropy.cross_entropy_backward_(ours, targets, 0.37, IGNORE)
    ref_loss = cross_entropy.cross_entropy_backward_torch_(ref, targets, 0.37, IGNORE)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    assert ours.dtype == dtype and not ours[1::3].any()
    # both round the same fp32 value to the dtype, but their sums (log-sum-exp) differ in order
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-6)
    torch.testing.assert_close(ours, ref, **tol)
    full = torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="none")
    torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-4)


def test_fused_cross_entropy_backward_refuses_other_layouts():
    with pytest.raises(ValueError, match="row-major"):
        cross_entropy.cross_entropy_backward_(torch.randn(8, 4, device=DEVICE).T, torch.zeros(4, dtype=torch.long,
                                              device=DEVICE), 1.0, IGNORE)
