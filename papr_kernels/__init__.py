"""papr_kernels: fast, exact PaPr patch pruning for vision transformers.

    out = papr_kernels.prune(x, f, z)   # x: (B, n, C) tokens, f: (B, K, h, w) proposal features

See SPEC.md in the source repository for the exact contract every backend meets.
"""
from typing import List, Optional

import torch

from . import backends
from .api import keep_count, prune, significance
from .module import PaPr

__version__ = "0.1.0"

__all__ = ["prune", "significance", "keep_count", "available_backends", "PaPr", "__version__"]


def available_backends(device: Optional[str] = None) -> List[str]:
    """Names of the backends that can run here (on `device`'s type when given)."""
    device_type = None if device is None else torch.device(device).type
    return backends.available(device_type)
