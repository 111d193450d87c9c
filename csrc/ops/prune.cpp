// Schemas of the pruning ops. Argument checks shared by the kernels: prune_args.h (beside this
// file). Kernels: csrc/cpu/prune_cpu.cpp (CPU), csrc/cuda/prune_cuda.cpp (CUDA, in the companion
// library papr_kernels._C_cuda). Fake (meta) kernels and autograd: papr_kernels/ops/extension.py
// and papr_kernels/api.py.
#include "../stable.h"

STABLE_TORCH_LIBRARY(papr_kernels, m) {
  // Select (SPEC's total order) + gather. Returns (out (B, P + keep, C), indices (B, keep) int64).
  m.def("prune_forward(Tensor x, Tensor f, int num_prefix_tokens, int[] grid, int keep, "
        "bool align_corners, bool spatial) -> (Tensor, Tensor)");
  // Gradient of the gather: grad_out rows put back at the kept positions, zeros elsewhere.
  m.def("prune_backward(Tensor grad_out, Tensor indices, int num_tokens, int num_prefix_tokens) "
        "-> Tensor");
  // f's float64 channel mean (B, 1, *spatial), summed in papr_core.h's channel_sum order: the
  // proposal map of the hierarchical models, the same bits as the mean inside prune_forward.
  m.def("channel_mean(Tensor f) -> Tensor");
}
