"""The "torch" backend: SPEC's reference (papr_kernels.reference) behind the backend protocol.

Always available, on every device type (meta included, for shapes).
"""
from typing import Optional

from .. import reference
from ..reference import gather_rows, scatter_back, scatter_rows  # noqa: F401  (row ops)
from ..reference import gather_layer_norm, masked_residual  # noqa: F401  (fused glue)
from ..reference import proposal_map as channel_mean  # noqa: F401  (torch's own mean)
from ..spec import Plan


def unavailable_reason(device_type: str) -> Optional[str]:
    return None


def forward(x, f, plan: Plan):
    indices = reference.top_k(reference.significance(f, plan.grid, plan.align_corners),
                              plan.keep, plan.order)
    return reference.gather(x, indices, plan.num_prefix_tokens), indices


def backward(grad_out, indices, plan: Plan):
    return reference.scatter(grad_out, indices, plan.num_tokens, plan.num_prefix_tokens)
