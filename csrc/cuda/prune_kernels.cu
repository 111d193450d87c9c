// CUDA kernels of papr_kernels::prune_forward / prune_backward on top of csrc/papr_core.h (the
// same per-row arithmetic as the CPU kernel; built with --fmad=false so scores match it bitwise).
//   mean_kernel    grid (S tiles, B): float64 channel mean, K dealt to channel_sum's 16 lanes
//   select_kernel  N <= kSortMinKeys: one block per row, keys in shared memory, rank by counting
//   keys_kernel    N >  kSortMinKeys: keys to global memory in an order-preserving int64 form;
//                  the torch glue (prune_cuda.cpp) sorts them (torch.sort, a segmented radix
//                  sort); decode_kernel turns the top k of each sorted row into indices
//   gather_kernel  grid (token tiles, B): coalesced 16/8/4/2/1-byte copies of whole tokens
//   inverse_kernel + scatter_kernel: backward, every byte of grad_x written once, no atomics
// All offsets are int64.
#include <cuda_runtime.h>
#include <stdint.h>

#include "../papr_core.h"
#include "prune_kernels.h"

namespace papr {
namespace cuda {
namespace {

constexpr int kMeanTx = 32, kMeanTy = kChannelLanes;   // positions x lanes of channel_sum's order
constexpr int kSelectThreads = 512;
constexpr int kKeyThreads = 256;
constexpr int kCopyThreads = 128, kTokensPerBlock = 4;
// Counting ranks costs N^2 / kSelectThreads comparisons per thread: past this many keys a sort
// is faster. 2048 keys = 16 KiB of shared memory, below the 48 KiB default (no opt-in needed).
constexpr int64_t kSortMinKeys = 2048;

unsigned grid_rows(int64_t B) { return static_cast<unsigned>(B < 65535 ? B : 65535); }

// Thread (j, t) of a block: lane j of papr_core.h's channel_sum order (channels j, j + 16,
// j + 32, ... in order) at position t of the block's tile; the 16 lanes are then added in order
// j = 0, 1, ... So the mean is the CPU kernel's bit for bit, whatever f's layout: only the thread
// layout follows f, for coalescing: threads along positions for contiguous (K, S) rows, along
// channels for positions-major (S, K) rows (channels_last f).
template <typename T, bool kPositionsMajor>
__global__ void mean_kernel(const T* __restrict__ f, int64_t B, int64_t K, int64_t S, double* __restrict__ mean) {
  __shared__ double part[kMeanTy][kMeanTx];
  const int j = kPositionsMajor ? threadIdx.x : threadIdx.y;
  const int t = kPositionsMajor ? threadIdx.y : threadIdx.x;
  const int64_t s = static_cast<int64_t>(blockIdx.x) * kMeanTx + t;
  const int64_t channel_stride = kPositionsMajor ? 1 : S, position_stride = kPositionsMajor ? K : 1;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    double acc = 0.0;
    if (s < S) {
      const T* at = f + b * K * S + s * position_stride;
      for (int64_t c = j; c < K; c += kMeanTy) acc += to_double(at[c * channel_stride]);
    }
    part[j][t] = acc;
    __syncthreads();
    if (j == 0 && s < S) {
      double total = 0.0;
      for (int i = 0; i < kMeanTy; ++i) total += part[i][t];  // fixed order: deterministic
      mean[b * S + s] = mean_from_sum(total, K);
    }
    __syncthreads();
  }
}

template <typename T>
void launch_mean(const void* f_any, bool positions_major, int64_t B, int64_t K, int64_t S,
                 double* mean, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((S + kMeanTx - 1) / kMeanTx), grid_rows(B));
  const T* f = static_cast<const T*>(f_any);
  if (positions_major)
    mean_kernel<T, true><<<grid, dim3(kMeanTy, kMeanTx), 0, stream>>>(f, B, K, S, mean);
  else
    mean_kernel<T, false><<<grid, dim3(kMeanTx, kMeanTy), 0, stream>>>(f, B, K, S, mean);
}

void launch_mean_of(const void* f, int f_type, bool positions_major, int64_t B, int64_t K,
                    int64_t S, double* mean, cudaStream_t stream) {
  switch (f_type) {
    case kF16: launch_mean<f16>(f, positions_major, B, K, S, mean, stream); break;
    case kBF16: launch_mean<bf16>(f, positions_major, B, K, S, mean, stream); break;
    case kF32: launch_mean<float>(f, positions_major, B, K, S, mean, stream); break;
    default: launch_mean<double>(f, positions_major, B, K, S, mean, stream); break;
  }
}

// Float32 score of patch i: float64 resize of the float64 channel mean m, rounded once.
__device__ __forceinline__ float score_at(const ForwardParams& p, const double* m, int64_t i) {
  // Patch coordinates by 32-bit division (N < 2^31 patches): a 64-bit division is a slow-path
  // call whose ABI made ptxas spill in keys_kernel (8 B stack at sm_90).
  const int32_t i32 = static_cast<int32_t>(i);
  if (p.dims == 2) {
    const int64_t oy = i32 / static_cast<int32_t>(p.out[1]), ox = i - oy * p.out[1];
    int64_t iy[4], ix[4];
    double wy[4], wx[4];
    cubic_taps(p.in[0], p.out[0], p.align_corners, oy, iy, wy);
    cubic_taps(p.in[1], p.out[1], p.align_corners, ox, ix, wx);
    return bicubic_at(m, p.in[1], iy, wy, ix, wx);
  }
  const int64_t hw = p.out[1] * p.out[2];
  const int64_t ot = i32 / static_cast<int32_t>(hw), rem = i - ot * hw;
  const int64_t oy = static_cast<int32_t>(rem) / static_cast<int32_t>(p.out[2]),
                ox = rem - oy * p.out[2];
  int64_t it[2], iy[2], ix[2];
  double wt[2], wy[2], wx[2];
  linear_taps(p.in[0], p.out[0], p.align_corners, ot, it, wt);
  linear_taps(p.in[1], p.out[1], p.align_corners, oy, iy, wy);
  linear_taps(p.in[2], p.out[2], p.align_corners, ox, ix, wx);
  return trilinear_at(m, p.in[1], p.in[2], it, wt, iy, wy, ix, wx);
}

// One block per row, N <= kSortMinKeys. Keys are unique, so rank(i) = #{j : key_j > key_i} is a
// permutation.
__global__ void __launch_bounds__(kSelectThreads) select_kernel(ForwardParams p) {
  __shared__ uint64_t keys[kSortMinKeys];
  __shared__ uint64_t threshold;
  const int64_t b = blockIdx.x;
  const double* m = p.mean + b * p.S;
  for (int64_t i = threadIdx.x; i < p.N; i += blockDim.x) keys[i] = rank_key(score_at(p, m, i), i);
  __syncthreads();
  int64_t* out = p.indices + b * p.k;
  for (int64_t i = threadIdx.x; i < p.N; i += blockDim.x) {
    const uint64_t key = keys[i];
    int64_t rank = 0;
    for (int64_t j = 0; j < p.N; ++j) rank += keys[j] > key;  // broadcast reads
    if (rank < p.k && !p.spatial) out[rank] = i;
    if (rank == p.k - 1) threshold = key;
  }
  if (!p.spatial) return;
  __syncthreads();
  const uint64_t th = threshold;
  for (int64_t i = threadIdx.x; i < p.N; i += blockDim.x) {
    if (keys[i] < th) continue;
    int64_t pos = 0;
    for (int64_t j = 0; j < i; ++j) pos += keys[j] >= th;
    out[pos] = i;
  }
}

// N > kSortMinKeys: every key of every row to global memory, as int64 with the top bit flipped
// (signed order == unsigned key order; the low word, the inverted index, is unchanged).
__global__ void __launch_bounds__(kKeyThreads) keys_kernel(ForwardParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.N) return;
  for (int64_t b = blockIdx.y; b < p.B; b += gridDim.y) {
    const uint64_t key = rank_key(score_at(p, p.mean + b * p.S, i), i);
    p.keys[b * p.N + i] = static_cast<int64_t>(key ^ 0x8000000000000000ull);
  }
}

