// CPU kernels of papr_kernels::gather_rows / put_rows_ (row ops of the hierarchical models) and
// masked_residual (the fused output of a pruned ConvNeXt block; CPU only).
// The grid side is (B, H, W, C) with any strides, position p at (p / W, p % W); the row side is
// (B, k, C). One torch::stable::parallel_for over the B * k rows; memcpy (or a tight add loop) when both
// sides have a unit channel stride, a strided element loop otherwise (the strided gather in
// channel x row tiles). Indices are range-checked before any read or write. Offsets are int64.
#include <algorithm>
#include <cstring>

#include "../ops/rows_args.h"
#include "../papr_core.h"
#include "../stable.h"

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

namespace papr {
namespace {

constexpr int64_t kRowGrainBytes = 256 * 1024;  // bytes of rows per parallel chunk
constexpr int64_t kChannelTile = 16, kRowTile = 1024;  // tiles of the strided-channel gather

int64_t row_grain(int64_t row_bytes) {
  return std::max<int64_t>(1, kRowGrainBytes / std::max<int64_t>(1, row_bytes));
}

// Range check of every index before anything is read or written (a bad call changes nothing).
void check_positions(const int64_t* idx, int64_t n, int64_t positions, const char* op) {
  for (int64_t t = 0; t < n; ++t)
    PAPR_CHECK(idx[t] >= 0 && idx[t] < positions, "papr_kernels.", op, ": index ", idx[t],
                " outside [0, H*W) = [0, ", positions, ")");
}

// torch's elementwise a + b and a * b: in opmath (float for fp16/bf16), rounded once to T.
// bfloat16: torch's round-to-nearest-even (NaN -> 0x7fc0) written branch-free on the bits, so
// that the row loops below vectorize; float16: torch's own header-only Half conversion.
inline uint16_t round_to_bf16_bits(float v) {
  const uint32_t u = float_to_bits(v);
  const uint16_t rounded = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  return v != v ? uint16_t(0x7fc0) : rounded;
}
inline float add_like_torch(float a, float b) { return a + b; }
inline double add_like_torch(double a, double b) { return a + b; }
inline f16 add_like_torch(f16 a, f16 b) {
  return f16{torch::headeronly::Half(to_float(a) + to_float(b)).x};
}
inline bf16 add_like_torch(bf16 a, bf16 b) {
  return bf16{round_to_bf16_bits(to_float(a) + to_float(b))};
}
inline float mul_like_torch(float a, float b) { return a * b; }
inline double mul_like_torch(double a, double b) { return a * b; }
inline f16 mul_like_torch(f16 a, f16 b) {
  return f16{torch::headeronly::Half(to_float(a) * to_float(b)).x};
}
inline bf16 mul_like_torch(bf16 a, bf16 b) {
  return bf16{round_to_bf16_bits(to_float(a) * to_float(b))};
}

// Row loops over a unit channel stride, with an AVX2 clone on x86-64 (bfloat16: 3-4x faster than
// the scalar conversions of before; the same bits). target_clones needs ELF ifuncs, and "avx2" is
// an x86 name (GCC rejects it on aarch64): elsewhere the loops build once, for the target.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__ELF__)
#define PAPR_ROW_LOOP __attribute__((target_clones("avx2", "default")))
#else
#define PAPR_ROW_LOOP
#endif

// dst[c] += src[c] (scatter_back: the add-backs of Swin and MetaFormer).
template <typename T>
PAPR_ROW_LOOP void add_row(T* __restrict__ dst, const T* __restrict__ src, int64_t n) {
  for (int64_t c = 0; c < n; ++c) dst[c] = add_like_torch(dst[c], src[c]);
}

// out[c] = values[c] * gamma[c] + shortcut[c], the product rounded first (masked_residual).
template <typename T>
PAPR_ROW_LOOP void residual_row(T* __restrict__ out, const T* __restrict__ values,
                                const T* __restrict__ gamma, const T* __restrict__ shortcut,
                                int64_t n) {
  if (gamma == nullptr) {
    for (int64_t c = 0; c < n; ++c) out[c] = add_like_torch(values[c], shortcut[c]);
  } else {
    for (int64_t c = 0; c < n; ++c)
      out[c] = add_like_torch(mul_like_torch(values[c], gamma[c]), shortcut[c]);
  }
}

// The kernel for the dtype of t (float16, bfloat16, float32 or float64; checked before).
template <typename Fn>
void dispatch_float(ScalarType t, Fn&& fn) {
  switch (t) {
    case ScalarType::Half: return fn(f16{});
    case ScalarType::BFloat16: return fn(bf16{});
    case ScalarType::Float: return fn(float{});
    case ScalarType::Double: return fn(double{});
    default: fail("papr_kernels: unsupported dtype ", t);
  }
}

template <typename T>
void gather_rows_kernel(const Tensor& x, const int64_t* idx, const RowsShape& s, T* out) {
  const T* xp = static_cast<const T*>(x.const_data_ptr());
  const int64_t sb = x.stride(0), sh = x.stride(1), sw = x.stride(2), sc = x.stride(3);
  const int64_t C = s.C, k = s.k, W = s.W;
  if (sc == 1 || C == 1) {
    torch::stable::parallel_for(0, s.B * k, row_grain(C * int64_t(sizeof(T))), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / k, p = idx[t], h = p / W, w = p - h * W;
        std::memcpy(out + t * C, xp + b * sb + h * sh + w * sw, static_cast<size_t>(C) * sizeof(T));
      }
    });
    return;
  }
  // Strided channels (e.g. NCHW seen channels-last: each channel a plane). Tasks of
  // (b, kChannelTile channels, kRowTile rows): a task reads a few planes only, which stay in
  // cache while its rows are gathered, and writes whole cache lines of each output row.
  const int64_t ctiles = (C + kChannelTile - 1) / kChannelTile;
  const int64_t jtiles = (k + kRowTile - 1) / kRowTile;
  torch::stable::parallel_for(0, s.B * jtiles * ctiles, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t b = q / (jtiles * ctiles), rem = q - b * jtiles * ctiles;
      const int64_t jt = rem / ctiles, ct = rem - jt * ctiles;
      const int64_t c0 = ct * kChannelTile, c1 = std::min(C, c0 + kChannelTile);
      const int64_t j1 = std::min(k, (jt + 1) * kRowTile);
      for (int64_t j = jt * kRowTile; j < j1; ++j) {
        const int64_t t = b * k + j, p = idx[t], h = p / W, w = p - h * W;
        const T* src = xp + b * sb + h * sh + w * sw;
        T* dst = out + t * C;
        for (int64_t c = c0; c < c1; ++c) dst[c] = src[c * sc];
      }
    }
  });
}

