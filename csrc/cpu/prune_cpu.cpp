// CPU kernel of papr_kernels::prune_forward / prune_backward on top of csrc/papr_core.h.
// Phase 1 (parallel over rows): channel mean and resize in float64, one rounding to float32,
// rank -> indices.
// Phase 2 (parallel over token tiles of all rows): memcpy of whole token rows.
// Threads: torch::stable::parallel_for, i.e. torch's own pool and torch.set_num_threads.

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "../papr_core.h"
#include "../ops/prune_args.h"
#include "../stable.h"

namespace papr {
namespace {

constexpr int kSpatialTile = 64;
constexpr int64_t kCopyGrainBytes = 256 * 1024;   // bytes of token rows per parallel chunk
constexpr int64_t kMeanParallelBytes = 1 << 20;   // below this, one row's mean stays on one thread
// Cache lines of the next kept row prefetched while copying one: its start, which the hardware
// prefetcher cannot guess (rows are read in rank order). ~10% off the gather at B = 64 here.
constexpr int kPrefetchLines = 8;

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
  double acc[kSpatialTile], lane[kSpatialTile];
  for (int64_t t = s0; t < s1; t += kSpatialTile) {
    const int len = static_cast<int>(std::min<int64_t>(kSpatialTile, s1 - t));
    channel_sum(f_row, K, S, t, len, acc, lane);
    for (int j = 0; j < len; ++j) mean[t + j] = mean_from_sum(acc[j], K);
  }
}

// The same for positions-major rows (S, K): position by position, channels contiguous.
template <typename T>
void row_mean_positions_major(const T* f_row, int64_t K, int64_t s0, int64_t s1, double* mean) {
  for (int64_t t = s0; t < s1; ++t) mean[t] = mean_from_sum(position_channel_sum(f_row + t * K, K), K);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define PAPR_AVX2_MEAN 1
// The same sums with AVX2: the additions are channel_sum's, in its order, so the results equal
// row_mean's bit for bit. Converting f to double is the bound (~4 elements a cycle).
namespace avx2 {
#define PAPR_AVX2 __attribute__((target("avx2,f16c"), always_inline)) inline

PAPR_AVX2 __m256d widen4(const float* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }
PAPR_AVX2 __m256d widen4(const bf16* p) {
  const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtps_pd(_mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16)));
}
PAPR_AVX2 __m256d widen4(const f16* p) {  // F16C: exact, subnormals included
  return _mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
// The last `lanes` (1..3) positions of a block: scalar loads, nothing read past them, and no trip
// through a stack array (a vector load of scalar stores stalls on store forwarding).
template <typename T>
PAPR_AVX2 __m256d widen_part(const T* p, int lanes) {
  return _mm256_setr_pd(to_double(p[0]), lanes > 1 ? to_double(p[1]) : 0.0,
                        lanes > 2 ? to_double(p[2]) : 0.0, 0.0);
}

// The 16 lanes' partial sums of a block of positions live in an L1-resident array, and f's rows
// are read in address order, row k added to lane k mod 16: one ascending stream, which the
// prefetchers follow when f comes from memory (B = 64: f is 12.8 MB). Visiting the rows lane by
// lane (several streams 16 rows apart) cost ~1.8x this when f was not in cache, as much when it was.
template <int V, typename T>
PAPR_AVX2 void add_row(const T* p, int tail, double* lane) {
  for (int v = 0; v < V; ++v)
    _mm256_store_pd(lane + 4 * v, _mm256_add_pd(_mm256_load_pd(lane + 4 * v), widen4(p + 4 * v)));
  if (tail) {
    const __m256d part = widen_part(p + 4 * V, tail);
    _mm256_store_pd(lane + 4 * V, _mm256_add_pd(_mm256_load_pd(lane + 4 * V), part));
  }
}

// Positions [s0, s0 + 4 * V + tail), tail < 4.
template <int V, typename T>
__attribute__((target("avx2,f16c"))) void mean_block(const T* f_row, int64_t K, int64_t S,
                                                     int64_t s0, int tail, double* mean) {
  alignas(32) double lanes[kChannelLanes][4 * (V + 1)] = {};
  const T* base = f_row + s0;
  int64_t k0 = 0;
  for (; k0 + kChannelLanes <= K; k0 += kChannelLanes)
    for (int l = 0; l < kChannelLanes; ++l) add_row<V>(base + (k0 + l) * S, tail, lanes[l]);
  for (int64_t k = k0; k < K; ++k) add_row<V>(base + k * S, tail, lanes[k - k0]);
  const __m256d count = _mm256_set1_pd(static_cast<double>(K));  // mean_from_sum: sum / K
  for (int v = 0; v <= V; ++v) {
    __m256d total = _mm256_setzero_pd();
    for (int64_t l = 0; l < kChannelLanes && l < K; ++l)
      total = _mm256_add_pd(total, _mm256_load_pd(lanes[l] + 4 * v));
    alignas(32) double out[4];
    _mm256_store_pd(out, _mm256_div_pd(total, count));
    const int n = v < V ? 4 : tail;
    for (int j = 0; j < n; ++j) mean[s0 + 4 * v + j] = out[j];
  }
}

constexpr int kMaxRegs = 12;

template <typename T, size_t... V>
void mean_tail_block(const T* f_row, int64_t K, int64_t S, int64_t s0, int64_t len, double* mean,
                     std::index_sequence<V...>) {
  ((len / 4 == static_cast<int64_t>(V) ? mean_block<V>(f_row, K, S, s0, len % 4, mean) : void()), ...);
}

template <typename T>
void row_mean(const T* f_row, int64_t K, int64_t S, int64_t s0, int64_t s1, double* mean) {
  int64_t t = s0;
  for (; s1 - t >= 4 * kMaxRegs + 4; t += 4 * kMaxRegs) mean_block<kMaxRegs>(f_row, K, S, t, 0, mean);
  mean_tail_block(f_row, K, S, t, s1 - t, mean, std::make_index_sequence<kMaxRegs + 1>{});
}
// Positions-major rows (S, K): a position's 16 lanes are 4 registers (channels c .. c + 15 of
// one 16-channel step, contiguous); the tail channels (K % 16) and the sum over lanes are scalar,
// in lane order. One position at a time reads f as one ascending stream: 2-3 positions at once
// (more independent additions in flight, but 2-3 streams 4 KB apart) was ~1.7x slower when f came
// from memory, and no faster when it was in cache.
template <typename T>
__attribute__((target("avx2,f16c"))) double position_sum(const T* at, int64_t K) {
  __m256d lane[4];
  for (int q = 0; q < 4; ++q) lane[q] = _mm256_setzero_pd();
  const int64_t whole = K - K % kChannelLanes;
  for (int64_t c = 0; c < whole; c += kChannelLanes)
    for (int q = 0; q < 4; ++q) lane[q] = _mm256_add_pd(lane[q], widen4(at + c + 4 * q));
  alignas(32) double sums[kChannelLanes];
  for (int q = 0; q < 4; ++q) _mm256_store_pd(sums + 4 * q, lane[q]);
  for (int64_t c = whole; c < K; ++c) sums[c - whole] += to_double(at[c]);
  return lanes_total(sums, K);
}

template <typename T>
void row_mean_positions_major(const T* f_row, int64_t K, int64_t s0, int64_t s1, double* mean) {
  for (int64_t t = s0; t < s1; ++t) mean[t] = mean_from_sum(position_sum(f_row + t * K, K), K);
}
#undef PAPR_AVX2
}  // namespace avx2

// PAPR_KERNELS_NO_SIMD=1 (read once) forces the portable loop: tests compare the two paths.
bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
                          std::getenv("PAPR_KERNELS_NO_SIMD") == nullptr;
  return yes;
}
#endif