// indices[b, j] = the index in the j-th largest key of row b (sorted descending, int64 keys).
__global__ void decode_kernel(const int64_t* __restrict__ sorted, int64_t stride_b, int64_t B,
                              int64_t k, int64_t* __restrict__ indices) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= k) return;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y)
    indices[b * k + j] = key_index(static_cast<uint64_t>(sorted[b * stride_b + j]));
}

template <typename V>
__device__ __forceinline__ void copy_token(char* dst, const char* src, int64_t bytes) {
  const int64_t n = bytes / static_cast<int64_t>(sizeof(V));
  const V* s = reinterpret_cast<const V*>(src);
  V* d = reinterpret_cast<V*>(dst);
  for (int64_t e = threadIdx.x; e < n; e += blockDim.x) d[e] = s[e];
}

template <typename V>
__device__ __forceinline__ void zero_token(char* dst, int64_t bytes) {
  const int64_t n = bytes / static_cast<int64_t>(sizeof(V));
  V* d = reinterpret_cast<V*>(dst);
  for (int64_t e = threadIdx.x; e < n; e += blockDim.x) d[e] = V{};
}

template <typename V>
__global__ void gather_kernel(ForwardParams p) {
  const int64_t rows = p.P + p.k;
  for (int64_t b = blockIdx.y; b < p.B; b += gridDim.y) {
    const int64_t* idx = p.indices + b * p.k;
    for (int t = 0; t < kTokensPerBlock; ++t) {
      const int64_t j = static_cast<int64_t>(blockIdx.x) * kTokensPerBlock + t;
      if (j >= rows) break;
      const int64_t src = gather_source(j, p.P, idx);
      copy_token<V>(p.out_tokens + (b * rows + j) * p.token_bytes,
                    p.x + b * p.x_stride_b + src * p.x_stride_n, p.token_bytes);
    }
  }
}