template <typename T>
void put_rows_kernel(const Tensor& out, const int64_t* idx, const Tensor& values,
                     const RowsShape& s, bool accumulate) {
  T* op = static_cast<T*>(out.mutable_data_ptr());
  const T* vp = static_cast<const T*>(values.const_data_ptr());
  const int64_t ob = out.stride(0), oh = out.stride(1), ow = out.stride(2), oc = out.stride(3);
  const int64_t vb = values.stride(0), vk = values.stride(1), vc = values.stride(2);
  const int64_t C = s.C, k = s.k, W = s.W;
  const bool dense = (oc == 1 && vc == 1) || C == 1;
  torch::stable::parallel_for(0, s.B * k, row_grain(C * int64_t(sizeof(T))), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / k, j = t - b * k, p = idx[t], h = p / W, w = p - h * W;
      T* __restrict__ dst = op + b * ob + h * oh + w * ow;
      const T* __restrict__ src = vp + b * vb + j * vk;
      if (!accumulate) {
        if (dense) {
          std::memcpy(dst, src, static_cast<size_t>(C) * sizeof(T));
        } else {
          for (int64_t c = 0; c < C; ++c) dst[c * oc] = src[c * vc];
        }
      } else if (dense) {
        add_row(dst, src, C);
      } else {
        for (int64_t c = 0; c < C; ++c) dst[c * oc] = add_like_torch(dst[c * oc], src[c * vc]);
      }
    }
  });
}