// Channel mean of positions [s0, s1) of batch row f_row: (K, S) contiguous, or (S, K) when
// positions_major; every path adds in channel_sum's order.
template <typename T>
void mean_of_row(const T* f_row, int64_t K, int64_t S, bool positions_major, int64_t s0,
                 int64_t s1, double* mean) {
#ifdef PAPR_AVX2_MEAN
  if constexpr (!std::is_same_v<T, double>) {
    if (has_avx2()) {
      if (positions_major) return avx2::row_mean_positions_major(f_row, K, s0, s1, mean);
      return avx2::row_mean(f_row, K, S, s0, s1, mean);
    }
  }
#endif
  if (positions_major) return row_mean_positions_major(f_row, K, s0, s1, mean);
  row_mean(f_row, K, S, s0, s1, mean);
}

// Scratch of row_keys: one value per (source row, output column) of a 2-D map.
int64_t rows_size(const ForwardShape& s) { return s.dims == 2 ? s.in[0] * s.out[1] : 0; }

// Keys of one row from its channel mean. Bicubic runs separably: `rows` holds cubic_row of every
// (source row, output column), then each output combines four of them (the header's order).
void row_keys(const double* mean, const ForwardShape& s, const Taps& t, double* rows, uint64_t* keys) {
  int64_t i = 0;
  if (s.dims == 2) {
    const int64_t H = s.out[0], W = s.out[1], h = s.in[0], w = s.in[1];
    for (int64_t y = 0; y < h; ++y)
      for (int64_t ox = 0; ox < W; ++ox)
        rows[y * W + ox] = cubic_row(mean + y * w, &t.idx[1][ox * 4], &t.w[1][ox * 4]);
    for (int64_t oy = 0; oy < H; ++oy) {
      const int64_t* iy = &t.idx[0][oy * 4];
      for (int64_t ox = 0; ox < W; ++ox, ++i) {
        const double taps[4] = {rows[iy[0] * W + ox], rows[iy[1] * W + ox], rows[iy[2] * W + ox],
                                rows[iy[3] * W + ox]};
        keys[i] = rank_key(cubic_combine(taps, &t.w[0][oy * 4]), i);
      }
    }
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

// Called with a batch row as soon as its indices are written, on the thread that chose them.
using RowDone = std::function<void(int64_t)>;

// Indices of every batch row. Returns whether row_done ran for each row: it does when rows are
// spread over threads (one thread chooses a row and goes on with its copy, so one thread's copy
// overlaps the other's channel mean); it does not in the few-rows path, which splits each row's
// mean over positions, and the caller then copies all rows at once.
template <typename T>
bool select_rows(const Tensor& f, const ForwardShape& s, bool align_corners, bool spatial,
                 int64_t* indices, const RowDone& row_done) {
  const Taps taps = make_taps(s, align_corners);
  const T* fp = reinterpret_cast<const T*>(f.const_data_ptr());
  const int64_t f_row = s.K * s.S;
  const int64_t row_bytes = f_row * static_cast<int64_t>(sizeof(T));
  const int64_t threads = static_cast<int64_t>(torch::stable::get_num_threads());
  const bool by_position = positions_major(f);   // (S, K) rows, else (K, S) rows
  if (s.B >= threads || row_bytes < kMeanParallelBytes) {  // one thread per row
    torch::stable::parallel_for(0, s.B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<double> mean(s.S), rows(rows_size(s));
      std::vector<uint64_t> keys(s.N);
      for (int64_t b = b0; b < b1; ++b) {
        mean_of_row(fp + b * f_row, s.K, s.S, by_position, 0, s.S, mean.data());
        row_keys(mean.data(), s, taps, rows.data(), keys.data());
        select_row(keys.data(), s.N, s.k, spatial, indices + b * s.k);
        row_done(b);
      }
    });
    return true;
  }
  // Few rows (B = 1 latency): the channel mean, the bulk of the work, split over positions. The
  // result does not depend on the thread count (each position's sum is computed whole).
  std::vector<double> mean(s.S), rows(rows_size(s));
  std::vector<uint64_t> keys(s.N);
  const int64_t grain = std::max<int64_t>(8, (s.S + threads - 1) / threads);
  for (int64_t b = 0; b < s.B; ++b) {
    torch::stable::parallel_for(0, s.S, grain, [&](int64_t s0, int64_t s1) {
      mean_of_row(fp + b * f_row, s.K, s.S, by_position, s0, s1, mean.data());
    });
    row_keys(mean.data(), s, taps, rows.data(), keys.data());
    select_row(keys.data(), s.N, s.k, spatial, indices + b * s.k);
  }
  return false;
}

bool compute_indices(const Tensor& f, const ForwardShape& s, bool align_corners, bool spatial,
                     int64_t* indices, const RowDone& row_done) {
  switch (f.scalar_type()) {
    case ScalarType::Float: return select_rows<float>(f, s, align_corners, spatial, indices, row_done);
    case ScalarType::Double: return select_rows<double>(f, s, align_corners, spatial, indices, row_done);
    case ScalarType::Half: return select_rows<f16>(f, s, align_corners, spatial, indices, row_done);
    case ScalarType::BFloat16: return select_rows<bf16>(f, s, align_corners, spatial, indices, row_done);
    default: fail("papr_kernels: f must be float16, bfloat16, float32 or float64");
  }
  return false;
}

template <typename T>
void channel_means(const Tensor& f, int64_t S, double* out) {
  const T* fp = reinterpret_cast<const T*>(f.const_data_ptr());
  const int64_t B = f.size(0), K = f.size(1);
  const bool by_position = positions_major(f);
  // rows x position blocks of 64, each block's mean computed whole (thread-count independent)
  const int64_t blocks = (S + kSpatialTile - 1) / kSpatialTile;
  torch::stable::parallel_for(0, B * blocks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / blocks, s0 = (i % blocks) * kSpatialTile;
      mean_of_row(fp + b * K * S, K, S, by_position, s0, std::min(S, s0 + kSpatialTile),
                  out + b * S);
    }
  });
}

