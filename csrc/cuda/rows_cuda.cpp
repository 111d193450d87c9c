// Torch glue of the row-op CUDA kernels (rows_kernels.cu, free of torch headers): checks,
// output allocation, the current stream, registration.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../papr_core.h"
#include "../ops/rows_args.h"
#include "rows_kernels.h"

namespace papr {
namespace {

template <typename T> constexpr int ftype_v = kF32;
template <> constexpr int ftype_v<at::Half> = kF16;
template <> constexpr int ftype_v<at::BFloat16> = kBF16;
template <> constexpr int ftype_v<double> = kF64;

int rows_ftype(at::ScalarType t) {
  int f = kF32;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "papr_rows_cuda", [&] {
    f = ftype_v<scalar_t>;
  });
  return f;
}

// Pointer of a tensor the kernel only reads (const_data_ptr: no copy-on-write materialisation);
// non-const because the params struct serves both directions.
char* read_only_ptr(const at::Tensor& t) {
  return const_cast<char*>(static_cast<const char*>(t.const_data_ptr()));
}

// grid (B, H, W, C) and rows (B, k, C): b/h/w and b/j strides in bytes, channel strides in elements.
// The side written is `out_is_grid ? grid : rows`.
cuda::RowsParams make_params(const at::Tensor& grid, const at::Tensor& rows,
                             const at::Tensor& indices, const RowsShape& s, bool out_is_grid) {
  cuda::RowsParams p{};
  const int64_t es = grid.element_size();
  p.grid = out_is_grid ? static_cast<char*>(grid.data_ptr()) : read_only_ptr(grid);
  p.g_sb = grid.stride(0) * es; p.g_sh = grid.stride(1) * es; p.g_sw = grid.stride(2) * es;
  p.g_sc = grid.stride(3);
  p.rows = out_is_grid ? read_only_ptr(rows) : static_cast<char*>(rows.data_ptr());
  p.r_sb = rows.stride(0) * es; p.r_sk = rows.stride(1) * es; p.r_sc = rows.stride(2);
  p.indices = indices.const_data_ptr<int64_t>();
  p.B = s.B; p.H = s.H; p.W = s.W; p.C = s.C; p.k = s.k;
  p.elem_bytes = static_cast<int>(es);
  p.f_type = rows_ftype(grid.scalar_type());
  return p;
}

at::Tensor gather_rows_cuda(const at::Tensor& x, const at::Tensor& indices_in) {
  const RowsShape s = check_gather_rows(x, indices_in);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({s.B, s.k, s.C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor indices = indices_in.contiguous();
  const cuda::RowsParams p = make_params(x, out, indices, s, /*out_is_grid=*/false);
  const cudaError_t err = cuda::launch_gather_rows(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "papr_kernels CUDA gather_rows failed: ", cudaGetErrorString(err));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void put_rows_cuda(at::Tensor& out, const at::Tensor& indices_in, const at::Tensor& values,
                   bool accumulate) {
  const RowsShape s = check_put_rows(out, indices_in, values);
  if (s.B == 0 || s.k == 0 || s.C == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor indices = indices_in.contiguous();
  const cuda::RowsParams p = make_params(out, values, indices, s, /*out_is_grid=*/true);
  const cudaError_t err = cuda::launch_put_rows(p, accumulate, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "papr_kernels CUDA put_rows_ failed: ", cudaGetErrorString(err));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace papr

TORCH_LIBRARY_IMPL(papr_kernels, CUDA, m) {
  m.impl("gather_rows", &papr::gather_rows_cuda);
  m.impl("put_rows_", &papr::put_rows_cuda);
}