__global__ void inverse_kernel(BackwardParams p) {
  const int64_t N = p.n - p.P;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= p.k) return;
  for (int64_t b = blockIdx.y; b < p.B; b += gridDim.y) {
    const int64_t i = p.indices[b * p.k + j];
    if (i >= 0 && i < N) p.inverse[b * N + i] = static_cast<int32_t>(j);  // out of range: ignored
  }
}

template <typename V>
__global__ void scatter_kernel(BackwardParams p) {
  const int64_t N = p.n - p.P;
  for (int64_t b = blockIdx.y; b < p.B; b += gridDim.y) {
    for (int t = 0; t < kTokensPerBlock; ++t) {
      const int64_t i = static_cast<int64_t>(blockIdx.x) * kTokensPerBlock + t;
      if (i >= p.n) break;
      char* dst = p.grad_x + (b * p.n + i) * p.token_bytes;
      const int32_t inv = i < p.P ? 0 : p.inverse[b * N + i - p.P];
      const int64_t src = i < p.P ? i : (inv < 0 ? -1 : p.P + inv);
      if (src < 0) zero_token<V>(dst, p.token_bytes);
      else copy_token<V>(dst, p.grad_out + b * p.g_stride_b + src * p.g_stride_n, p.token_bytes);
    }
  }
}

// Widest copy unit that divides every token's size and offset.
int vector_bytes(uint64_t a, uint64_t b, int64_t c, int64_t d, int64_t e) {
  const uint64_t all = a | b | static_cast<uint64_t>(c) | static_cast<uint64_t>(d) | static_cast<uint64_t>(e);
  for (int v = 16; v > 1; v /= 2)
    if (all % v == 0) return v;
  return 1;
}

