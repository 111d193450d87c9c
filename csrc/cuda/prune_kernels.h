// Launchers of the CUDA kernels (prune_kernels.cu). Plain C++ types only: no torch headers, so
// the .cu compiles fast; the torch glue (prune_cuda.cpp) allocates and passes raw pointers.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace papr {
namespace cuda {

struct ForwardParams {
  const char* x;            // tokens, byte strides below, unit channel stride
  int64_t x_stride_b, x_stride_n, token_bytes;
  const void* f;            // (B, K, S) contiguous, or (B, S, K) when f_positions_major
  int f_type;               // papr::FType
  bool f_positions_major;
  int64_t B, P, N, k, K, S;
  int dims;                 // 2: bicubic, 3: trilinear
  int64_t in[3], out[3];
  bool align_corners, spatial;
  double* mean;             // workspace (B, S): the float64 channel mean
  int64_t* keys;            // workspace (B, N) when select_by_sort(N): order-preserving int64 keys
  char* out_tokens;         // (B, P + k, C) contiguous
  int64_t* indices;         // (B, k)
};

struct BackwardParams {
  const char* grad_out;     // (B, P + k, C), byte strides, unit channel stride
  int64_t g_stride_b, g_stride_n, token_bytes;
  const int64_t* indices;   // (B, k) contiguous
  int64_t B, n, P, k;
  int32_t* inverse;         // workspace (B, n - P)
  char* grad_x;             // (B, n, C) contiguous
};

// Whether rows of N patches are ranked by a sort (the caller sorts `keys`) rather than by the
// select kernel (which writes `indices` itself).
bool select_by_sort(int64_t N);
// The float64 channel mean alone (channel_mean): f (B, K, S) contiguous, or (B, S, K) when
// positions_major, into mean (B, S).
cudaError_t launch_channel_mean(const void* f, int f_type, bool positions_major, int64_t B,
                                int64_t K, int64_t S, double* mean, cudaStream_t stream);
// Channel mean, then either the indices (small N) or the keys (select_by_sort(N)).
cudaError_t launch_select(const ForwardParams& p, cudaStream_t stream);
// select_by_sort(N): indices from `sorted`, the keys sorted descending per row (row stride
// stride_b elements).
cudaError_t launch_decode_keys(const int64_t* sorted, int64_t stride_b, const ForwardParams& p,
                               cudaStream_t stream);
// out_tokens from x and indices.
cudaError_t launch_gather(const ForwardParams& p, cudaStream_t stream);
cudaError_t launch_backward(const BackwardParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace papr