Tensor channel_mean_cpu(const Tensor& f_in) {
  const int64_t S = check_channel_mean(f_in);
  const Tensor f = features_as_read(f_in);
  Tensor out = empty_mean(f);
  if (f.size(0) == 0 || S == 0) return out;
  double* op = out.mutable_data_ptr<double>();
  switch (f.scalar_type()) {
    case ScalarType::Float: channel_means<float>(f, S, op); break;
    case ScalarType::Double: channel_means<double>(f, S, op); break;
    case ScalarType::Half: channel_means<f16>(f, S, op); break;
    default: channel_means<bf16>(f, S, op); break;
  }
  return out;
}

int64_t copy_grain(int64_t token_bytes) {
  return std::max<int64_t>(1, kCopyGrainBytes / std::max<int64_t>(1, token_bytes));
}

// Output tokens [t0, t1) (flat over batch rows): prefix tokens, then kept patches in index order.
struct TokenGather {
  const char* x;
  char* out;
  const int64_t* idx;
  int64_t P, k, token_bytes, sb, sn;

  const char* source(int64_t t) const {
    const int64_t rows_out = P + k, b = t / rows_out;
    return x + b * sb + gather_source(t - b * rows_out, P, idx + b * k) * sn;
  }

  void operator()(int64_t t0, int64_t t1) const {
    const int64_t prefetch_bytes = std::min<int64_t>(kPrefetchLines * 64, token_bytes);
    for (int64_t t = t0; t < t1; ++t) {
      if (t + 1 < t1) {  // the next row's head: kept rows come in rank order, not address order
        const char* next = source(t + 1);
        for (int64_t l = 0; l < prefetch_bytes; l += 64) __builtin_prefetch(next + l);
      }
      std::memcpy(out + t * token_bytes, source(t), token_bytes);
    }
  }
};

