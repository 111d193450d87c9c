"""The reference against SPEC's rules, each checked with values worked out independently."""
import numpy as np
import pytest
import torch

import papr_kernels
from papr_kernels import reference

import numpy_oracle


def _tokens(batch, n, channels=4, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, channels, generator=gen).to(dtype)


def _features_with_scores(scores_hw, channels=4):
    """f (B, K, h, w) whose channel mean is exactly `scores_hw` (K a power of two)."""
    scores_hw = torch.as_tensor(scores_hw, dtype=torch.float32)
    return scores_hw[:, None].expand(-1, channels, -1, -1).clone()


@pytest.mark.parametrize("n, prefix, z, expected", [
    (197, 1, 0.5, 98),      # ViT-B/16-224: 1 + 98 tokens
    (256, 0, 0.5, 128),
    (577, 1, 0.5, 288),     # ViT-B/16-384
    (197, 1, 0.3, 59),      # int(197 * 0.3) = 59, not int(196 * 0.3) = 58: n counts the prefix
    (201, 5, 0.5, 100),     # int(201 * 0.5) = 100, not int(196 * 0.5) = 98
    (197, 1, 0.7, 137),     # 197 * 0.7 = 137.89999999999998
    (100, 0, 0.29, 28),     # 100 * 0.29 = 28.999999999999996: Python's int(), no rounding
    (197, 1, 0.001, 1),     # at least one patch
    (197, 1, 0.9999, 196),  # at most N
    (5, 4, 0.5, 1),
])
def test_keep_count_table(n, prefix, z, expected):
    assert papr_kernels.keep_count(n, z, prefix) == expected
    side = {197: 14, 256: 16, 577: 24, 201: 14, 100: 10, 5: 1}[n]
    x = _tokens(2, n)
    f = torch.randn(2, 8, 5, 5)
    out = reference.prune(x, f, z, num_prefix_tokens=prefix, grid=(side, side))
    assert out.shape == (2, prefix + expected, 4)
    assert torch.equal(out[:, :prefix], x[:, :prefix])


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("f_hw, grid", [((7, 7), (14, 14)), ((7, 7), (7, 7)), ((4, 6), (12, 20)),
                                        ((20, 20), (14, 14)), ((1, 1), (3, 3)), ((5, 5), (1, 1))])
def test_significance_is_bicubic_of_channel_mean(f_hw, grid, align_corners):
    f = torch.randn(2, 6, *f_hw, generator=torch.Generator().manual_seed(1))
    expected = numpy_oracle.significance(f.double().numpy(), grid, align_corners)
    got = reference.significance(f, grid, align_corners)
    assert got.dtype == torch.float32 and got.shape == (2, grid[0] * grid[1])
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("align_corners", [True, False])
def test_video_significance_is_trilinear(align_corners):
    f = torch.randn(2, 6, 4, 7, 7, generator=torch.Generator().manual_seed(2))
    expected = numpy_oracle.significance(f.double().numpy(), (8, 14, 14), align_corners)
    got = reference.significance(f, (8, 14, 14), align_corners)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_default_resize_uses_align_corners_true():
    gen = torch.Generator().manual_seed(3)
    x, f = _tokens(4, 197), torch.randn(4, 8, 7, 7, generator=gen)
    _, idx = papr_kernels.prune(x, f, 0.5, return_indices=True)
    scores = numpy_oracle.significance(f.double().numpy(), (14, 14), align_corners=True)
    expected = numpy_oracle.rank(scores)[:, :98]
    assert np.array_equal(idx.numpy(), expected)
    other = numpy_oracle.rank(numpy_oracle.significance(f.double().numpy(), (14, 14), False))
    assert not np.array_equal(other[:, :98], expected)  # the test can tell the two apart


def test_score_order_is_descending_significance():
    gen = torch.Generator().manual_seed(4)
    x, f = _tokens(3, 1 + 16 * 16), torch.randn(3, 8, 5, 5, generator=gen)
    out, idx = papr_kernels.prune(x, f, 0.4, return_indices=True)
    scores = numpy_oracle.significance(f.double().numpy(), (16, 16))
    assert np.array_equal(idx.numpy(), numpy_oracle.rank(scores)[:, :idx.shape[1]])
    assert torch.equal(out[:, 1:], torch.stack([x[b, 1 + idx[b]] for b in range(3)]))