// ConvNeXt's pruned block output: every position p of (B, H, W, C) written once, the kept ones
// (r = row_of[b, p] in [0, k)) as values[b, r] * gamma + shortcut[b, p], the others zero (any
// other map entry reads as pruned: nothing is read out of bounds whatever the map holds).
template <typename T>
void masked_residual_kernel(const Tensor& shortcut, const int32_t* row_of, const T* vp,
                            const T* gp, const RowsShape& s, T* out) {
  const T* sp = static_cast<const T*>(shortcut.const_data_ptr());
  const int64_t sb = shortcut.stride(0), sh = shortcut.stride(1), sw = shortcut.stride(2),
                sc = shortcut.stride(3);
  const int64_t C = s.C, k = s.k, W = s.W, N = s.H * s.W;
  torch::stable::parallel_for(0, s.B * N, row_grain(C * int64_t(sizeof(T))), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / N, p = t - b * N, r = row_of[t];
      T* dst = out + t * C;
      if (r < 0 || r >= k) {
        std::memset(dst, 0, static_cast<size_t>(C) * sizeof(T));  // +0.0 in every float type
        continue;
      }
      const int64_t h = p / W, w = p - h * W;
      const T* src = sp + b * sb + h * sh + w * sw;
      const T* vals = vp + (b * k + r) * C;
      if (sc == 1 || C == 1) {
        residual_row(dst, vals, gp, src, C);
      } else {
        for (int64_t c = 0; c < C; ++c) {
          const T branch = gp == nullptr ? vals[c] : mul_like_torch(vals[c], gp[c]);
          dst[c] = add_like_torch(branch, src[c * sc]);
        }
      }
    }
  });
}

Tensor masked_residual_cpu(const Tensor& shortcut, const Tensor& row_of_in,
                           const Tensor& values_in, std::optional<Tensor> gamma_in) {
  const RowsShape s = check_masked_residual(shortcut, row_of_in, values_in, gamma_in);
  Tensor out = empty_on(shortcut, {s.B, s.H, s.W, s.C});
  if (out.numel() == 0) return out;
  const Tensor row_of = as_contiguous(row_of_in), values = as_contiguous(values_in);
  const std::optional<Tensor> gamma =
      gamma_in.has_value() ? std::optional<Tensor>(as_contiguous(*gamma_in)) : std::nullopt;
  dispatch_float(shortcut.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    masked_residual_kernel<T>(shortcut, row_of.const_data_ptr<int32_t>(),
                              static_cast<const T*>(values.const_data_ptr()),
                              gamma ? static_cast<const T*>(gamma->const_data_ptr()) : nullptr, s,
                              static_cast<T*>(out.mutable_data_ptr()));
  });
  return out;
}

Tensor gather_rows_cpu(const Tensor& x, const Tensor& indices_in) {
  const RowsShape s = check_gather_rows(x, indices_in);
  Tensor out = empty_on(x, {s.B, s.k, s.C});
  if (out.numel() == 0) return out;
  const Tensor indices = as_contiguous(indices_in);
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  check_positions(idx, s.B * s.k, s.H * s.W, "gather_rows");
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    gather_rows_kernel<T>(x, idx, s, static_cast<T*>(out.mutable_data_ptr()));
  });
  return out;
}

void put_rows_cpu(Tensor out, const Tensor& indices_in, const Tensor& values, bool accumulate) {
  const RowsShape s = check_put_rows(out, indices_in, values);
  if (s.B == 0 || s.k == 0 || s.C == 0) return;
  const Tensor indices = as_contiguous(indices_in);
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  check_positions(idx, s.B * s.k, s.H * s.W, "put_rows_");
  dispatch_float(out.scalar_type(), [&](auto tag) {
    put_rows_kernel<decltype(tag)>(out, idx, values, s, accumulate);
  });
}

}  // namespace
}  // namespace papr

STABLE_TORCH_LIBRARY_IMPL(papr_kernels, CPU, m) {
  m.impl("gather_rows", TORCH_BOX(&papr::gather_rows_cpu));
  m.impl("put_rows_", TORCH_BOX(&papr::put_rows_cpu));
  m.impl("masked_residual", TORCH_BOX(&papr::masked_residual_cpu));
}
