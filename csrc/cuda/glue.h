// What the torch glue of the CUDA kernels shares (csrc/cuda/*.cpp only): the current CUDA stream
// and a device guard through the stable ABI (the stream links libtorch_cuda, so this lives in the
// companion library papr_kernels._C_cuda, which a CPU-only torch never loads), the launch check,
// and a tensor's element type as the kernels' papr::FType.
#pragma once
#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include "../papr_core.h"
#include "../stable.h"

namespace papr {

inline cudaStream_t current_stream(const Tensor& t) {
  void* stream = nullptr;
  PAPR_SHIM_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
  return static_cast<cudaStream_t>(stream);
}

using DeviceGuard = torch::stable::accelerator::DeviceGuard;

// The kernels' element type of t (float16, bfloat16, float32 or float64; checked before).
inline int ftype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case ScalarType::Half: return kF16;
    case ScalarType::BFloat16: return kBF16;
    case ScalarType::Float: return kF32;
    case ScalarType::Double: return kF64;
    default:
      fail("papr_kernels: ", name, " must be float16, bfloat16, float32 or float64, got ",
           t.scalar_type());
  }
}

inline void check_launch(cudaError_t err, const char* what) {
  PAPR_CHECK(err == cudaSuccess, "papr_kernels CUDA ", what, " failed: ", cudaGetErrorString(err));
}

}  // namespace papr