def test_spatial_order_is_ascending_index_of_the_same_set():
    gen = torch.Generator().manual_seed(5)
    x, f = _tokens(3, 197), torch.randn(3, 8, 7, 7, generator=gen)
    _, by_score = papr_kernels.prune(x, f, 0.3, return_indices=True)
    out, spatial = papr_kernels.prune(x, f, 0.3, order="spatial", return_indices=True)
    assert torch.equal(spatial, by_score.sort(dim=1).values)
    assert torch.equal(out[:, 1:], torch.stack([x[b, 1 + spatial[b]] for b in range(3)]))


def test_ties_go_to_the_lower_index():
    # Integer scores 0..2 on a 14x14 grid with f at grid size: many ties, resize is exact.
    gen = torch.Generator().manual_seed(6)
    scores = torch.randint(0, 3, (2, 14, 14), generator=gen).float()
    f = _features_with_scores(scores)
    _, idx = papr_kernels.prune(_tokens(2, 197), f, 0.5, return_indices=True)
    flat = scores.flatten(1).numpy()
    expected = np.stack([sorted(range(196), key=lambda i: (-flat[b, i], i))[:98] for b in range(2)])
    assert np.array_equal(idx.numpy(), expected)


def test_all_equal_scores_keep_the_first_patches():
    f = torch.ones(2, 4, 14, 14)
    _, idx = papr_kernels.prune(_tokens(2, 197), f, 0.5, return_indices=True)
    assert torch.equal(idx, torch.arange(98).expand(2, -1))


def test_negative_zero_equals_zero():
    scores = torch.zeros(1, 4, 4)
    scores[0, 0, 0] = -0.0
    scores[0, 0, 1] = -1.0
    scores[0, 3, 3] = 1.0
    _, idx = papr_kernels.prune(_tokens(1, 17), _features_with_scores(scores), 1.0 - 1e-9,
                                return_indices=True)
    # 1.0 first, then every zero by index (-0.0 at 0 among them), -1.0 last.
    assert idx[0].tolist() == [15, 0] + list(range(2, 15)) + [1]


def test_total_order_of_rank():
    nan, inf = float("nan"), float("inf")
    scores = torch.tensor([[1.0, nan, -inf, 0.0, -0.0, inf, nan, 1.0, -1.0, 0.0]])
    # inf, the two 1.0 by index, the three zeros (-0.0 at 4) by index, -1.0, then -inf and NaN
    # tie as -inf and go by index.
    assert reference.rank(scores)[0].tolist() == [5, 0, 7, 3, 4, 9, 8, 1, 2, 6]


def test_nan_features_rank_last():
    scores = torch.arange(64.0).reshape(1, 8, 8)
    scores[0, 6, 6] = float("nan")   # PyTorch's bicubic spreads it over its 4x4 stencil
    f = _features_with_scores(scores)
    _, idx = papr_kernels.prune(_tokens(1, 65), f, 1.0 - 1e-9, return_indices=True)
    s = reference.significance(f, (8, 8))[0]
    nan_at = torch.nonzero(s.isnan()).flatten().tolist()
    assert len(nan_at) > 1
    finite = sorted(set(range(64)) - set(nan_at), key=lambda i: -scores.flatten()[i].item())
    assert idx[0].tolist() == finite + nan_at


def test_prefix_tokens_are_kept_in_order():
    x = _tokens(2, 5 + 196)
    out, idx = papr_kernels.prune(x, torch.randn(2, 8, 7, 7), 0.5, num_prefix_tokens=5,
                                  return_indices=True)
    assert out.shape == (2, 5 + 100, 4)
    assert torch.equal(out[:, :5], x[:, :5])
    assert torch.equal(out[:, 5:], torch.stack([x[b, 5 + idx[b]] for b in range(2)]))


