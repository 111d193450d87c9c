// PaPr per-row algorithm, written once: compiled as host code by g++ (csrc/cpu) and as
// __host__ __device__ code by nvcc (csrc/cuda). No torch headers here, so nvcc builds fast.
//
// SPEC.md, "Semantics" 1 and 3, in four steps:
//   1. + 2. scores in float64, rounded once to float32: the channel mean of f.double() (summed
//      in one fixed order, `channel_sum`, then divided by K like torch.mean), resized to the token grid
//      with PyTorch's CPU upsample formulas in double (area_pixel_compute_scale<double>, cubic
//      coefficients in double): bicubic (A = -0.75, clamped taps) for 4-D f, trilinear for 5-D f,
//      both align_corners modes, the operation order of aten/src/ATen/native/cpu/UpSampleKernel.cpp
//      (upsample_generic_Nd); then one rounding to float32. Where torch's compiled code sums or
//      weighs differently (a few float64 ULP), the rounding erases it, so the scores equal the
//      reference's bit for bit except for a value within a few float64 ULP of a float32 rounding
//      boundary; a constant region of f gives exactly equal scores. The CPU and CUDA kernels share
//      this arithmetic exactly;
//   3. total order: descending score, ties to the lower index, -0.0 == +0.0, NaN as -inf,
//      encoded as one unique uint64 key per patch (larger key = ranked first);
//   4. gather / scatter of whole token rows (dtype-agnostic byte copies).
// The compile must not contract a*b+c into an FMA (nvcc: --fmad=false; g++: -ffp-contract=off,
// which matters where the target has FMA, e.g. aarch64), or CPU and CUDA scores drift apart.
#pragma once
#include <stdint.h>
#include <math.h>

#if defined(__CUDACC__)
#define PAPR_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define PAPR_HD inline __attribute__((always_inline))  // inlined into the CPU's AVX2 clone too
#else
#define PAPR_HD inline
#endif

namespace papr {

// ---- element types of f ---------------------------------------------------------------------
struct f16 { uint16_t bits; };
struct bf16 { uint16_t bits; };
enum FType : int { kF16 = 0, kBF16 = 1, kF32 = 2, kF64 = 3 };

PAPR_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
#endif
}

PAPR_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return u;
#endif
}

