// Torch glue of the row-op CUDA kernels (rows_kernels.cu, free of torch headers): checks,
// output allocation, the current stream, registration. Stable ABI only (csrc/stable.h, glue.h).
#include "../papr_core.h"
#include "../ops/rows_args.h"
#include "../stable.h"
#include "rows_kernels.h"
#include "glue.h"

namespace papr {
namespace {

// Pointer of a tensor the kernel only reads (const_data_ptr: no copy-on-write materialisation);
// non-const because the params struct serves both directions.
char* read_only_ptr(const Tensor& t) {
  return const_cast<char*>(static_cast<const char*>(t.const_data_ptr()));
}

// grid (B, H, W, C) and rows (B, k, C): b/h/w and b/j strides in bytes, channel strides in elements.
// The side written is `out_is_grid ? grid : rows`.
cuda::RowsParams make_params(const Tensor& grid, const Tensor& rows, const Tensor& indices,
                             const RowsShape& s, bool out_is_grid) {
  cuda::RowsParams p{};
  const int64_t es = grid.element_size();
  p.grid = out_is_grid ? static_cast<char*>(grid.mutable_data_ptr()) : read_only_ptr(grid);
  p.g_sb = grid.stride(0) * es; p.g_sh = grid.stride(1) * es; p.g_sw = grid.stride(2) * es;
  p.g_sc = grid.stride(3);
  p.rows = out_is_grid ? read_only_ptr(rows) : static_cast<char*>(rows.mutable_data_ptr());
  p.r_sb = rows.stride(0) * es; p.r_sk = rows.stride(1) * es; p.r_sc = rows.stride(2);
  p.indices = indices.const_data_ptr<int64_t>();
  p.B = s.B; p.H = s.H; p.W = s.W; p.C = s.C; p.k = s.k;
  p.elem_bytes = static_cast<int>(es);
  p.f_type = ftype_of(grid, out_is_grid ? "out" : "x");
  return p;
}

Tensor gather_rows_cuda(const Tensor& x, const Tensor& indices_in) {
  const RowsShape s = check_gather_rows(x, indices_in);
  const DeviceGuard guard(x.get_device_index());
  Tensor out = empty_on(x, {s.B, s.k, s.C});
  if (out.numel() == 0) return out;
  const Tensor indices = as_contiguous(indices_in);
  const cuda::RowsParams p = make_params(x, out, indices, s, /*out_is_grid=*/false);
  check_launch(cuda::launch_gather_rows(p, current_stream(x)), "gather_rows");
  return out;
}

void put_rows_cuda(Tensor out, const Tensor& indices_in, const Tensor& values, bool accumulate) {
  const RowsShape s = check_put_rows(out, indices_in, values);
  if (s.B == 0 || s.k == 0 || s.C == 0) return;
  const DeviceGuard guard(out.get_device_index());
  const Tensor indices = as_contiguous(indices_in);
  const cuda::RowsParams p = make_params(out, values, indices, s, /*out_is_grid=*/true);
  check_launch(cuda::launch_put_rows(p, accumulate, current_stream(out)), "put_rows_");
}

}  // namespace
}  // namespace papr

STABLE_TORCH_LIBRARY_IMPL(papr_kernels, CUDA, m) {
  m.impl("gather_rows", TORCH_BOX(&papr::gather_rows_cuda));
  m.impl("put_rows_", TORCH_BOX(&papr::put_rows_cuda));
}
