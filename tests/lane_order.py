"""Maps on which only the order of the float64 channel sum decides the float32 scores, and that
order (papr_core.h's channel_sum: 16 interleaved lanes) written out, for the tests of the compiled
backends' one summation order (test_cpp.py, test_reliability.py)."""
import math

import torch


def lane_order_map(dtype):
    """f (1, 32, 8, 8) at the token grid (bicubic is the identity there) whose ranking only the
    channel summation order decides. Position 0: channel 0 = 1 (mean 1/32). Positions 1 and 63:
    channels 0, 1, 2, 18 = 1, 2^-24, 2^-53, 2^-53. In channel_sum's order (lane j adds channels
    j, j + 16 in order, then the lanes are added in order) the lanes are 1, 2^-24, 2^-52 and the
    sum 1 + 2^-24 + 2^-52: the mean rounds up to 1/32 + 2^-28 in float32, ranked before position
    0. Adding channels 0..31 in turn, each 2^-53 is a tie that rounds back to 1 + 2^-24, the mean
    rounds to even, 1/32, and position 0 (the lower index) comes first."""
    f = torch.zeros(1, 32, 8, 8, dtype=torch.float64)
    f[0, 0, 0, 0] = 1.0
    for position in (1, 63):
        for channel, value in ((0, 1.0), (1, 2.0 ** -24), (2, 2.0 ** -53), (18, 2.0 ** -53)):
            f[0, channel, position // 8, position % 8] = value
    return f.to(dtype)


def rounding_map(batch, channels, f_size, dtype, seed):
    """f whose float32 channel means depend on the order of addition: per position K and
    K * 2^-24 in two random channels (mean 1 + 2^-24, a float32 rounding tie) and t = half a
    float64 ULP of K in a random third of the others, every other entry 0. Added to K(1 + 2^-24)
    one at a time, each t is a tie that rounds back (the mean rounds to even, 1); two t added
    first make a ULP that stays (the mean rounds up, 1 + 2^-23)."""
    gen = torch.Generator().manual_seed(seed)
    positions = batch * math.prod(f_size)
    f = torch.zeros(positions, channels, dtype=torch.float64)
    f[torch.rand(positions, channels, generator=gen) < 1 / 3] = 2.0 ** (channels.bit_length() - 54)
    for value in (float(channels), channels * 2.0 ** -24):
        f[torch.arange(positions), torch.randint(0, channels, (positions,), generator=gen)] = value
    return f.view(batch, *f_size, channels).movedim(-1, 1).contiguous().to(dtype)


def lane_order_mean(f):
    """f's float64 channel mean (B, S) summed in papr_core.h's channel_sum order, written out:
    lane j adds channels j, j + 16, ... in order from 0, the lanes are added in order from 0,
    then / K."""
    v = f.double().flatten(2)                       # (B, K, S)
    K = v.shape[1]
    total = torch.zeros(v.shape[0], v.shape[2], dtype=torch.float64)
    for j in range(min(16, K)):
        lane = torch.zeros_like(total)
        for c in range(j, K, 16):
            lane = lane + v[:, c]
        total = total + lane
    return total / K


def lane_order_ranking(f):
    """Patch ranking at the identity resize (token grid = f's grid, align_corners: the bicubic
    weights are 0, 1, 0, 0, so each score is the float32 mean), the mean in channel_sum's
    order."""
    scores = lane_order_mean(f).float()
    return torch.sort(scores, dim=1, descending=True, stable=True).indices
