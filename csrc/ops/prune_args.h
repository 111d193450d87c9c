// Host-side argument checks and shape plan shared by the CPU and CUDA glue (torch headers OK here,
// never included by a .cu file). The Python layer (validation.py) has already checked the user's
// arguments; these checks keep direct torch.ops calls from reading out of bounds.
#pragma once
#include <ATen/ATen.h>
#include <cstdint>

namespace papr {

struct ForwardShape {
  int64_t B, n, C, P, N, k, K, S;
  int dims;              // 2 (bicubic) or 3 (trilinear)
  int64_t in[3], out[3]; // spatial sizes of f and of the token grid (first `dims` entries)
};

inline ForwardShape check_forward(const at::Tensor& x, const at::Tensor& f, int64_t P,
                                  at::IntArrayRef grid, int64_t keep) {
  TORCH_CHECK(x.dim() == 3, "papr_kernels: x must be 3-D (B, n, C), got ", x.sizes());
  TORCH_CHECK(f.dim() == 4 || f.dim() == 5, "papr_kernels: f must be 4-D or 5-D, got ", f.sizes());
  TORCH_CHECK(static_cast<int64_t>(grid.size()) == f.dim() - 2,
              "papr_kernels: grid must have f.dim() - 2 entries");
  TORCH_CHECK(x.size(0) == f.size(0), "papr_kernels: batch of x and f differ");
  TORCH_CHECK(x.device() == f.device(), "papr_kernels: x and f must be on one device");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) && at::isFloatingType(f.scalar_type()),
              "papr_kernels: x and f must be floating");
  ForwardShape s{};
  s.B = x.size(0); s.n = x.size(1); s.C = x.size(2); s.P = P; s.N = s.n - P; s.k = keep;
  s.K = f.size(1); s.dims = static_cast<int>(grid.size());
  TORCH_CHECK(P >= 0 && P < s.n, "papr_kernels: num_prefix_tokens must be in [0, n)");
  int64_t prod = 1;
  s.S = 1;
  for (int d = 0; d < s.dims; ++d) {
    s.out[d] = grid[d];
    s.in[d] = f.size(2 + d);
    TORCH_CHECK(s.out[d] > 0 && s.in[d] > 0, "papr_kernels: empty grid or f");
    prod *= s.out[d];
    s.S *= s.in[d];
  }
  TORCH_CHECK(prod == s.N, "papr_kernels: prod(grid) must equal n - num_prefix_tokens");
  TORCH_CHECK(s.N < (int64_t(1) << 32), "papr_kernels: at most 2^32 - 1 patch tokens");
  TORCH_CHECK(keep >= 1 && keep <= s.N, "papr_kernels: keep must be in [1, N]");
  TORCH_CHECK(s.K > 0 && s.C > 0, "papr_kernels: zero channels");
  return s;
}

inline void check_backward(const at::Tensor& grad_out, const at::Tensor& indices,
                           int64_t num_tokens, int64_t P) {
  TORCH_CHECK(grad_out.dim() == 3 && indices.dim() == 2, "papr_kernels: bad grad_out/indices rank");
  TORCH_CHECK(indices.scalar_type() == at::kLong, "papr_kernels: indices must be int64");
  TORCH_CHECK(indices.size(0) == grad_out.size(0) && grad_out.size(1) == P + indices.size(1),
              "papr_kernels: grad_out must be (B, P + k, C) for indices (B, k)");
  TORCH_CHECK(P >= 0 && P + indices.size(1) <= num_tokens, "papr_kernels: bad num_tokens");
  TORCH_CHECK(grad_out.device() == indices.device(), "papr_kernels: device mismatch");
}

// x viewed with a unit channel stride (a copy only when x is not), so a token is one byte run.
inline at::Tensor tokens_contiguous(const at::Tensor& x) {
  return (x.stride(2) == 1 || x.size(2) == 1) ? x : x.contiguous();
}

}  // namespace papr
