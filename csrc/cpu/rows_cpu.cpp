// CPU kernels of papr_kernels::gather_rows / put_rows_ (row ops of the hierarchical models).
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

// torch's elementwise a + b: in opmath (float for fp16/bf16), rounded once to T by torch's own
// header-only Half / BFloat16 conversions.
inline float add_like_torch(float a, float b) { return a + b; }
inline double add_like_torch(double a, double b) { return a + b; }
inline f16 add_like_torch(f16 a, f16 b) {
  return f16{torch::headeronly::Half(to_float(a) + to_float(b)).x};
}
inline bf16 add_like_torch(bf16 a, bf16 b) {
  return bf16{torch::headeronly::BFloat16(to_float(a) + to_float(b)).x};
}

// dst[c] += src[c] over one contiguous row, rounded as add_like_torch. Loops the compiler
// vectorizes: plain adds for float / double; for bfloat16 the widening (a shift) and torch's
// round-to-nearest-even written branch-free on the bits (NaN -> 0x7fc0, as torch's BFloat16),
// ~3x faster than the scalar conversions per element (ConvNeXt / MetaFormer / Swin add-backs).
template <typename T>
void add_row(T* __restrict__ dst, const T* __restrict__ src, int64_t n) {
  for (int64_t c = 0; c < n; ++c) dst[c] = add_like_torch(dst[c], src[c]);
}

template <>
__attribute__((target_clones("avx2", "default"))) void add_row<bf16>(bf16* __restrict__ dst_, const bf16* __restrict__ src_, int64_t n) {
  uint16_t* __restrict__ dst = &dst_->bits;
  const uint16_t* __restrict__ src = &src_->bits;
  for (int64_t c = 0; c < n; ++c) {
    const float sum = bits_to_float(uint32_t(dst[c]) << 16) + bits_to_float(uint32_t(src[c]) << 16);
    const uint32_t u = float_to_bits(sum);
    const uint16_t rounded = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    dst[c] = sum != sum ? uint16_t(0x7fc0) : rounded;
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
}