PAPR_HD float to_float(float v) { return v; }
PAPR_HD float to_float(double v) { return static_cast<float>(v); }  // f.float() rounds first
PAPR_HD float to_float(bf16 v) { return bits_to_float(static_cast<uint32_t>(v.bits) << 16); }
PAPR_HD float to_float(f16 v) {
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  const uint32_t exp = (v.bits >> 10) & 0x1fu;
  const uint32_t mant = v.bits & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf / nan
  if (exp == 0) {                                                              // zero / subnormal
    const float mag = static_cast<float>(mant) * 5.9604644775390625e-08f;     // mant * 2^-24, exact
    return sign ? -mag : mag;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

// ---- 1. channel mean (float64) ---------------------------------------------------------------
// f.double(): every element type widens to double exactly (fp16/bf16 through their float value).
PAPR_HD double to_double(float v) { return static_cast<double>(v); }
PAPR_HD double to_double(double v) { return v; }
PAPR_HD double to_double(bf16 v) { return static_cast<double>(to_float(v)); }
PAPR_HD double to_double(f16 v) { return static_cast<double>(to_float(v)); }

// The one summation order of the float64 channel sum, on every backend (cpp, cuda, triton): the
// channels are dealt to kChannelLanes interleaved partial sums, lane j adding channels j,
// j + kChannelLanes, j + 2 kChannelLanes, ... in order from 0.0, and the partial sums are then
// added in lane order to 0.0. A GPU runs the lanes in parallel (16 independent chains per
// position); a CPU runs them one after another. One order means bit-identical means, so the
// same scores and the same tokens on CPU and GPU, ties included. For K <= kChannelLanes it is
// plain channel order (what torch's CPU mean does for small K).
constexpr int kChannelLanes = 16;

// Sum of the K channels at spatial positions [s0, s0 + len) of one row of f (K, S) contiguous,
// in float64, in the order above (the same at every position: a per-channel-constant map gives
// one sum everywhere). `lane` is scratch of len doubles.
template <typename T>
PAPR_HD void channel_sum(const T* f_row, int64_t K, int64_t S, int64_t s0, int len, double* acc,
                         double* lane) {
  for (int j = 0; j < len; ++j) acc[j] = 0.0;
  for (int64_t l = 0; l < kChannelLanes && l < K; ++l) {
    for (int j = 0; j < len; ++j) lane[j] = 0.0;
    for (int64_t k = l; k < K; k += kChannelLanes) {
      const T* p = f_row + k * S + s0;
      for (int j = 0; j < len; ++j) lane[j] += to_double(p[j]);
    }
    for (int j = 0; j < len; ++j) acc[j] += lane[j];
  }
}

// The last step of that order for one position: its lanes' partial sums added in lane order
// from 0.0 (only the first K lanes hold channels when K < kChannelLanes).
PAPR_HD double lanes_total(const double* lane, int64_t K) {
  double sum = 0.0;
  for (int j = 0; j < kChannelLanes && j < K; ++j) sum += lane[j];
  return sum;
}

// The same sum for one position of positions-major f (its K channels contiguous, as in
// channels_last f): lane j is channels j, j + 16, ... in order, the lanes then added in order.
template <typename T>
PAPR_HD double position_channel_sum(const T* channels, int64_t K) {
  double lane[kChannelLanes] = {};
  for (int64_t k = 0; k < K; ++k) lane[k % kChannelLanes] += to_double(channels[k]);
  return lanes_total(lane, K);
}

// torch CPU mean = sum (float64) .div_(K)
PAPR_HD double mean_from_sum(double sum, int64_t K) { return sum / static_cast<double>(K); }

// ---- 2. resize taps (PyTorch UpSample.h / UpSampleKernel.cpp arithmetic, opmath = double) -----
// area_pixel_compute_scale<double>
PAPR_HD double source_scale(int64_t in, int64_t out, bool align_corners) {
  if (align_corners)
    return out > 1 ? static_cast<double>(in - 1) / static_cast<double>(out - 1) : 0.0;
  return static_cast<double>(in) / static_cast<double>(out);
}

// area_pixel_compute_source_index<double>. PyTorch's CPU kernels are compiled with FMA
// contraction (AVX2/AVX-512 builds), so `scale * (dst + 0.5) - 0.5` is one fused multiply-add
// there: rounded once. It matters where the result should be an integer (e.g. 3 -> 9 taps):
// unfused it rounds to 0 and reads a tap the fused one does not (0 * inf = NaN).
PAPR_HD double source_index(double scale, int64_t dst, bool align_corners, bool cubic) {
  if (align_corners) return scale * static_cast<double>(dst);
  const double src = fma(scale, static_cast<double>(dst) + 0.5, -0.5);
  return (!cubic && src < 0.0) ? 0.0 : src;
}

// guard_index_and_lambda: torch floors with floorf, i.e. of the index rounded to float.
PAPR_HD void guard_index_and_lambda(double real, int64_t in, int64_t& idx, double& lambda) {
  idx = static_cast<int64_t>(floorf(static_cast<float>(real)));
  if (idx > in - 1) idx = in - 1;
  double l = real - static_cast<double>(idx);
  l = l < 0.0 ? 0.0 : l;        // std::max(l, 0)
  lambda = l > 1.0 ? 1.0 : l;   // std::min(., 1)
}

PAPR_HD double cubic1(double x, double A) { return ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0; }
PAPR_HD double cubic2(double x, double A) {
  return ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
}

// Bicubic taps of output coordinate i along one dimension: source indices (clamped) and weights
// (get_cubic_upsample_coefficients<double>).
PAPR_HD void cubic_taps(int64_t in, int64_t out, bool align_corners, int64_t i, int64_t idx[4],
                        double w[4]) {
  const double scale = source_scale(in, out, align_corners);
  const double real = source_index(scale, i, align_corners, true);
  int64_t base;
  double t;
  guard_index_and_lambda(real, in, base, t);
  const double A = -0.75;
  w[0] = cubic2(t + 1.0, A);
  w[1] = cubic1(t, A);
  const double t2 = 1.0 - t;
  w[2] = cubic1(t2, A);
  w[3] = cubic2(t2 + 1.0, A);
  for (int j = 0; j < 4; ++j) {
    int64_t s = base + j - 1;
    s = s > in - 1 ? in - 1 : s;
    idx[j] = s < 0 ? 0 : s;
  }
}

// Linear taps (trilinear per dimension): torch's compute_source_index_and_lambda<double>.
PAPR_HD void linear_taps(int64_t in, int64_t out, bool align_corners, int64_t i, int64_t idx[2],
                         double w[2]) {
  if (in == out) {
    idx[0] = idx[1] = i;
    w[0] = 1.0;
    w[1] = 0.0;
    return;
  }
  const double scale = source_scale(in, out, align_corners);
  const double real = source_index(scale, i, align_corners, false);
  int64_t i0;
  double l1;
  guard_index_and_lambda(real, in, i0, l1);
  idx[0] = i0;
  idx[1] = i0 + ((i0 < in - 1) ? 1 : 0);
  w[0] = 1.0 - l1;
  w[1] = l1;
}

// Score of output (oy, ox) from the float64 channel mean m (h, w), rounded once to float:
// torch's nested Interpolate<2, ..., 4>, outer dimension H: out = t0*wy0; out += t1*wy1; ...
// with t_a = cubic_row(row iy[a] of m) in the same form. Separable: t_a depends on (iy[a], ox)
// only, so the CPU computes each once per source row and output column (bit for bit the same).
PAPR_HD double cubic_row(const double* r, const int64_t ix[4], const double wx[4]) {
  double t = r[ix[0]] * wx[0];
  for (int b = 1; b < 4; ++b) t += r[ix[b]] * wx[b];
  return t;
}

PAPR_HD float cubic_combine(const double t[4], const double wy[4]) {
  double out = t[0] * wy[0];
  for (int a = 1; a < 4; ++a) out += t[a] * wy[a];
  return static_cast<float>(out);
}

PAPR_HD float bicubic_at(const double* m, int64_t w_in, const int64_t iy[4], const double wy[4],
                         const int64_t ix[4], const double wx[4]) {
  double t[4];
  for (int a = 0; a < 4; ++a) t[a] = cubic_row(m + iy[a] * w_in, ix, wx);
  return cubic_combine(t, wy);
}

// Trilinear: torch's Interpolate<n, ..., 2> specialisation: t0 * w0 + t1 * w1 at every level.
PAPR_HD float trilinear_at(const double* m, int64_t h_in, int64_t w_in, const int64_t it[2],
                           const double wt[2], const int64_t iy[2], const double wy[2],
                           const int64_t ix[2], const double wx[2]) {
  double tv[2];
  for (int a = 0; a < 2; ++a) {
    double yv[2];
    for (int b = 0; b < 2; ++b) {
      const double* r = m + (it[a] * h_in + iy[b]) * w_in;
      yv[b] = r[ix[0]] * wx[0] + r[ix[1]] * wx[1];
    }
    tv[a] = yv[0] * wy[0] + yv[1] * wy[1];
  }
  return static_cast<float>(tv[0] * wt[0] + tv[1] * wt[1]);
}

// ---- 3. total order -----------------------------------------------------------------------------
// Unique key per patch: larger key = ranked earlier. High word: the score's order-preserving
// bits (NaN -> -inf, -0.0 -> +0.0); low word: inverted index, so equal scores rank lower index
// first. Requires N < 2^32.
PAPR_HD uint64_t rank_key(float s, int64_t index) {
  if (s != s) s = -INFINITY;
  if (s == 0.0f) s = 0.0f;
  uint32_t u = float_to_bits(s);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<uint64_t>(u) << 32) | static_cast<uint64_t>(0xffffffffu - static_cast<uint32_t>(index));
}

PAPR_HD int64_t key_index(uint64_t key) {
  return static_cast<int64_t>(0xffffffffu - static_cast<uint32_t>(key & 0xffffffffu));
}

// ---- 4. gather / scatter maps --------------------------------------------------------------------
// Source token (within the row of x) of output token t: prefix tokens in place, then kept patches.
PAPR_HD int64_t gather_source(int64_t t, int64_t P, const int64_t* idx_row) {
  return t < P ? t : P + idx_row[t - P];
}

}  // namespace papr
