// Launchers of the row-op kernels (rows_kernels.cu). Plain C++ types only: no torch headers, so
// the .cu compiles fast; the torch glue (rows_cuda.cpp) checks, allocates and passes raw pointers.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace papr {
namespace cuda {

struct RowsParams {
  char* grid;                // (B, H, W, C): byte strides of b, h, w; channel stride in elements
  int64_t g_sb, g_sh, g_sw, g_sc;
  char* rows;                // (B, k, C): byte strides of b, j; channel stride in elements
  int64_t r_sb, r_sk, r_sc;
  const int64_t* indices;    // (B, k) contiguous, positions in [0, H*W) (others: masked)
  int64_t B, H, W, C, k;
  int elem_bytes;            // 2, 4 or 8
  int f_type;                // papr::FType (used by the accumulating put)
};

// rows[b, j, :] = grid[b, p // W, p % W, :], p = indices[b, j]; `rows` is written.
cudaError_t launch_gather_rows(const RowsParams& p, cudaStream_t stream);
// grid[b, p // W, p % W, :] = (accumulate ? grid[...] + : ) rows[b, j, :]; `grid` is written.
cudaError_t launch_put_rows(const RowsParams& p, bool accumulate, cudaStream_t stream);

}  // namespace cuda
}  // namespace papr
