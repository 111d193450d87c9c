"""`prune`: checks, backend dispatch and the autograd Functions every backend plugs into."""
import functools
from typing import Optional, Sequence, Tuple, Union

import torch

from . import backends, reference, spec


class PruneFunction(torch.autograd.Function):
    """Forward: a backend's fused select + gather. Backward: a scatter at unique indices.

    The gradient reaches x only; f and the indices get none.
    """

    # forward(ctx, ...) rather than a separate setup_context: with setup_context, Function.apply
    # binds the arguments through inspect.signature on every call (~30 us, a large share of a
    # B = 1 prune on CPU).
    @staticmethod
    def forward(ctx, x, f, backend, plan):
        out, indices = backend.forward(x, f, plan)
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(indices)
        ctx.backend = backend
        ctx.plan = plan
        return out, indices

    @staticmethod
    def backward(ctx, grad_out, _grad_indices):
        (indices,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            if torch.is_grad_enabled():   # create_graph=True: the scatter is recorded
                grad_x = ScatterFunction.apply(grad_out, indices, ctx.backend, ctx.plan)
            else:   # the usual backward: nothing records it (Function.apply costs ~5 us)
                grad_x = ctx.backend.backward(grad_out, indices, ctx.plan)
        return grad_x, None, None, None


class ScatterFunction(torch.autograd.Function):
    """The backward of PruneFunction as a Function of its own, so that double backward works on
    every backend: the gradient of a scatter is the gather of the same rows."""

    @staticmethod
    def forward(ctx, grad_out, indices, backend, plan):
        ctx.save_for_backward(indices)
        ctx.num_prefix_tokens = plan.num_prefix_tokens
        return backend.backward(grad_out, indices, plan)

    @staticmethod
    def backward(ctx, grad_grad_x):
        (indices,) = ctx.saved_tensors
        return reference.gather(grad_grad_x, indices, ctx.num_prefix_tokens), None, None, None


def run(x: torch.Tensor, f: torch.Tensor, plan: spec.Plan, impl: backends.PruneBackend
        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, indices) of checked arguments on backend `impl`, recorded by autograd when x needs
    a gradient. f never gets one (it is detached: no autograd kernel is ever asked for)."""
    if f.requires_grad:  # detach() costs ~0.4 us, f rarely requires a gradient
        f = f.detach()
    if plan.identity:
        return x, reference.all_indices(x.shape[0], plan.num_patches, x.device)
    if x.shape[0] == 0:
        # Still through autograd when x needs a gradient: out.sum().backward() must work.
        indices = torch.empty(0, plan.keep, dtype=torch.int64, device=x.device)
        return reference.gather(x, indices, plan.num_prefix_tokens), indices
    if torch.is_grad_enabled() and x.requires_grad:
        return PruneFunction.apply(x, f, impl, plan)
    # Nothing to record: skipping Function.apply saves ~4 us of a ~36 us B = 1 call on CPU.
    return impl.forward(x, f, plan)


def prune(
    x: torch.Tensor,
    f: torch.Tensor,
    z: float,
    *,
    num_prefix_tokens: int = 1,
    grid: Optional[Sequence[int]] = None,
    align_corners: bool = True,
    order: str = "score",
    return_indices: bool = False,
    backend: Optional[str] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Keep the prefix tokens and the top-z fraction of patch tokens of x, ranked by f.

    Args:
        x: tokens (B, n, C); the first `num_prefix_tokens` are class/register tokens, the other
            N = n - num_prefix_tokens are patch tokens laid out row-major over `grid`.
        f: proposal features (B, K, h, w), or (B, K, t, h, w) for video.
        z: keep ratio in (0, 1]; `int(n * z)` patch tokens are kept (at least 1, at most N).
        num_prefix_tokens: leading tokens never pruned (timm's convention).
        grid: token grid (H, W) or (T, H, W); None means square.
        align_corners: passed to the bicubic/trilinear resize (True as in the published code).
        order: "score" keeps tokens in descending significance, "spatial" in ascending index.
        return_indices: also return the kept patch indices (B, k), int64, prefix excluded.
        backend: "torch", "triton", "cpp", "cuda", or None for the fastest that can run here.

    Returns:
        (B, num_prefix_tokens + k, C) tokens, and the indices when `return_indices`.

    Under `torch.onnx.export(..., dynamo=True)` it is traced from the reference's standard ops
    whatever the backend: ONNX ReduceMean and the resize as Gather / Mul / Add in float64, one
    Cast to float32, TopK (ties to the lower index, SPEC's order), GatherND; no custom domain.
    TopK ranks the float32 scores; the gather keeps x's dtype.
    """
    plan = spec.check_prune_args(x, f, z, num_prefix_tokens, grid, align_corners, order)
    out, indices = run(x, f, plan, backends.prune_backend(backend, x.device))
    return (out, indices) if return_indices else out


def refuse_script(what: str):
    """What `torch.jit.script` of `what` raises, before TorchScript's own error (which points
    at a keyword-only argument of `prune` or a state attribute, not at what to do instead):
    script calls an object's `__prepare_scriptable__` first, also for the functions and
    modules it compiles recursively."""
    raise RuntimeError(
        f"torch.jit.script cannot compile {what}: TorchScript supports none of the Python "
        f"behind it (prune's keyword-only arguments, the backend dispatch, the patch state), "
        f"and torch deprecates it. Use torch.jit.trace, torch.export.export or torch.compile, "
        f"which record the package's ops.")


prune.__prepare_scriptable__ = functools.partial(refuse_script, "papr_kernels.prune")


def significance(f: torch.Tensor, grid: Sequence[int], align_corners: bool = True
                 ) -> torch.Tensor:
    """The per-patch scores (B, prod(grid)), float32, that `prune` ranks: f's channel mean
    resized to `grid` ((H, W) for f (B, K, h, w), (T, H, W) for video f), in float64 and
    rounded once (SPEC, semantics 1). `reference.significance` with its arguments checked."""
    spec.check_features(f)
    grid = spec.check_grid(grid, f.dim() - 2)
    return reference.significance(f, grid, spec.check_flag("align_corners", align_corners))


def keep_count(n: int, z: float, num_prefix_tokens: int = 1) -> int:
    """How many patch tokens `prune` keeps of n tokens (prefix included) at keep ratio z:
    `min(max(int(n * z), 1), n - num_prefix_tokens)` (SPEC, semantics 2)."""
    return spec.keep_count(*spec.check_keep_count_args(n, z, num_prefix_tokens))
