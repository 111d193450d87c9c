// Host-side argument checks of the row ops (gather_rows, put_rows_) shared by the CPU and CUDA
// glue (torch headers OK here, never included by a .cu file). The Python layer (hierarchical.py)
// has already checked the user's arguments; these keep direct torch.ops calls in bounds.
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <cstdint>

namespace papr {

struct RowsShape {
  int64_t B, H, W, C, k;
};

inline void check_rows_dtype(const at::Tensor& t, const char* op, const char* name) {
  const at::ScalarType s = t.scalar_type();
  TORCH_CHECK(s == at::kHalf || s == at::kBFloat16 || s == at::kFloat || s == at::kDouble,
              "papr_kernels.", op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", s);
}

inline void check_rows_indices(const at::Tensor& indices, const at::Tensor& grid, const char* op,
                               const char* name) {
  TORCH_CHECK(indices.dim() == 2, "papr_kernels.", op, ": indices must be 2-D (B, k), got ",
              indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong, "papr_kernels.", op,
              ": indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK(indices.size(0) == grid.size(0), "papr_kernels.", op, ": indices has batch ",
              indices.size(0), " but ", name, " has ", grid.size(0));
  TORCH_CHECK(indices.device() == grid.device(), "papr_kernels.", op, ": indices (",
              indices.device(), ") and ", name, " (", grid.device(), ") must be on one device");
}

inline RowsShape check_gather_rows(const at::Tensor& x, const at::Tensor& indices) {
  TORCH_CHECK(x.dim() == 4, "papr_kernels.gather_rows: x must be 4-D (B, H, W, C), got ",
              x.sizes());
  check_rows_dtype(x, "gather_rows", "x");
  check_rows_indices(indices, x, "gather_rows", "x");
  return RowsShape{x.size(0), x.size(1), x.size(2), x.size(3), indices.size(1)};
}

inline RowsShape check_put_rows(const at::Tensor& out, const at::Tensor& indices,
                                const at::Tensor& values) {
  TORCH_CHECK(out.dim() == 4, "papr_kernels.put_rows_: out must be 4-D (B, H, W, C), got ",
              out.sizes());
  TORCH_CHECK(values.dim() == 3, "papr_kernels.put_rows_: values must be 3-D (B, k, C), got ",
              values.sizes());
  check_rows_dtype(out, "put_rows_", "out");
  TORCH_CHECK(values.scalar_type() == out.scalar_type(), "papr_kernels.put_rows_: values (",
              values.scalar_type(), ") must have the dtype of out (", out.scalar_type(), ")");
  check_rows_indices(indices, out, "put_rows_", "out");
  TORCH_CHECK(values.device() == out.device(), "papr_kernels.put_rows_: values (",
              values.device(), ") and out (", out.device(), ") must be on one device");
  TORCH_CHECK(values.size(0) == out.size(0) && values.size(1) == indices.size(1) &&
                  values.size(2) == out.size(3),
              "papr_kernels.put_rows_: values must be (B, k, C) = (", out.size(0), ", ",
              indices.size(1), ", ", out.size(3), "), got ", values.sizes());
  // Every (b, j) row is written by one thread / block: out must not alias itself (an expanded
  // tensor) or the inputs it is read from.
  at::assert_no_internal_overlap(out);
  at::assert_no_overlap(out, values);
  at::assert_no_overlap(out, indices);
  return RowsShape{out.size(0), out.size(1), out.size(2), out.size(3), indices.size(1)};
}

}  // namespace papr
