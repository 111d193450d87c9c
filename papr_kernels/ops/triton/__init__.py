"""The "triton" backend (papr_kernels.backends): Triton kernels for `prune` and the row ops.

    common.py   what both launchers share: triton import and availability, the launch split,
                the launch guard (device, stream, interpreter lock), test overrides
    prune.py    the fused prune forward / backward kernels, their custom ops, forward / backward,
                channel_mean
    rows.py     the hierarchical row kernels (Swin, ConvNeXt): gather_rows, scatter_rows,
                scatter_back, kept_row_map, and the fused glue gather_layer_norm,
                masked_residual

This package is the backend module: `importlib.import_module("papr_kernels.ops.triton")`.
"""
from .common import unavailable_reason
from .prune import backward, channel_mean, forward
from .rows import (ROW_MAP_OPS, gather_layer_norm, gather_rows, kept_row_map, masked_residual,
                   scatter_back, scatter_rows)

__all__ = ["unavailable_reason", "forward", "backward", "channel_mean", "gather_rows", "scatter_rows",
           "scatter_back", "gather_layer_norm", "masked_residual", "kept_row_map", "ROW_MAP_OPS"]