def test_no_prefix():
    x = _tokens(2, 256)
    out, idx = papr_kernels.prune(x, torch.randn(2, 8, 8, 8), 0.5, num_prefix_tokens=0,
                                  return_indices=True)
    assert out.shape == (2, 128, 4)
    assert torch.equal(out, torch.stack([x[b, idx[b]] for b in range(2)]))


def test_non_square_grid():
    gen = torch.Generator().manual_seed(7)
    x, f = _tokens(2, 1 + 12 * 20), torch.randn(2, 8, 4, 6, generator=gen)
    _, idx = papr_kernels.prune(x, f, 0.5, grid=(12, 20), return_indices=True)
    expected = numpy_oracle.rank(numpy_oracle.significance(f.double().numpy(), (12, 20)))
    assert np.array_equal(idx.numpy(), expected[:, :idx.shape[1]])


def test_video_tubelets():
    gen = torch.Generator().manual_seed(8)
    x, f = _tokens(2, 1568), torch.randn(2, 8, 4, 7, 7, generator=gen)
    out, idx = papr_kernels.prune(x, f, 0.5, num_prefix_tokens=0, grid=(8, 14, 14),
                                  return_indices=True)
    assert out.shape == (2, 784, 4)
    expected = numpy_oracle.rank(numpy_oracle.significance(f.double().numpy(), (8, 14, 14)))
    assert np.array_equal(idx.numpy(), expected[:, :784])


def test_z_one_returns_x_unchanged():
    x = _tokens(2, 197)
    out, idx = papr_kernels.prune(x, torch.randn(2, 8, 7, 7), 1.0, return_indices=True)
    assert out is x
    assert torch.equal(idx, torch.arange(196).expand(2, -1)) and idx.dtype == torch.int64


def test_tiny_z_keeps_one_patch():
    f = _features_with_scores(torch.arange(196.0).reshape(1, 14, 14))
    out, idx = papr_kernels.prune(_tokens(1, 197), f, 1e-6, return_indices=True)
    assert out.shape == (1, 2, 4) and idx.tolist() == [[195]]


def test_empty_batch():
    x = _tokens(0, 197)
    out, idx = papr_kernels.prune(x, torch.randn(0, 8, 7, 7), 0.5, return_indices=True)
    assert out.shape == (0, 99, 4) and idx.shape == (0, 98) and idx.dtype == torch.int64
    assert reference.prune(x, torch.randn(0, 8, 7, 7), 0.5).shape == (0, 99, 4)


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("f_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(x_dtype, f_dtype):
    gen = torch.Generator().manual_seed(9)
    x = _tokens(2, 197, dtype=x_dtype)
    f = torch.randn(2, 8, 7, 7, generator=gen).to(f_dtype)
    out, idx = papr_kernels.prune(x, f, 0.5, return_indices=True)
    assert out.dtype == x_dtype
    scores = numpy_oracle.significance(f.double().numpy(), (14, 14))  # f's own values, fp32 math
    assert np.array_equal(idx.numpy(), numpy_oracle.rank(scores)[:, :98])
    assert torch.equal(out[:, 1:], torch.stack([x[b, 1 + idx[b]] for b in range(2)]))


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(2, 8, 197, generator=gen).transpose(1, 2)          # (2, 197, 8), strided
    f = torch.randn(2, 7, 7, 16, generator=gen).permute(0, 3, 1, 2)[:, ::2]   # (2, 8, 7, 7)
    out, idx = papr_kernels.prune(x, f, 0.5, return_indices=True)
    out_c, idx_c = papr_kernels.prune(x.contiguous(), f.contiguous(), 0.5, return_indices=True)
    assert torch.equal(idx, idx_c) and torch.equal(out, out_c)


def test_inputs_are_not_modified():
    x, f = _tokens(2, 197), torch.randn(2, 8, 7, 7)
    f[0, 0, 0, 0] = float("nan")
    x_copy, f_copy = x.clone(), f.clone()
    papr_kernels.prune(x, f, 0.5)
    assert torch.equal(x, x_copy) and torch.equal(f.nan_to_num(), f_copy.nan_to_num())
    assert torch.equal(f.isnan(), f_copy.isnan())
