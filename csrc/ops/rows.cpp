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
}
