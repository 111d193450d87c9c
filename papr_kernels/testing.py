"""SPEC's rule for "a backend matches the reference", usable from tests, the demo and benchmarks.

Scores are computed in float64 and rounded once to float32, so backends agree on them except
where a float64 value lies a few float64 ULP from a float32 rounding boundary or cancels to nearly
0 (the ULP are those of the map's magnitude, not of the score). A backend's result
(out, indices) matches when:
1. out equals x gathered at the backend's own indices, exactly;
2. its indices equal the reference's, except where the two patches' reference scores differ
   by one float32 ULP (that rare rounding case may swap them), or where another summation
   order could move their float64 scores into each other's float32 range (`score_ranges`: a
   float64 score on a float32 rounding boundary, or a sum that cancels to nearly 0, where a few
   float64 ULP of the map's magnitude are many of the score's); exact ties that no order can
   split and z = 1 (indices arange(N)) allow no swap; with `exact_indices=True` (constant or
   integer-valued maps of f's own size) no index may differ at all;
3. indices are unique per row, in [0, N), and ascend in "spatial" order.
"""
from typing import List

import torch

from . import reference, spec


def mismatches(x, f, z, out, indices, *, exact_indices=False, max_items=5,
               **kwargs) -> List[str]:
    """Why (out, indices) does not match the reference for prune(x, f, z, **kwargs); [] if it does."""
    plan = spec.check_prune_args(x, f, z, kwargs.get("num_prefix_tokens", 1),
                                 kwargs.get("grid"), kwargs.get("align_corners", True),
                                 kwargs.get("order", "score"))
    ref_out, ref_indices = reference.prune(x, f, z, return_indices=True, **kwargs)
    if out.shape != ref_out.shape or out.dtype != x.dtype or out.device != x.device:
        return [f"out is {tuple(out.shape)} {out.dtype} on {out.device}, expected "
                f"{tuple(ref_out.shape)} {x.dtype} on {x.device}"]
    if indices.shape != ref_indices.shape or indices.dtype != torch.int64:
        return [f"indices are {tuple(indices.shape)} {indices.dtype}, expected "
                f"{tuple(ref_indices.shape)} int64"]
    if x.shape[0] == 0:
        return []
    if indices.min() < 0 or indices.max() >= plan.num_patches:
        return [f"indices outside [0, {plan.num_patches})"]
    problems = _first_differences("out vs x gathered at the returned indices", out,
                                  reference.gather(x, indices, plan.num_prefix_tokens), max_items)
    if exact_indices or plan.identity:   # z = 1: arange(N), nothing to swap
        problems += _first_differences("indices vs reference", indices, ref_indices, max_items)
        if plan.identity:
            return problems
    exact = reference.significance64(f, plan.grid, plan.align_corners)
    scores = _ranking_key(exact.float())   # reference.significance: exact rounded once
    if plan.order == "spatial":
        bad_rows = torch.nonzero((indices[:, 1:] <= indices[:, :-1]).any(dim=1)).flatten()
        problems += [f"row {b}: indices not ascending" for b in bad_rows[:max_items].tolist()]
        # Compare kept sets in the reference's rank order.
        ranked = reference.rank(scores)
        position = torch.empty_like(ranked).scatter_(
            1, ranked, torch.arange(ranked.shape[1], device=ranked.device).expand_as(ranked))
        indices = indices.gather(1, position.gather(1, indices).argsort(dim=1))
        ref_indices = reference.top_k(scores, plan.keep, "score")
    problems += _unexplained_swaps(scores, score_ranges(f, exact), indices, ref_indices,
                                      max_items)
    if (indices.sort(dim=1).values.diff(dim=1) == 0).any():
        problems.append("indices of a row are not unique")
    return problems


# How far (in float64 ULP of the largest |value| of a row's channel-mean map) summing and
# weighing the resize taps in another order (FMA or not, other weights' roundings) can move a
# float64 score: each of the at most 16 taps adds a few ULP of its term, and the terms are
# bounded by the map's magnitude times the tap weights (sum of |weights| < 2.3, bicubic 2-D).
ORDER_NOISE_ULPS = 64


def score_ranges(f, exact):
    """(low, high), float32 (B, N) ranking keys: the scores a backend may compute from f, the
    reference's float64 scores `exact` (`reference.significance64`) moved by up to
    ORDER_NOISE_ULPS of the map's magnitude, then rounded to float32. low == high wherever no
    summation order can change the score."""
    mean = reference.proposal_map(f).flatten(1)
    magnitude = torch.where(mean.isfinite(), mean.abs(), 0.0).amax(dim=1, keepdim=True)
    noise = ORDER_NOISE_ULPS * torch.finfo(torch.float64).eps * magnitude
    return _ranking_key((exact - noise).float()), _ranking_key((exact + noise).float())


def _ranking_key(scores):
    """SPEC's order as plain comparisons: NaN as -inf, -0.0 as +0.0."""
    return torch.where(scores.isnan(), float("-inf"), scores) + 0.0


def _unexplained_swaps(scores, ranges, indices, ref_indices, max_items) -> List[str]:
    """Where the indices differ, the two patches' reference scores must differ by one float32
    ULP, or their `score_ranges` overlap: equal scores that no summation order can split are
    ranked by index (SPEC), so a swap of such a tie is a mismatch."""
    got, want = scores.gather(1, indices), scores.gather(1, ref_indices)
    ulp = torch.nextafter(torch.maximum(got.abs(), want.abs()), torch.tensor(float("inf"))) - \
        torch.maximum(got.abs(), want.abs())
    close = (got != want) & ((got - want).abs() <= ulp)
    low, high = ranges
    got_low, got_high = low.gather(1, indices), high.gather(1, indices)
    want_low, want_high = low.gather(1, ref_indices), high.gather(1, ref_indices)
    fixed_tie = (got_low == got_high) & (want_low == want_high) & (got_low == want_low)
    overlap = (got_high >= want_low) & (want_high >= got_low) & ~fixed_tie
    bad = torch.nonzero((indices != ref_indices) & ~close & ~overlap)
    return [f"row {b}, kept position {j}: patch {indices[b, j].item()} (score {got[b, j].item()!r}) "
            f"where the reference keeps patch {ref_indices[b, j].item()} "
            f"(score {want[b, j].item()!r}): not one float32 ULP apart, and no summation "
            f"order ranks them either way"
            for b, j in bad[:max_items].tolist()]


def _first_differences(what, actual, expected, max_items) -> List[str]:
    same = (actual == expected) | (actual.isnan() & expected.isnan()) if actual.is_floating_point() \
        else actual == expected
    if bool(same.all()):
        return []
    where = torch.nonzero(~same)
    lines = [f"{what}: {where.shape[0]} of {same.numel()} elements differ; first:"]
    for pos in where[:max_items].tolist():
        lines.append(f"  at {tuple(pos)}: {actual[tuple(pos)].item()!r} != "
                     f"{expected[tuple(pos)].item()!r}")
    return lines


def assert_matches_reference(x, f, z, out, indices, **kwargs) -> None:
    """Raise AssertionError listing the first mismatches when (out, indices) breaks SPEC's rule."""
    problems = mismatches(x, f, z, out, indices, **kwargs)
    if problems:
        raise AssertionError("backend result does not match the reference:\n" + "\n".join(problems))
