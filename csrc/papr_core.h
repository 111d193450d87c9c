// PaPr per-row algorithm, written once: compiled as host code by g++ (csrc/cpu) and as
// __host__ __device__ code by nvcc (csrc/cuda). No torch headers here, so nvcc builds fast.
//
// SPEC.md, "Semantics":
//   1. channel mean of f in float32 (we accumulate in double and round once: as close to
//      torch's cascade sum as any order gets), then divided by K in float like torch.mean;
//   2. resize to the token grid with PyTorch's CPU upsample formulas: bicubic (A = -0.75,
//      clamped taps) for 4-D f, trilinear for 5-D f, both align_corners modes, the operation
//      order of aten/src/ATen/native/cpu/UpSampleKernel.cpp (upsample_generic_Nd). Measured
//      against torch 2.14.1's AVX2 build, the cubic weights differ by a few to ~30 ULP (their
//      cubic2 term cancels badly and torch's compiled code rounds it differently; not FMA alone),
//      so scores agree with the reference to a few ULP, within SPEC's matching tolerance, not
//      bit for bit. The CPU and CUDA kernels share this arithmetic exactly;
//   3. total order: descending score, ties to the lower index, -0.0 == +0.0, NaN as -inf,
//      encoded as one unique uint64 key per patch (larger key = ranked first);
//   4. gather / scatter of whole token rows (dtype-agnostic byte copies).
// The compile must not contract a*b+c into an FMA (nvcc: --fmad=false; x86 g++ without -mfma
// does not), or CPU and CUDA scores drift apart by ULPs.
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

// ---- 1. channel mean --------------------------------------------------------------------------
// Sum of channels [k0, k1) at spatial positions [s0, s0 + len) of one row of f (K, S) contiguous.
template <typename T>
PAPR_HD void channel_sum(const T* f_row, int64_t S, int64_t k0, int64_t k1, int64_t s0, int len,
                         double* acc) {
  for (int j = 0; j < len; ++j) acc[j] = 0.0;
  for (int64_t k = k0; k < k1; ++k) {
    const T* p = f_row + k * S + s0;
    for (int j = 0; j < len; ++j) acc[j] += static_cast<double>(to_float(p[j]));
  }
}

// torch CPU mean = sum (float) .div_(K)
PAPR_HD float mean_from_sum(double sum, int64_t K) {
  return static_cast<float>(sum) / static_cast<float>(K);
}

// ---- 2. resize taps (PyTorch UpSample.h / UpSampleKernel.cpp arithmetic, float opmath) --------
PAPR_HD float source_scale(int64_t in, int64_t out, bool align_corners) {
  if (align_corners) return out > 1 ? static_cast<float>(in - 1) / static_cast<float>(out - 1) : 0.0f;
  return static_cast<float>(in) / static_cast<float>(out);
}

PAPR_HD float source_index(float scale, int64_t dst, bool align_corners, bool cubic) {
  if (align_corners) return scale * static_cast<float>(dst);
  const float src = scale * (static_cast<float>(dst) + 0.5f) - 0.5f;
  return (!cubic && src < 0.0f) ? 0.0f : src;
}

PAPR_HD void guard_index_and_lambda(float real, int64_t in, int64_t& idx, float& lambda) {
  idx = static_cast<int64_t>(floorf(real));
  if (idx > in - 1) idx = in - 1;
  float l = real - static_cast<float>(idx);
  l = l < 0.0f ? 0.0f : l;   // std::max(l, 0)
  lambda = l > 1.0f ? 1.0f : l;  // std::min(., 1)
}

PAPR_HD float cubic1(float x, float A) { return ((A + 2.0f) * x - (A + 3.0f)) * x * x + 1.0f; }
PAPR_HD float cubic2(float x, float A) {
  return ((A * x - 5.0f * A) * x + 8.0f * A) * x - 4.0f * A;
}

// Bicubic taps of output coordinate i along one dimension: source indices (clamped) and weights.
PAPR_HD void cubic_taps(int64_t in, int64_t out, bool align_corners, int64_t i, int64_t idx[4],
                        float w[4]) {
  const float scale = source_scale(in, out, align_corners);
  const float real = source_index(scale, i, align_corners, true);
  int64_t base;
  float t;
  guard_index_and_lambda(real, in, base, t);
  const float A = -0.75f;
  // torch: x1 + 1.0 and 1.0 - t are computed in double, then passed as float: same as float ops.
  w[0] = cubic2(static_cast<float>(static_cast<double>(t) + 1.0), A);
  w[1] = cubic1(t, A);
  const float t2 = static_cast<float>(1.0 - static_cast<double>(t));
  w[2] = cubic1(t2, A);
  w[3] = cubic2(static_cast<float>(static_cast<double>(t2) + 1.0), A);
  for (int j = 0; j < 4; ++j) {
    int64_t s = base + j - 1;
    s = s > in - 1 ? in - 1 : s;
    idx[j] = s < 0 ? 0 : s;
  }
}

// Linear taps (trilinear per dimension): torch's compute_source_index_and_lambda.
PAPR_HD void linear_taps(int64_t in, int64_t out, bool align_corners, int64_t i, int64_t idx[2],
                         float w[2]) {
  if (in == out) {
    idx[0] = idx[1] = i;
    w[0] = 1.0f;
    w[1] = 0.0f;
    return;
  }
  const float scale = source_scale(in, out, align_corners);
  const float real = source_index(scale, i, align_corners, false);
  int64_t i0;
  float l1;
  guard_index_and_lambda(real, in, i0, l1);
  idx[0] = i0;
  idx[1] = i0 + ((i0 < in - 1) ? 1 : 0);
  w[0] = 1.0f - l1;
  w[1] = l1;
}

// Score of output (oy, ox) from the channel mean m (h, w): torch's nested Interpolate<2, ..., 4>,
// outer dimension H: out = t0*wy0; out += t1*wy1; ... with t_j = sum over x taps in the same form.
PAPR_HD float bicubic_at(const float* m, int64_t w_in, const int64_t iy[4], const float wy[4],
                         const int64_t ix[4], const float wx[4]) {
  float out = 0.0f;
  for (int a = 0; a < 4; ++a) {
    const float* r = m + iy[a] * w_in;
    float t = r[ix[0]] * wx[0];
    for (int b = 1; b < 4; ++b) t += r[ix[b]] * wx[b];
    if (a == 0) out = t * wy[0]; else out += t * wy[a];
  }
  return out;
}

// Trilinear: torch's Interpolate<n, ..., 2> specialisation: t0 * w0 + t1 * w1 at every level.
PAPR_HD float trilinear_at(const float* m, int64_t h_in, int64_t w_in, const int64_t it[2],
                           const float wt[2], const int64_t iy[2], const float wy[2],
                           const int64_t ix[2], const float wx[2]) {
  float tv[2];
  for (int a = 0; a < 2; ++a) {
    float yv[2];
    for (int b = 0; b < 2; ++b) {
      const float* r = m + (it[a] * h_in + iy[b]) * w_in;
      yv[b] = r[ix[0]] * wx[0] + r[ix[1]] * wx[1];
    }
    tv[a] = yv[0] * wy[0] + yv[1] * wy[1];
  }
  return tv[0] * wt[0] + tv[1] * wt[1];
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
