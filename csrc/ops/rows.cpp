// Schemas of the row ops of the hierarchical models (papr_kernels/hierarchical.py). Argument
// checks shared by the kernels: rows_args.h (beside this file). Kernels: csrc/cpu/rows_cpu.cpp,
// csrc/cuda/rows_cuda.cpp. Fake kernels: papr_kernels/ops/extension.py. A fragment of the
// papr_kernels library (csrc/ops/prune.cpp opens it; the order of the two does not matter).
#include "../stable.h"

STABLE_TORCH_LIBRARY_FRAGMENT(papr_kernels, m) {
  // Rows of x (B, H, W, C), any strides, at positions p = indices (B, k): new contiguous (B, k, C).
  m.def("gather_rows(Tensor x, Tensor indices) -> Tensor");
  // out[b, p // W, p % W] = values[b, j] (accumulate: out + values, rounded like torch's a + b).
  m.def("put_rows_(Tensor(a!) out, Tensor indices, Tensor values, bool accumulate) -> ()");
  // New contiguous (B, H, W, C): values[b, r] * gamma + shortcut[b, p] (the product rounded
  // first, as torch's two ops) where r = row_of[b, p] is in [0, k), zero elsewhere. shortcut
  // (B, H, W, C) any strides; row_of (B, H*W) int32 (hierarchical.kept_row_map); values (B, k, C).
  // CPU only: the CUDA backend composes the row ops.
  m.def("masked_residual(Tensor shortcut, Tensor row_of, Tensor values, Tensor? gamma) -> Tensor");
}
