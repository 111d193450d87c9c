// Host-side argument checks and shape plan shared by the CPU and CUDA glue (stable-ABI headers
// only, never included by a .cu file). The Python layer (spec.py) has already checked the user's
// arguments; these checks keep direct torch.ops calls from reading out of bounds.
#pragma once
#include <cstdint>
#include <vector>

#include "../stable.h"

namespace papr {

struct ForwardShape {
  int64_t B, n, C, P, N, k, K, S;
  int dims;              // 2 (bicubic) or 3 (trilinear)
  int64_t in[3], out[3]; // spatial sizes of f and of the token grid (first `dims` entries)
};

inline ForwardShape check_forward(const Tensor& x, const Tensor& f, int64_t P,
                                  const std::vector<int64_t>& grid, int64_t keep) {
  PAPR_CHECK(x.dim() == 3, "papr_kernels: x must be 3-D (B, n, C), got ", sizes_of(x));
  PAPR_CHECK(f.dim() == 4 || f.dim() == 5, "papr_kernels: f must be 4-D or 5-D, got ", sizes_of(f));
  PAPR_CHECK(static_cast<int64_t>(grid.size()) == f.dim() - 2,
             "papr_kernels: grid must have f.dim() - 2 entries");
  PAPR_CHECK(x.size(0) == f.size(0), "papr_kernels: batch of x and f differ");
  PAPR_CHECK(same_device(x, f), "papr_kernels: x and f must be on one device");
  PAPR_CHECK(is_float_type(x.scalar_type()) && is_float_type(f.scalar_type()),
             "papr_kernels: x and f must be float16, bfloat16, float32 or float64");
  ForwardShape s{};
  s.B = x.size(0); s.n = x.size(1); s.C = x.size(2); s.P = P; s.N = s.n - P; s.k = keep;
  s.K = f.size(1); s.dims = static_cast<int>(grid.size());
  PAPR_CHECK(P >= 0 && P < s.n, "papr_kernels: num_prefix_tokens must be in [0, n)");
  int64_t prod = 1;
  s.S = 1;
  for (int d = 0; d < s.dims; ++d) {
    s.out[d] = grid[d];
    s.in[d] = f.size(2 + d);
    PAPR_CHECK(s.out[d] > 0 && s.in[d] > 0, "papr_kernels: empty grid or f");
    prod *= s.out[d];
    s.S *= s.in[d];
  }
  PAPR_CHECK(prod == s.N, "papr_kernels: prod(grid) must equal n - num_prefix_tokens");
  PAPR_CHECK(s.N < (int64_t(1) << 32), "papr_kernels: at most 2^32 - 1 patch tokens");
  PAPR_CHECK(keep >= 1 && keep <= s.N, "papr_kernels: keep must be in [1, N]");
  PAPR_CHECK(s.K > 0 && s.C > 0, "papr_kernels: zero channels");
  return s;
}

inline void check_backward(const Tensor& grad_out, const Tensor& indices, int64_t num_tokens,
                           int64_t P) {
  PAPR_CHECK(grad_out.dim() == 3 && indices.dim() == 2, "papr_kernels: bad grad_out/indices rank");
  PAPR_CHECK(indices.scalar_type() == ScalarType::Long, "papr_kernels: indices must be int64");
  PAPR_CHECK(indices.size(0) == grad_out.size(0) && grad_out.size(1) == P + indices.size(1),
             "papr_kernels: grad_out must be (B, P + k, C) for indices (B, k)");
  PAPR_CHECK(P >= 0 && P + indices.size(1) <= num_tokens, "papr_kernels: bad num_tokens");
  PAPR_CHECK(same_device(grad_out, indices), "papr_kernels: device mismatch");
}

// x viewed with a unit channel stride (a copy only when x is not), so a token is one byte run.
inline Tensor tokens_contiguous(const Tensor& x) {
  return (x.stride(2) == 1 || x.size(2) == 1) ? x : as_contiguous(x);
}

// f of channel_mean: (B, K, *spatial) with 2 or 3 spatial dims, K >= 1, a float dtype.
// Returns S (the spatial size).
inline int64_t check_channel_mean(const Tensor& f) {
  PAPR_CHECK(f.dim() == 4 || f.dim() == 5, "papr_kernels: f must be 4-D or 5-D, got ", sizes_of(f));
  PAPR_CHECK(is_float_type(f.scalar_type()),
             "papr_kernels: f must be float16, bfloat16, float32 or float64");
  PAPR_CHECK(f.size(1) > 0, "papr_kernels: f has no channels");
  int64_t S = 1;
  for (int64_t d = 2; d < f.dim(); ++d) S *= f.size(d);
  return S;
}

// channel_mean's result: (B, 1, *spatial) float64, contiguous, on f's device.
inline Tensor empty_mean(const Tensor& f) {
  if (f.dim() == 4) return empty_on(f, {f.size(0), 1, f.size(2), f.size(3)}, ScalarType::Double);
  return empty_on(f, {f.size(0), 1, f.size(2), f.size(3), f.size(4)}, ScalarType::Double);
}

// f laid out positions-major: each batch row an (S, K) matrix, channels innermost (what a
// channels_last / channels_last_3d proposal network returns). Both kernels read such f as it is,
// channels contiguous (CPU: a position's 16 lanes of channel_sum in 4 AVX2 registers; CUDA: the
// mean kernel's threads laid over channels), instead of ATen's copy of the whole tensor to NCHW.
inline bool positions_major(const Tensor& f) {
  const int64_t K = f.size(1);
  int64_t expected = K, S = 1;
  for (int64_t d = f.dim() - 1; d >= 2; --d) {
    if (f.size(d) != 1 && f.stride(d) != expected) return false;
    expected *= f.size(d);
    S *= f.size(d);
  }
  return K > 1 && S > 1 && f.stride(1) == 1 && (f.size(0) == 1 || f.stride(0) == expected);
}

// f as the kernels read it: positions-major as it is, anything else as contiguous (B, K, S).
inline Tensor features_as_read(const Tensor& f) {
  return positions_major(f) ? f : as_contiguous(f);
}

}  // namespace papr
