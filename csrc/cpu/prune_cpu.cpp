// CPU kernel of papr_kernels::prune_forward / prune_backward on top of csrc/papr_core.h.
// Phase 1 (parallel over rows): channel mean and resize in float64, one rounding to float32,
// rank -> indices.
// Phase 2 (parallel over token tiles of all rows): memcpy of whole token rows.
// Threads: torch::stable::parallel_for, i.e. torch's own pool and torch.set_num_threads.

#include <algorithm>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

#include "../papr_core.h"
#include "../ops/prune_args.h"
#include "../stable.h"

namespace papr {
namespace {

constexpr int kSpatialTile = 64;
constexpr int64_t kCopyGrainBytes = 256 * 1024;   // bytes of token rows per parallel chunk
constexpr int64_t kMeanParallelBytes = 1 << 20;   // below this, one row's mean stays on one thread

// Taps of every output coordinate along each grid dimension; identical for all rows.
struct Taps {
  int ntap = 0;                   // 4 (bicubic) or 2 (linear)
  std::vector<int64_t> idx[3];    // [d][o * ntap + j]
  std::vector<double> w[3];
};

Taps make_taps(const ForwardShape& s, bool align_corners) {
  Taps t;
  t.ntap = s.dims == 2 ? 4 : 2;
  for (int d = 0; d < s.dims; ++d) {
    t.idx[d].resize(s.out[d] * t.ntap);
    t.w[d].resize(s.out[d] * t.ntap);
    for (int64_t o = 0; o < s.out[d]; ++o) {
      if (s.dims == 2)
        cubic_taps(s.in[d], s.out[d], align_corners, o, &t.idx[d][o * 4], &t.w[d][o * 4]);
      else
        linear_taps(s.in[d], s.out[d], align_corners, o, &t.idx[d][o * 2], &t.w[d][o * 2]);
    }
  }
  return t;
}

// Channel mean of positions [s0, s1) of one row: the header's fp64 channel_sum, tile by tile.
template <typename T>
inline __attribute__((always_inline)) void row_mean(const T* f_row, int64_t K, int64_t S, int64_t s0, int64_t s1, double* mean) {
  double acc[kSpatialTile];
  for (int64_t t = s0; t < s1; t += kSpatialTile) {
    const int len = static_cast<int>(std::min<int64_t>(kSpatialTile, s1 - t));
    channel_sum(f_row, S, 0, K, t, len, acc);
    for (int j = 0; j < len; ++j) mean[t + j] = mean_from_sum(acc[j], K);
  }
}

// fp32 f, the common case: the same arithmetic, compiled twice (AVX2 and baseline x86-64) and
// picked at load time. Vectorisation runs across positions; each position's sum keeps its order.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
__attribute__((target_clones("avx2", "default")))
#endif
void row_mean_f32(const float* f_row, int64_t K, int64_t S, int64_t s0, int64_t s1, double* mean) {
  row_mean(f_row, K, S, s0, s1, mean);
}

template <typename T>
void mean_of_row(const T* f_row, int64_t K, int64_t S, int64_t s0, int64_t s1, double* mean) {
  if constexpr (std::is_same_v<T, float>) row_mean_f32(f_row, K, S, s0, s1, mean);
  else row_mean(f_row, K, S, s0, s1, mean);
}

// Keys of one row from its channel mean.
void row_keys(const double* mean, const ForwardShape& s, const Taps& t, uint64_t* keys) {
  int64_t i = 0;
  if (s.dims == 2) {
    const int64_t H = s.out[0], W = s.out[1];
    for (int64_t oy = 0; oy < H; ++oy)
      for (int64_t ox = 0; ox < W; ++ox, ++i)
        keys[i] = rank_key(bicubic_at(mean, s.in[1], &t.idx[0][oy * 4], &t.w[0][oy * 4],
                                      &t.idx[1][ox * 4], &t.w[1][ox * 4]), i);
  } else {
    for (int64_t ot = 0; ot < s.out[0]; ++ot)
      for (int64_t oy = 0; oy < s.out[1]; ++oy)
        for (int64_t ox = 0; ox < s.out[2]; ++ox, ++i)
          keys[i] = rank_key(trilinear_at(mean, s.in[1], s.in[2], &t.idx[0][ot * 2], &t.w[0][ot * 2],
                                          &t.idx[1][oy * 2], &t.w[1][oy * 2], &t.idx[2][ox * 2],
                                          &t.w[2][ox * 2]), i);
  }
}

// The k largest keys -> indices in rank order or ascending.
void select_row(uint64_t* keys, int64_t N, int64_t k, bool spatial, int64_t* out) {
  if (k < N) std::nth_element(keys, keys + (k - 1), keys + N, std::greater<uint64_t>());
  if (!spatial) {
    std::sort(keys, keys + k, std::greater<uint64_t>());
    for (int64_t j = 0; j < k; ++j) out[j] = key_index(keys[j]);
  } else {
    for (int64_t j = 0; j < k; ++j) out[j] = key_index(keys[j]);
    std::sort(out, out + k);
  }
}

template <typename T>
void select_rows(const Tensor& f, const ForwardShape& s, bool align_corners, bool spatial,
                 int64_t* indices) {
  const Taps taps = make_taps(s, align_corners);
  const T* fp = reinterpret_cast<const T*>(f.const_data_ptr());
  const int64_t f_row = s.K * s.S;
  const int64_t row_bytes = f_row * static_cast<int64_t>(sizeof(T));
  const int64_t threads = static_cast<int64_t>(torch::stable::get_num_threads());
  if (s.B >= threads || row_bytes < kMeanParallelBytes) {  // one thread per row
    torch::stable::parallel_for(0, s.B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<double> mean(s.S);
      std::vector<uint64_t> keys(s.N);
      for (int64_t b = b0; b < b1; ++b) {
        mean_of_row(fp + b * f_row, s.K, s.S, 0, s.S, mean.data());
        row_keys(mean.data(), s, taps, keys.data());
        select_row(keys.data(), s.N, s.k, spatial, indices + b * s.k);
      }
    });
    return;
  }
  // Few rows (B = 1 latency): the channel mean, the bulk of the work, split over positions. The
  // result does not depend on the thread count (each position's sum is computed whole).
  std::vector<double> mean(s.S);
  std::vector<uint64_t> keys(s.N);
  const int64_t grain = std::max<int64_t>(8, (s.S + threads - 1) / threads);
  for (int64_t b = 0; b < s.B; ++b) {
    torch::stable::parallel_for(0, s.S, grain, [&](int64_t s0, int64_t s1) {
      mean_of_row(fp + b * f_row, s.K, s.S, s0, s1, mean.data());
    });
    row_keys(mean.data(), s, taps, keys.data());
    select_row(keys.data(), s.N, s.k, spatial, indices + b * s.k);
  }
}

void compute_indices(const Tensor& f, const ForwardShape& s, bool align_corners, bool spatial,
                     int64_t* indices) {
  switch (f.scalar_type()) {
    case ScalarType::Float: return select_rows<float>(f, s, align_corners, spatial, indices);
    case ScalarType::Double: return select_rows<double>(f, s, align_corners, spatial, indices);
    case ScalarType::Half: return select_rows<f16>(f, s, align_corners, spatial, indices);
    case ScalarType::BFloat16: return select_rows<bf16>(f, s, align_corners, spatial, indices);
    default: fail("papr_kernels: f must be float16, bfloat16, float32 or float64");
  }
}

int64_t copy_grain(int64_t token_bytes) {
  return std::max<int64_t>(1, kCopyGrainBytes / std::max<int64_t>(1, token_bytes));
}

std::tuple<Tensor, Tensor> prune_forward_cpu(const Tensor& x_in, const Tensor& f_in, int64_t P,
                                             std::vector<int64_t> grid, int64_t keep,
                                             bool align_corners, bool spatial) {
  const ForwardShape s = check_forward(x_in, f_in, P, grid, keep);
  const Tensor x = tokens_contiguous(x_in);
  const Tensor f = as_contiguous(f_in);
  Tensor out = empty_on(x, {s.B, P + s.k, s.C});
  Tensor indices = empty_on(x, {s.B, s.k}, ScalarType::Long);
  if (s.B == 0) return {out, indices};
  int64_t* idx = indices.mutable_data_ptr<int64_t>();
  compute_indices(f, s, align_corners, spatial, idx);

  const int64_t es = x.element_size();
  const int64_t token_bytes = s.C * es;
  const int64_t sb = x.stride(0) * es, sn = x.stride(1) * es;
  const char* xp = static_cast<const char*>(x.const_data_ptr());
  char* op = static_cast<char*>(out.mutable_data_ptr());
  const int64_t rows_out = P + s.k;
  torch::stable::parallel_for(0, s.B * rows_out, copy_grain(token_bytes), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / rows_out, j = t - b * rows_out;
      const int64_t src = gather_source(j, P, idx + b * s.k);
      std::memcpy(op + t * token_bytes, xp + b * sb + src * sn, token_bytes);
    }
  });
  return {out, indices};
}

