// The current CUDA stream and a device guard through the stable ABI (the glue of csrc/cuda only:
// it links libtorch_cuda, so it lives in the companion library papr_kernels._C_cuda, which a
// CPU-only torch never loads).
#pragma once
#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include "../stable.h"

namespace papr {

inline cudaStream_t current_stream(const Tensor& t) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
  return static_cast<cudaStream_t>(stream);
}

using DeviceGuard = torch::stable::accelerator::DeviceGuard;

inline void check_launch(cudaError_t err, const char* what) {
  PAPR_CHECK(err == cudaSuccess, "papr_kernels CUDA ", what, " failed: ", cudaGetErrorString(err));
}

}  // namespace papr
