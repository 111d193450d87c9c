// Host-side argument checks of the row ops (gather_rows, put_rows_) shared by the CPU and CUDA
// glue (stable-ABI headers only, never included by a .cu file). The Python layer
// (hierarchical.py) has already checked the user's arguments; these keep direct torch.ops calls
// in bounds.
#pragma once
#include <cstdint>

#include "../stable.h"

namespace papr {

struct RowsShape {
  int64_t B, H, W, C, k;
};

inline void check_rows_dtype(const Tensor& t, const char* op, const char* name) {
  PAPR_CHECK(is_float_type(t.scalar_type()), "papr_kernels.", op, ": ", name,
             " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

inline void check_rows_indices(const Tensor& indices, const Tensor& grid, const char* op,
                               const char* name) {
  PAPR_CHECK(indices.dim() == 2, "papr_kernels.", op, ": indices must be 2-D (B, k), got ",
             sizes_of(indices));
  PAPR_CHECK(indices.scalar_type() == ScalarType::Long, "papr_kernels.", op,
             ": indices must be int64, got ", indices.scalar_type());
  PAPR_CHECK(indices.size(0) == grid.size(0), "papr_kernels.", op, ": indices has batch ",
             indices.size(0), " but ", name, " has ", grid.size(0));
  PAPR_CHECK(same_device(indices, grid), "papr_kernels.", op, ": indices (", device_of(indices),
             ") and ", name, " (", device_of(grid), ") must be on one device");
}

inline RowsShape check_gather_rows(const Tensor& x, const Tensor& indices) {
  PAPR_CHECK(x.dim() == 4, "papr_kernels.gather_rows: x must be 4-D (B, H, W, C), got ", sizes_of(x));
  check_rows_dtype(x, "gather_rows", "x");
  check_rows_indices(indices, x, "gather_rows", "x");
  return RowsShape{x.size(0), x.size(1), x.size(2), x.size(3), indices.size(1)};
}

inline RowsShape check_put_rows(const Tensor& out, const Tensor& indices, const Tensor& values) {
  PAPR_CHECK(out.dim() == 4, "papr_kernels.put_rows_: out must be 4-D (B, H, W, C), got ",
             sizes_of(out));
  PAPR_CHECK(values.dim() == 3, "papr_kernels.put_rows_: values must be 3-D (B, k, C), got ",
             sizes_of(values));
  check_rows_dtype(out, "put_rows_", "out");
  PAPR_CHECK(values.scalar_type() == out.scalar_type(), "papr_kernels.put_rows_: values (",
             values.scalar_type(), ") must have the dtype of out (", out.scalar_type(), ")");
  check_rows_indices(indices, out, "put_rows_", "out");
  PAPR_CHECK(same_device(values, out), "papr_kernels.put_rows_: values (", device_of(values),
             ") and out (", device_of(out), ") must be on one device");
  PAPR_CHECK(values.size(0) == out.size(0) && values.size(1) == indices.size(1) &&
                 values.size(2) == out.size(3),
             "papr_kernels.put_rows_: values must be (B, k, C) = (", out.size(0), ", ",
             indices.size(1), ", ", out.size(3), "), got ", sizes_of(values));
  // Every (b, j) row is written by one thread / block: out must not alias itself (an expanded
  // tensor) or the inputs it is read from.
  check_no_internal_overlap(out, "put_rows_", "out");
  check_no_overlap(out, values, "put_rows_", "out", "values");
  check_no_overlap(out, indices, "put_rows_", "out", "indices");
  return RowsShape{out.size(0), out.size(1), out.size(2), out.size(3), indices.size(1)};
}

}  // namespace papr
