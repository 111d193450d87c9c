// The package's view of PyTorch's stable ABI (torch/csrc/stable, torch/headeronly): the only
// torch headers the host code includes, so one binary loads into every torch >= 2.10 (setup.py
// sets TORCH_TARGET_VERSION to 2.10: an API newer than that does not compile). Never included
// by a .cu file.
//   PAPR_CHECK(cond, parts...)   throws std::runtime_error (a RuntimeError in Python) with the
//                                parts streamed together (sizes_of, device_of format tensors)
//   papr::call_dispatcher        an ATen op by name, for what the stable ops do not wrap
//   check_no_internal_overlap / check_no_overlap   the cases ATen's assert_no_*overlap reject
#pragma once
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

// A shim call that failed throws. torch 2.14's headers name the check
// STABLE_TORCH_ERROR_CODE_CHECK; 2.10's and 2.11's (what a --no-build-isolation build on the
// user's torch compiles against) have only TORCH_ERROR_CODE_CHECK.
#ifdef STABLE_TORCH_ERROR_CODE_CHECK
#define PAPR_SHIM_CHECK(call) STABLE_TORCH_ERROR_CODE_CHECK(call)
#else
#define PAPR_SHIM_CHECK(call) TORCH_ERROR_CODE_CHECK(call)
#endif

// glibc 2.34 moved dlsym (which torch's stable headers call) into libc.so.6 under a new symbol
// version. Binding its first version keeps the extension loadable on glibc 2.28-2.33
// (manylinux_2_28, like torch's wheels), where libdl (linked by libc10) provides it; the same
// function on every glibc. tools/glibc_floor.py checks the whole floor.
#if defined(__GLIBC__) && defined(__x86_64__)
__asm__(".symver dlsym,dlsym@GLIBC_2.2.5");
#elif defined(__GLIBC__) && defined(__aarch64__)
__asm__(".symver dlsym,dlsym@GLIBC_2.17");
#endif

namespace papr {

using Tensor = torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;

// ---- error messages ----------------------------------------------------------------------------

// "[2, 197, 768]"
inline std::string sizes_of(const Tensor& t) {
  std::ostringstream os;
  os << '[';
  for (int64_t d = 0; d < t.dim(); ++d) os << (d ? ", " : "") << t.size(d);
  os << ']';
  return os.str();
}

// "cpu", "cuda:0"
inline std::string device_of(const Tensor& t) {
  if (t.is_cpu()) return "cpu";
  if (t.is_cuda()) return "cuda:" + std::to_string(t.get_device_index());
  return "device type " + std::to_string(static_cast<int>(t.device().type()));
}

template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw std::runtime_error(os.str());
}

#define PAPR_CHECK(cond, ...)                \
  do {                                       \
    if (!(cond)) ::papr::fail(__VA_ARGS__); \
  } while (0)

// ---- tensors ------------------------------------------------------------------------------------

inline bool same_device(const Tensor& a, const Tensor& b) {
  return a.device().type() == b.device().type() && a.get_device_index() == b.get_device_index();
}

inline bool is_float_type(ScalarType t) {
  return t == ScalarType::Half || t == ScalarType::BFloat16 || t == ScalarType::Float ||
         t == ScalarType::Double;
}

// A new contiguous tensor on t's device, of t's dtype unless `dtype` is given. Through the shim's
// aoti_torch_empty_strided (an unboxed at::empty_strided): a dispatcher call with a boxed stack
// (torch::stable::new_empty) costs about 1 us more, which a B = 1 call feels.
inline Tensor empty_on(const Tensor& t, std::initializer_list<int64_t> sizes,
                       std::optional<ScalarType> dtype = std::nullopt) {
  constexpr size_t kMaxDims = 8;
  PAPR_CHECK(sizes.size() <= kMaxDims, "papr_kernels: too many dimensions");
  int64_t size[kMaxDims], stride[kMaxDims];
  const int64_t n = static_cast<int64_t>(sizes.size());
  std::copy(sizes.begin(), sizes.end(), size);
  for (int64_t d = n - 1, step = 1; d >= 0; --d) {
    stride[d] = step;
    step *= std::max<int64_t>(size[d], 1);
  }
  int32_t shim_dtype = 0, device_type = 0, device_index = 0;
  if (dtype) {
    shim_dtype = torch::stable::detail::to<int32_t>(torch::stable::detail::from(*dtype));
  } else {
    PAPR_SHIM_CHECK(aoti_torch_get_dtype(t.get(), &shim_dtype));
  }
  PAPR_SHIM_CHECK(aoti_torch_get_device_type(t.get(), &device_type));
  PAPR_SHIM_CHECK(aoti_torch_get_device_index(t.get(), &device_index));
  AtenTensorHandle out = nullptr;
  PAPR_SHIM_CHECK(aoti_torch_empty_strided(n, size, stride, shim_dtype, device_type,
                                           device_index, &out));
  return Tensor(out);
}

