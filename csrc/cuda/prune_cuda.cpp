// Torch glue of the CUDA kernels (compiled by the host compiler, so the .cu stays free of torch
// headers): checks, allocation of outputs and workspaces, the current stream, registration.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../papr_core.h"
#include "../ops/prune_args.h"
#include "prune_kernels.h"

namespace papr {
namespace {

int ftype_of(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    default: TORCH_CHECK(false, "papr_kernels: f must be float16, bfloat16, float32 or float64");
  }
}

std::tuple<at::Tensor, at::Tensor> prune_forward_cuda(const at::Tensor& x_in, const at::Tensor& f_in,
                                                      int64_t P, at::IntArrayRef grid, int64_t keep,
                                                      bool align_corners, bool spatial) {
  const ForwardShape s = check_forward(x_in, f_in, P, grid, keep);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = tokens_contiguous(x_in);
  const at::Tensor f = f_in.contiguous();
  at::Tensor out = at::empty({s.B, P + s.k, s.C}, x.options());
  at::Tensor indices = at::empty({s.B, s.k}, x.options().dtype(at::kLong));
  if (s.B == 0) return {out, indices};
  at::Tensor mean = at::empty({s.B, s.S}, f.options().dtype(at::kDouble));
  const bool by_sort = cuda::select_by_sort(s.N);
  at::Tensor keys;
  if (by_sort) keys = at::empty({s.B, s.N}, f.options().dtype(at::kLong));
  cuda::ForwardParams p{};
  const int64_t es = x.element_size();
  p.x = static_cast<const char*>(x.const_data_ptr());
  p.x_stride_b = x.stride(0) * es;
  p.x_stride_n = x.stride(1) * es;
  p.token_bytes = s.C * es;
  p.f = f.const_data_ptr();
  p.f_type = ftype_of(f.scalar_type());
  // score_at splits a patch index with 32-bit divisions.
  TORCH_CHECK(s.N <= INT32_MAX, "papr_kernels: the cuda kernel ranks at most 2^31 - 1 patches, "
              "got ", s.N);
  p.B = s.B; p.P = P; p.N = s.N; p.k = s.k; p.K = s.K; p.S = s.S; p.dims = s.dims;
  for (int d = 0; d < 3; ++d) { p.in[d] = s.in[d]; p.out[d] = s.out[d]; }
  p.align_corners = align_corners;
  p.spatial = spatial;
  p.mean = mean.data_ptr<double>();
  p.keys = by_sort ? keys.data_ptr<int64_t>() : nullptr;
  p.out_tokens = static_cast<char*>(out.data_ptr());
  p.indices = indices.data_ptr<int64_t>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err = cuda::launch_select(p, stream);
  TORCH_CHECK(err == cudaSuccess, "papr_kernels CUDA forward failed: ", cudaGetErrorString(err));
  if (by_sort) {
    // Large rows: sort the unique keys (segmented radix sort on the current stream, no host
    // sync), keep the first k, decode the index from the low word (papr::key_index).
    const at::Tensor top = std::get<0>(at::sort(keys, /*dim=*/1, /*descending=*/true)).narrow(1, 0, s.k);
    at::Tensor kept = top.bitwise_and(int64_t{0xffffffff}).neg_().add_(int64_t{0xffffffff});
    if (spatial) kept = std::get<0>(at::sort(kept, /*dim=*/1, /*descending=*/false));
    indices.copy_(kept);
  }
  err = cuda::launch_gather(p, stream);
  TORCH_CHECK(err == cudaSuccess, "papr_kernels CUDA forward failed: ", cudaGetErrorString(err));
  return {out, indices};
}

at::Tensor prune_backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& indices_in,
                               int64_t num_tokens, int64_t P) {
  check_backward(grad_out_in, indices_in, num_tokens, P);
  const c10::cuda::CUDAGuard guard(grad_out_in.device());
  const at::Tensor g = tokens_contiguous(grad_out_in);
  const at::Tensor indices = indices_in.contiguous();
  const int64_t B = g.size(0), C = g.size(2);
  at::Tensor grad_x = at::empty({B, num_tokens, C}, g.options());
  if (B == 0) return grad_x;
  at::Tensor inverse = at::empty({B, num_tokens - P}, indices.options().dtype(at::kInt));
  cuda::BackwardParams p{};
  const int64_t es = g.element_size();
  p.grad_out = static_cast<const char*>(g.const_data_ptr());
  p.g_stride_b = g.stride(0) * es;
  p.g_stride_n = g.stride(1) * es;
  p.token_bytes = C * es;
  p.indices = indices.const_data_ptr<int64_t>();
  p.B = B; p.n = num_tokens; p.P = P; p.k = indices.size(1);
  p.inverse = inverse.data_ptr<int32_t>();
  p.grad_x = static_cast<char*>(grad_x.data_ptr());
  const cudaError_t err = cuda::launch_backward(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "papr_kernels CUDA backward failed: ", cudaGetErrorString(err));
  return grad_x;
}

}  // namespace
}  // namespace papr

TORCH_LIBRARY_IMPL(papr_kernels, CUDA, m) {
  m.impl("prune_forward", &papr::prune_forward_cuda);
  m.impl("prune_backward", &papr::prune_backward_cuda);
}