std::tuple<Tensor, Tensor> prune_forward_cpu(const Tensor& x_in, const Tensor& f_in, int64_t P,
                                             std::vector<int64_t> grid, int64_t keep,
                                             bool align_corners, bool spatial) {
  const ForwardShape s = check_forward(x_in, f_in, P, grid, keep);
  const Tensor x = tokens_contiguous(x_in);
  const Tensor f = features_as_read(f_in);
  Tensor out = empty_on(x, {s.B, P + s.k, s.C});
  Tensor indices = empty_on(x, {s.B, s.k}, ScalarType::Long);
  if (s.B == 0) return {out, indices};
  int64_t* idx = indices.mutable_data_ptr<int64_t>();
  const int64_t es = x.element_size();
  const TokenGather gather{static_cast<const char*>(x.const_data_ptr()),
                           static_cast<char*>(out.mutable_data_ptr()), idx, P, s.k, s.C * es,
                           x.stride(0) * es, x.stride(1) * es};
  const int64_t rows_out = P + s.k;
  const bool copied = compute_indices(f, s, align_corners, spatial, idx, [&](int64_t b) {
    gather(b * rows_out, (b + 1) * rows_out);
  });
  if (!copied)
    torch::stable::parallel_for(0, s.B * rows_out, copy_grain(gather.token_bytes),
                                [&](int64_t t0, int64_t t1) { gather(t0, t1); });
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
  m.impl("channel_mean", TORCH_BOX(&papr::channel_mean_cpu));
}