Tensor prune_backward_cpu(const Tensor& grad_out_in, const Tensor& indices_in, int64_t num_tokens,
                          int64_t P) {
  check_backward(grad_out_in, indices_in, num_tokens, P);
  const Tensor g = tokens_contiguous(grad_out_in);
  const Tensor indices = as_contiguous(indices_in);
  const int64_t B = g.size(0), C = g.size(2), k = indices.size(1), N = num_tokens - P;
  // Zero-filled by ATen's fill (first touch of fresh pages is the cost on CPU, and a plain fill
  // pays it fastest), then one memcpy per kept row: each index is unique, so no atomics.
  Tensor grad_x = zeros_on(g, {B, num_tokens, C});
  if (B == 0) return grad_x;
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < B * k; ++t)
    PAPR_CHECK(idx[t] >= 0 && idx[t] < N, "papr_kernels: index ", idx[t], " outside [0, ", N, ")");
  const int64_t es = g.element_size();
  const int64_t token_bytes = C * es;
  const int64_t sb = g.stride(0) * es, sn = g.stride(1) * es;
  const char* gp = static_cast<const char*>(g.const_data_ptr());
  char* xp = static_cast<char*>(grad_x.mutable_data_ptr());
  const int64_t rows_out = P + k;
  torch::stable::parallel_for(0, B * rows_out, copy_grain(token_bytes), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / rows_out, j = t - b * rows_out;
      const int64_t dst = gather_source(j, P, idx + b * k);
      std::memcpy(xp + (b * num_tokens + dst) * token_bytes, gp + b * sb + j * sn, token_bytes);
    }
  });
  return grad_x;
}

}  // namespace
}  // namespace papr

STABLE_TORCH_LIBRARY_IMPL(papr_kernels, CPU, m) {
  m.impl("prune_forward", TORCH_BOX(&papr::prune_forward_cpu));
  m.impl("prune_backward", TORCH_BOX(&papr::prune_backward_cpu));
}
