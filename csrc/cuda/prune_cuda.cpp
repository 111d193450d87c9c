// Torch glue of the CUDA kernels (compiled by the host compiler, so the .cu stays free of torch
// headers): checks, allocation of outputs and workspaces, the current stream, registration.
// Stable ABI only (csrc/stable.h, glue.h).
#include <optional>

#include "../papr_core.h"
#include "../ops/prune_args.h"
#include "../stable.h"
#include "prune_kernels.h"
#include "glue.h"

namespace papr {
namespace {

std::tuple<Tensor, Tensor> prune_forward_cuda(const Tensor& x_in, const Tensor& f_in, int64_t P,
                                              std::vector<int64_t> grid, int64_t keep,
                                              bool align_corners, bool spatial) {
  const ForwardShape s = check_forward(x_in, f_in, P, grid, keep);
  const DeviceGuard guard(x_in.get_device_index());
  const Tensor x = tokens_contiguous(x_in);
  const Tensor f = features_as_read(f_in);
  Tensor out = empty_on(x, {s.B, P + s.k, s.C});
  Tensor indices = empty_on(x, {s.B, s.k}, ScalarType::Long);
  if (s.B == 0) return {out, indices};
  Tensor mean = empty_on(f, {s.B, s.S}, ScalarType::Double);
  const bool by_sort = cuda::select_by_sort(s.N);
  // Large rows: every key to a workspace, sorted below.
  std::optional<Tensor> keys;
  if (by_sort) keys = empty_on(f, {s.B, s.N}, ScalarType::Long);
  cuda::ForwardParams p{};
  const int64_t es = x.element_size();
  p.x = static_cast<const char*>(x.const_data_ptr());
  p.x_stride_b = x.stride(0) * es;
  p.x_stride_n = x.stride(1) * es;
  p.token_bytes = s.C * es;
  p.f = f.const_data_ptr();
  p.f_type = ftype_of(f, "f");
  p.f_positions_major = positions_major(f);
  // score_at splits a patch index with 32-bit divisions.
  PAPR_CHECK(s.N <= INT32_MAX, "papr_kernels: the cuda kernel ranks at most 2^31 - 1 patches, "
              "got ", s.N);
  p.B = s.B; p.P = P; p.N = s.N; p.k = s.k; p.K = s.K; p.S = s.S; p.dims = s.dims;
  for (int d = 0; d < 3; ++d) { p.in[d] = s.in[d]; p.out[d] = s.out[d]; }
  p.align_corners = align_corners;
  p.spatial = spatial;
  p.mean = mean.mutable_data_ptr<double>();
  p.keys = by_sort ? keys->mutable_data_ptr<int64_t>() : nullptr;
  p.out_tokens = static_cast<char*>(out.mutable_data_ptr());
  p.indices = indices.mutable_data_ptr<int64_t>();
  const cudaStream_t stream = current_stream(x);
  check_launch(cuda::launch_select(p, stream), "forward");
  if (by_sort) {
    // Large rows: sort the unique keys (torch.sort: a segmented radix sort on the current
    // stream, no host sync), then the first k decoded into indices (papr::key_index).
    const Tensor sorted = sorted_values(*keys, /*dim=*/1, /*descending=*/true);
    check_launch(cuda::launch_decode_keys(sorted.const_data_ptr<int64_t>(), sorted.stride(0), p,
                                          stream), "forward");
    if (spatial) torch::stable::copy_(indices, sorted_values(indices, /*dim=*/1, /*descending=*/false));
  }
  check_launch(cuda::launch_gather(p, stream), "forward");
  return {out, indices};
}

Tensor prune_backward_cuda(const Tensor& grad_out_in, const Tensor& indices_in, int64_t num_tokens,
                           int64_t P) {
  check_backward(grad_out_in, indices_in, num_tokens, P);
  const DeviceGuard guard(grad_out_in.get_device_index());
  const Tensor g = tokens_contiguous(grad_out_in);
  const Tensor indices = as_contiguous(indices_in);
  const int64_t B = g.size(0), C = g.size(2);
  Tensor grad_x = empty_on(g, {B, num_tokens, C});
  if (B == 0) return grad_x;
  Tensor inverse = empty_on(indices, {B, num_tokens - P}, ScalarType::Int);
  cuda::BackwardParams p{};
  const int64_t es = g.element_size();
  p.grad_out = static_cast<const char*>(g.const_data_ptr());
  p.g_stride_b = g.stride(0) * es;
  p.g_stride_n = g.stride(1) * es;
  p.token_bytes = C * es;
  p.indices = indices.const_data_ptr<int64_t>();
  p.B = B; p.n = num_tokens; p.P = P; p.k = indices.size(1);
  p.inverse = inverse.mutable_data_ptr<int32_t>();
  p.grad_x = static_cast<char*>(grad_x.mutable_data_ptr());
  check_launch(cuda::launch_backward(p, current_stream(g)), "backward");
  return grad_x;
}

Tensor channel_mean_cuda(const Tensor& f_in) {
  const int64_t S = check_channel_mean(f_in);
  const DeviceGuard guard(f_in.get_device_index());
  const Tensor f = features_as_read(f_in);
  Tensor out = empty_mean(f);
  check_launch(cuda::launch_channel_mean(f.const_data_ptr(), ftype_of(f, "f"), positions_major(f),
                                         f.size(0), f.size(1), S, out.mutable_data_ptr<double>(),
                                         current_stream(f)), "channel_mean");
  return out;
}

}  // namespace
}  // namespace papr

STABLE_TORCH_LIBRARY_IMPL(papr_kernels, CUDA, m) {
  m.impl("prune_forward", TORCH_BOX(&papr::prune_forward_cuda));
  m.impl("prune_backward", TORCH_BOX(&papr::prune_backward_cuda));
  m.impl("channel_mean", TORCH_BOX(&papr::channel_mean_cuda));
}
