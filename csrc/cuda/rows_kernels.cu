// CUDA kernels of papr_kernels::gather_rows / put_rows_. A block holds `ty` rows (b, j) of
// `tx` threads each, threads striding over the row's channels; rows are grid-strided. Copies move
// 16/8/4/2-byte units when both sides have a unit channel stride and the alignment allows, else
// one element at its stride. The accumulating put adds like torch's a + b (fp16/bf16 in float,
// one rounding). Indices are unique per row: plain read-modify-write, no atomics. All offsets
// are int64. An index outside [0, H*W) is masked: its row is skipped, never read or written (no
// device assert, which would kill the CUDA context of the whole process; the CPU kernel raises).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "../papr_core.h"
#include "rows_kernels.h"

namespace papr {
namespace cuda {
namespace {

constexpr int kRowThreads = 256;
constexpr int64_t kMaxRowBlocks = 65535;

enum RowMode { kGather = 0, kPut = 1, kAdd = 2 };

__device__ __forceinline__ float add_like_torch(float a, float b) { return a + b; }
__device__ __forceinline__ double add_like_torch(double a, double b) { return a + b; }
__device__ __forceinline__ f16 add_like_torch(f16 a, f16 b) {
  const float s = __half2float(__ushort_as_half(a.bits)) + __half2float(__ushort_as_half(b.bits));
  return f16{__half_as_ushort(__float2half_rn(s))};
}
__device__ __forceinline__ bf16 add_like_torch(bf16 a, bf16 b) {
  const float s = __bfloat162float(__ushort_as_bfloat16(a.bits)) +
                  __bfloat162float(__ushort_as_bfloat16(b.bits));
  return bf16{__bfloat16_as_ushort(__float2bfloat16_rn(s))};
}

// V: the unit moved (an element type, or a wider copy unit); `units` per row, unit strides
// g_su / r_su. kAdd needs V to be the element type.
template <typename V, int kMode>
__global__ void __launch_bounds__(kRowThreads) rows_kernel(RowsParams p, int64_t units,
                                                           int64_t g_su, int64_t r_su) {
  const int64_t rows = p.B * p.k;
  const int64_t positions = p.H * p.W;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; t < rows;
       t += step) {
    const int64_t b = t / p.k, j = t - b * p.k;
    const int64_t pos = p.indices[t];
    V* r = reinterpret_cast<V*>(p.rows + b * p.r_sb + j * p.r_sk);
    if (pos < 0 || pos >= positions) {  // masked: the grid is never read or written there
      if constexpr (kMode == kGather) {   // the gathered row (in bounds) reads as zeros
        for (int64_t u = threadIdx.x; u < units; u += blockDim.x) r[u * r_su] = V{};
      }
      continue;
    }
    const int64_t h = pos / p.W, w = pos - h * p.W;
    V* g = reinterpret_cast<V*>(p.grid + b * p.g_sb + h * p.g_sh + w * p.g_sw);
    for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
      if constexpr (kMode == kGather) r[u * r_su] = g[u * g_su];
      else if constexpr (kMode == kPut) g[u * g_su] = r[u * r_su];
      else g[u * g_su] = add_like_torch(g[u * g_su], r[u * r_su]);
    }
  }
}

template <typename V, int kMode>
cudaError_t launch(const RowsParams& p, int64_t units, int64_t g_su, int64_t r_su,
                   cudaStream_t stream) {
  int tx = 32;
  while (tx < units && tx < kRowThreads) tx *= 2;
  const int ty = kRowThreads / tx;
  const int64_t rows = p.B * p.k;
  int64_t blocks = (rows + ty - 1) / ty;
  if (blocks > kMaxRowBlocks) blocks = kMaxRowBlocks;
  rows_kernel<V, kMode><<<static_cast<unsigned>(blocks), dim3(tx, ty), 0, stream>>>(p, units, g_su, r_su);
  return cudaGetLastError();
}

// Widest unit (16, 8, 4 or 2 bytes) dividing the row's bytes, both base addresses and every
// row stride, when both channel strides are unit; 0 when the channels are strided.
int copy_unit_bytes(const RowsParams& p) {
  const bool dense = (p.g_sc == 1 && p.r_sc == 1) || p.C == 1;
  if (!dense) return 0;
  const uint64_t all = reinterpret_cast<uint64_t>(p.grid) | reinterpret_cast<uint64_t>(p.rows) |
                       static_cast<uint64_t>(p.C * p.elem_bytes) | static_cast<uint64_t>(p.g_sb) |
                       static_cast<uint64_t>(p.g_sh) | static_cast<uint64_t>(p.g_sw) |
                       static_cast<uint64_t>(p.r_sb) | static_cast<uint64_t>(p.r_sk);
  for (int v = 16; v > 2; v /= 2)
    if (all % v == 0) return v;
  return 2;
}

template <int kMode>
cudaError_t launch_copy(const RowsParams& p, cudaStream_t stream) {
  const int v = copy_unit_bytes(p);
  if (v == 0) {  // strided channels: one element at a time, at its stride
    switch (p.elem_bytes) {
      case 2: return launch<uint16_t, kMode>(p, p.C, p.g_sc, p.r_sc, stream);
      case 4: return launch<uint32_t, kMode>(p, p.C, p.g_sc, p.r_sc, stream);
      default: return launch<uint64_t, kMode>(p, p.C, p.g_sc, p.r_sc, stream);
    }
  }
  const int64_t units = p.C * p.elem_bytes / v;
  switch (v) {
    case 16: return launch<uint4, kMode>(p, units, 1, 1, stream);
    case 8: return launch<uint2, kMode>(p, units, 1, 1, stream);
    case 4: return launch<uint32_t, kMode>(p, units, 1, 1, stream);
    default: return launch<uint16_t, kMode>(p, units, 1, 1, stream);
  }
}

}  // namespace

cudaError_t launch_gather_rows(const RowsParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.k == 0 || p.C == 0) return cudaSuccess;
  return launch_copy<kGather>(p, stream);
}

cudaError_t launch_put_rows(const RowsParams& p, bool accumulate, cudaStream_t stream) {
  if (p.B == 0 || p.k == 0 || p.C == 0) return cudaSuccess;
  if (!accumulate) return launch_copy<kPut>(p, stream);
  const int64_t C = p.C, gs = p.C == 1 ? 1 : p.g_sc, rs = p.C == 1 ? 1 : p.r_sc;
  switch (p.f_type) {
    case kF16: return launch<f16, kAdd>(p, C, gs, rs, stream);
    case kBF16: return launch<bf16, kAdd>(p, C, gs, rs, stream);
    case kF32: return launch<float, kAdd>(p, C, gs, rs, stream);
    default: return launch<double, kAdd>(p, C, gs, rs, stream);
  }
}

}  // namespace cuda
}  // namespace papr