inline Tensor zeros_on(const Tensor& t, std::initializer_list<int64_t> sizes,
                       std::optional<ScalarType> dtype = std::nullopt) {
  Tensor out = empty_on(t, sizes, dtype);
  torch::stable::zero_(out);
  return out;
}

// t itself when contiguous (no dispatcher call: the common case costs nothing), else a copy.
inline Tensor as_contiguous(const Tensor& t) {
  return t.is_contiguous() ? t : torch::stable::contiguous(t);
}

// An ATen op through the dispatcher: the stack holds the inputs, then the outputs.
template <size_t N>
void call_dispatcher(const char* op, const char* overload, std::array<StableIValue, N>& stack) {
  PAPR_SHIM_CHECK(torch_call_dispatcher(op, overload, stack.data(), TORCH_ABI_VERSION));
}

// torch.sort(t, dim, descending).values.
inline Tensor sorted_values(const Tensor& t, int64_t dim, bool descending) {
  std::array<StableIValue, 3> stack{torch::stable::detail::from(t), torch::stable::detail::from(dim),
                                    torch::stable::detail::from(descending)};
  call_dispatcher("aten::sort", "", stack);
  Tensor values = torch::stable::detail::to<Tensor>(stack[0]);
  (void)torch::stable::detail::to<Tensor>(stack[1]);  // releases the indices
  return values;
}

// ---- memory overlap (what ATen's assert_no_internal_overlap / assert_no_overlap reject) --------

// Strides that are a permutation of a contiguous layout: no two elements share memory and the
// elements cover [data, data + numel * element_size) exactly.
inline bool non_overlapping_and_dense(const Tensor& t) {
  std::vector<int64_t> dims;
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) != 1) dims.push_back(d);
  std::sort(dims.begin(), dims.end(), [&](int64_t a, int64_t b) { return t.stride(a) < t.stride(b); });
  int64_t expected = 1;
  for (int64_t d : dims) {
    if (t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

// A tensor whose elements alias each other (an expanded dimension): a kernel writing it would
// write one location from several threads.
inline void check_no_internal_overlap(const Tensor& t, const char* op, const char* name) {
  if (non_overlapping_and_dense(t)) return;
  for (int64_t d = 0; d < t.dim(); ++d)
    PAPR_CHECK(!(t.stride(d) == 0 && t.size(d) > 1), "papr_kernels.", op, ": ", name,
               " has elements that refer to a single memory location (an expanded tensor); "
               "pass a tensor that owns its memory, e.g. ", name, ".clone()");
}

// `written` and `read` share memory (both dense, byte ranges intersecting).
inline void check_no_overlap(const Tensor& written, const Tensor& read, const char* op,
                             const char* written_name, const char* read_name) {
  if (written.numel() == 0 || read.numel() == 0) return;
  if (!non_overlapping_and_dense(written) || !non_overlapping_and_dense(read)) return;
  const auto* a0 = static_cast<const char*>(written.const_data_ptr());
  const auto* b0 = static_cast<const char*>(read.const_data_ptr());
  const auto* a1 = a0 + written.numel() * static_cast<int64_t>(written.element_size());
  const auto* b1 = b0 + read.numel() * static_cast<int64_t>(read.element_size());
  PAPR_CHECK(a1 <= b0 || b1 <= a0, "papr_kernels.", op, ": ", written_name, " and ", read_name,
             " share memory; pass a ", read_name, " that does not alias ", written_name);
}

}  // namespace papr
