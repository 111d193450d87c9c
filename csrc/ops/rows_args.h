// Host-side argument checks of the row ops (gather_rows, put_rows_) shared by the CPU and CUDA
// glue (stable-ABI headers only, never included by a .cu file). The Python layer
// (hierarchical.py) has already checked the user's arguments; these keep direct torch.ops calls
// in bounds.
#pragma once
#include <cstdint>
#include <optional>

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

inline RowsShape check_masked_residual(const Tensor& shortcut, const Tensor& row_of,
                                       const Tensor& values, const std::optional<Tensor>& gamma) {
  const char* op = "masked_residual";
  PAPR_CHECK(shortcut.dim() == 4, "papr_kernels.masked_residual: shortcut must be 4-D (B, H, W, C), got ",
             sizes_of(shortcut));
  check_rows_dtype(shortcut, op, "shortcut");
  const int64_t B = shortcut.size(0), H = shortcut.size(1), W = shortcut.size(2),
                C = shortcut.size(3);
  PAPR_CHECK(row_of.dim() == 2 && row_of.size(0) == B && row_of.size(1) == H * W,
             "papr_kernels.masked_residual: row_of must be (B, H*W) = (", B, ", ", H * W,
             "), got ", sizes_of(row_of));
  PAPR_CHECK(row_of.scalar_type() == ScalarType::Int,
             "papr_kernels.masked_residual: row_of must be int32, got ", row_of.scalar_type());
  PAPR_CHECK(values.dim() == 3 && values.size(0) == B && values.size(2) == C,
             "papr_kernels.masked_residual: values must be (B, k, C) with B = ", B, ", C = ", C,
             ", got ", sizes_of(values));
  PAPR_CHECK(values.scalar_type() == shortcut.scalar_type(), "papr_kernels.masked_residual: values (",
             values.scalar_type(), ") must have the dtype of shortcut (", shortcut.scalar_type(), ")");
  if (gamma.has_value()) {
    PAPR_CHECK(gamma->dim() == 1 && gamma->size(0) == C,
               "papr_kernels.masked_residual: gamma must be (C,) = (", C, ",), got ",
               sizes_of(*gamma));
    PAPR_CHECK(gamma->scalar_type() == shortcut.scalar_type(), "papr_kernels.masked_residual: gamma (",
               gamma->scalar_type(), ") must have the dtype of shortcut (", shortcut.scalar_type(), ")");
    PAPR_CHECK(same_device(*gamma, shortcut), "papr_kernels.masked_residual: gamma and shortcut must be on one device");
  }
  PAPR_CHECK(same_device(row_of, shortcut) && same_device(values, shortcut),
             "papr_kernels.masked_residual: row_of (", device_of(row_of), "), values (",
             device_of(values), ") and shortcut (", device_of(shortcut), ") must be on one device");
  return RowsShape{B, H, W, C, values.size(1)};
}

}  // namespace papr
