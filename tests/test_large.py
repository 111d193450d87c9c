"""Tensors past 2^31 elements: 64-bit offsets in the compiled kernels (forward and backward)."""
import pytest
import torch

import papr_kernels
import papr_kernels.spec
from papr_kernels import backends, reference

from conftest import backend_params

N_TOKENS, CHANNELS = 197, 768
BATCH = 2**31 // (N_TOKENS * CHANNELS) + 8     # B * n * C just past 2^31 (about 4.3 GB in fp16)

# The kernels whose offsets could overflow 32 bits (the torch backend is ATen's own indexing).
LARGE_BACKENDS = backend_params("cpp-cpu", "cuda-cuda", "triton-cuda")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", LARGE_BACKENDS, indirect=True)
def test_past_two_to_the_31_elements(backend, dtype):
    name, device = backend
    assert BATCH * N_TOKENS * CHANNELS > 2**31
    x = torch.zeros(BATCH, N_TOKENS, CHANNELS, dtype=dtype, device=device)
    x[:, :, 0] = torch.arange(N_TOKENS, dtype=dtype, device=device)      # token id (exact < 256)
    x[:, :, -1] = (torch.arange(BATCH, device=device) % 251).to(dtype)[:, None]  # batch id mod 251
    f = torch.randn(BATCH, 4, 7, 7, generator=torch.Generator().manual_seed(0)).to(device)
    out, idx = papr_kernels.prune(x, f, 0.5, return_indices=True, backend=name)
    assert out.shape == (BATCH, 99, CHANNELS)
    # every row, the last ones far past 2^31 elements in, holds the token the index names
    assert torch.equal(out[:, 1:, 0].long(), idx + 1)
    assert torch.equal(out[:, :, -1], x[:, :99, -1])
    assert torch.equal(out[:, 0, 0], x[:, 0, 0])
    last = slice(BATCH - 3, BATCH)
    assert torch.equal(idx[last], reference.top_k(reference.significance(f[last], (14, 14)), 98))
    del out
    plan = papr_kernels.spec.check_prune_args(x, f, 0.5)
    grad_x = backends.resolve(name, device).backward(x[:, :99].contiguous(), idx, plan)
    assert grad_x.shape == x.shape
    expected_ids = torch.zeros(BATCH, N_TOKENS, dtype=torch.long, device=device)
    expected_ids.scatter_(1, idx + 1, torch.arange(1, 99, device=device).expand(BATCH, -1))
    assert torch.equal(grad_x[:, :, 0].long(), expected_ids)       # kept rows in place, others 0
    kept = expected_ids != 0
    kept[:, 0] = True
    assert torch.equal(grad_x[:, :, -1] != 0, kept & (x[:, :, -1] != 0))
