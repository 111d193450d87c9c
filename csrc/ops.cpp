// The operator schemas, in one place, and the Python module stub (no pybind11: builds fast) with
// its one function, build_info().
// Kernels: csrc/cpu/prune_cpu.cpp (CPU), csrc/cuda/prune_cuda.cpp (CUDA, when built with CUDA);
// the row ops: csrc/cpu/rows_cpu.cpp, csrc/cuda/rows_cuda.cpp.
// Fake (meta) kernels and autograd are registered from Python: papr_kernels/ops/cpp_prune.py.
#include <Python.h>
#include <torch/library.h>

// What this binary was built for, as JSON (torch version, CUDA toolkit, SASS architectures, PTX):
// setup.py passes it as a list of byte values, immune to shell and ninja quoting.
#ifndef PAPR_BUILD_INFO_BYTES
#define PAPR_BUILD_INFO_BYTES '{', '}'
#endif

namespace {
const char kBuildInfo[] = {PAPR_BUILD_INFO_BYTES, 0};

PyObject* build_info(PyObject*, PyObject*) { return PyUnicode_FromString(kBuildInfo); }

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS,
     "JSON: the torch version, CUDA toolkit, GPU architectures and PTX this extension was built for."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" {
// `import papr_kernels._C` loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(papr_kernels, m) {
  // Select (SPEC's total order) + gather. Returns (out (B, P + keep, C), indices (B, keep) int64).
  m.def("prune_forward(Tensor x, Tensor f, int num_prefix_tokens, int[] grid, int keep, "
        "bool align_corners, bool spatial) -> (Tensor, Tensor)");
  // Gradient of the gather: grad_out rows put back at the kept positions, zeros elsewhere.
  m.def("prune_backward(Tensor grad_out, Tensor indices, int num_tokens, int num_prefix_tokens) "
        "-> Tensor");
  // Rows of x (B, H, W, C), any strides, at positions p = indices (B, k): new contiguous (B, k, C).
  m.def("gather_rows(Tensor x, Tensor indices) -> Tensor");
  // out[b, p // W, p % W] = values[b, j] (accumulate: out + values, rounded like torch's a + b).
  m.def("put_rows_(Tensor(a!) out, Tensor indices, Tensor values, bool accumulate) -> ()");
}
