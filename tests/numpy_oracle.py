"""An independent NumPy (float64) statement of SPEC's arithmetic, to test the reference against.

Written from the definitions (cubic convolution with A = -0.75 and clamped taps, linear
interpolation, a stable descending sort), not from PyTorch's code paths.
"""
import numpy as np

A = -0.75


def _cubic_weights(t):
    """Weights of the taps at offsets -1, 0, 1, 2 for a fractional position t in [0, 1)."""
    def near(d):   # |d| <= 1
        return ((A + 2) * d - (A + 3)) * d * d + 1

    def far(d):    # 1 < |d| < 2
        return ((A * d - 5 * A) * d + 8 * A) * d - 4 * A

    return np.array([far(t + 1), near(t), near(1 - t), far(2 - t)])


def _source_positions(size_in, size_out, align_corners, cubic):
    dst = np.arange(size_out, dtype=np.float64)
    if align_corners:
        scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
        return dst * scale
    src = (dst + 0.5) * size_in / size_out - 0.5
    return src if cubic else np.maximum(src, 0.0)


def _cubic_matrix(size_in, size_out, align_corners):
    """(size_out, size_in) matrix of the 1-D bicubic resize."""
    m = np.zeros((size_out, size_in))
    for i, pos in enumerate(_source_positions(size_in, size_out, align_corners, cubic=True)):
        base = int(np.floor(pos))
        for offset, w in zip(range(-1, 3), _cubic_weights(pos - base)):
            m[i, min(max(base + offset, 0), size_in - 1)] += w
    return m


def _linear_matrix(size_in, size_out, align_corners):
    m = np.zeros((size_out, size_in))
    for i, pos in enumerate(_source_positions(size_in, size_out, align_corners, cubic=False)):
        lo = min(int(np.floor(pos)), size_in - 1)
        hi = min(lo + 1, size_in - 1)
        frac = pos - lo
        m[i, lo] += 1 - frac
        m[i, hi] += frac
    return m


def significance(f, grid, align_corners=True):
    """(B, prod(grid)) scores from proposal features f (B, K, h, w) or (B, K, t, h, w)."""
    mean = np.asarray(f, dtype=np.float64).mean(axis=1)
    if mean.ndim == 3:
        mh = _cubic_matrix(mean.shape[1], grid[0], align_corners)
        mw = _cubic_matrix(mean.shape[2], grid[1], align_corners)
        out = np.einsum("yh,bhw,xw->byx", mh, mean, mw)
    else:
        mt, mh, mw = (_linear_matrix(s, g, align_corners) for s, g in zip(mean.shape[1:], grid))
        out = np.einsum("zt,yh,xw,bthw->bzyx", mt, mh, mw, mean)
    return out.reshape(out.shape[0], -1)


def rank(scores):
    """Indices by descending score, ties to the lower index, NaN as -inf, -0.0 == 0.0."""
    s = np.where(np.isnan(scores), -np.inf, scores) + 0.0
    return np.argsort(-s, axis=1, kind="stable")
