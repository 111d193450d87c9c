"""SPEC's rule for "a backend matches the reference", usable from tests, the demo and benchmarks.

Kernels may sum channels in another order than `torch.mean`, so scores may differ by a few ULP
and near-ties may swap. A backend's result (out, indices) matches when:
1. out equals x gathered at the backend's own indices, exactly;
2. every kept patch's reference score >= every dropped patch's reference score - tolerance,
   and in "score" order the kept scores do not increase (within tolerance), in "spatial" order
   the indices ascend;
3. with `exact_indices=True` (inputs without near-ties) the indices equal the reference's.
"""
from typing import List

import torch

from . import reference, validation

RTOL = 1e-5


def mismatches(x, f, z, out, indices, *, exact_indices=False, rtol=RTOL, max_items=5,
               **kwargs) -> List[str]:
    """Why (out, indices) does not match the reference for prune(x, f, z, **kwargs); [] if it does."""
    plan = validation.check_prune_args(x, f, z, kwargs.get("num_prefix_tokens", 1),
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
    if exact_indices:
        problems += _first_differences("indices vs reference", indices, ref_indices, max_items)
    if plan.identity:
        return problems
    scores = reference.significance(f, plan.grid, plan.align_corners)
    scores = torch.where(scores.isnan(), float("-inf"), scores)
    tol = rtol * scores.abs().nan_to_num(0.0, 0.0, 0.0).amax(dim=1, keepdim=True).clamp_min(1e-30)
    kept = scores.gather(1, indices)
    dropped = scores.scatter(1, indices, float("-inf"))
    worst_kept, worst_kept_at = kept.min(dim=1)
    best_dropped, best_dropped_at = dropped.max(dim=1)
    for b in torch.nonzero(worst_kept < best_dropped - tol[:, 0]).flatten()[:max_items].tolist():
        problems.append(f"row {b}: kept patch {indices[b, worst_kept_at[b]].item()} scores "
                        f"{worst_kept[b].item()!r} < dropped patch {best_dropped_at[b].item()} "
                        f"scoring {best_dropped[b].item()!r}")
    if plan.order == "spatial":
        bad_rows = torch.nonzero((indices[:, 1:] <= indices[:, :-1]).any(dim=1)).flatten()
        problems += [f"row {b}: indices not ascending" for b in bad_rows[:max_items].tolist()]
    else:
        rising = (kept[:, 1:] > kept[:, :-1] + tol).any(dim=1)
        problems += [f"row {b}: kept scores not in descending order"
                     for b in torch.nonzero(rising).flatten()[:max_items].tolist()]
    if (indices.sort(dim=1).values.diff(dim=1) == 0).any():
        problems.append("indices of a row are not unique")
    return problems


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