#define PAPR_LAUNCH_COPY(KERNEL, V_BYTES, GRID, STREAM, PARAMS)                 \
  switch (V_BYTES) {                                                             \
    case 16: KERNEL<uint4><<<GRID, kCopyThreads, 0, STREAM>>>(PARAMS); break;    \
    case 8: KERNEL<uint2><<<GRID, kCopyThreads, 0, STREAM>>>(PARAMS); break;     \
    case 4: KERNEL<uint32_t><<<GRID, kCopyThreads, 0, STREAM>>>(PARAMS); break;  \
    case 2: KERNEL<uint16_t><<<GRID, kCopyThreads, 0, STREAM>>>(PARAMS); break;  \
    default: KERNEL<uint8_t><<<GRID, kCopyThreads, 0, STREAM>>>(PARAMS); break;  \
  }

}  // namespace

bool select_by_sort(int64_t N) { return N > kSortMinKeys; }

cudaError_t launch_select(const ForwardParams& p, cudaStream_t stream) {
  if (p.B == 0) return cudaSuccess;
  launch_mean_of(p.f, p.f_type, p.f_positions_major, p.B, p.K, p.S, p.mean, stream);
  if (!select_by_sort(p.N)) {
    select_kernel<<<static_cast<unsigned>(p.B), kSelectThreads, 0, stream>>>(p);
  } else {
    if (p.keys == nullptr) return cudaErrorInvalidValue;
    const dim3 kgrid(static_cast<unsigned>((p.N + kKeyThreads - 1) / kKeyThreads), grid_rows(p.B));
    keys_kernel<<<kgrid, kKeyThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t launch_channel_mean(const void* f, int f_type, bool positions_major, int64_t B,
                                int64_t K, int64_t S, double* mean, cudaStream_t stream) {
  if (B == 0 || S == 0) return cudaSuccess;
  launch_mean_of(f, f_type, positions_major, B, K, S, mean, stream);
  return cudaGetLastError();
}

cudaError_t launch_decode_keys(const int64_t* sorted, int64_t stride_b, const ForwardParams& p,
                               cudaStream_t stream) {
  if (p.B == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((p.k + kKeyThreads - 1) / kKeyThreads), grid_rows(p.B));
  decode_kernel<<<grid, kKeyThreads, 0, stream>>>(sorted, stride_b, p.B, p.k, p.indices);
  return cudaGetLastError();
}

cudaError_t launch_gather(const ForwardParams& p, cudaStream_t stream) {
  if (p.B == 0) return cudaSuccess;
  const int64_t rows = p.P + p.k;
  const dim3 ggrid(static_cast<unsigned>((rows + kTokensPerBlock - 1) / kTokensPerBlock), grid_rows(p.B));
  const int v = vector_bytes(reinterpret_cast<uint64_t>(p.x), reinterpret_cast<uint64_t>(p.out_tokens),
                             p.token_bytes, p.x_stride_b, p.x_stride_n);
  PAPR_LAUNCH_COPY(gather_kernel, v, ggrid, stream, p);
  return cudaGetLastError();
}

cudaError_t launch_backward(const BackwardParams& p, cudaStream_t stream) {
  if (p.B == 0) return cudaSuccess;
  const int64_t N = p.n - p.P;
  cudaError_t err = cudaMemsetAsync(p.inverse, 0xff, static_cast<size_t>(p.B * N) * sizeof(int32_t), stream);
  if (err != cudaSuccess) return err;
  if (p.k > 0) {
    const dim3 igrid(static_cast<unsigned>((p.k + 255) / 256), grid_rows(p.B));
    inverse_kernel<<<igrid, 256, 0, stream>>>(p);
  }
  const dim3 sgrid(static_cast<unsigned>((p.n + kTokensPerBlock - 1) / kTokensPerBlock), grid_rows(p.B));
  const int v = vector_bytes(reinterpret_cast<uint64_t>(p.grad_out), reinterpret_cast<uint64_t>(p.grad_x),
                             p.token_bytes, p.g_stride_b, p.g_stride_n);
  PAPR_LAUNCH_COPY(scatter_kernel, v, sgrid, stream, p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace papr
