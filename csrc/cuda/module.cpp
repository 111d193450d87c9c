// The Python module stub of papr_kernels._C_cuda, the CUDA kernels (limited C API, no pybind11).
// papr_kernels/ops/extension.py loads the library from beside papr_kernels._C (after it) with
// torch.ops.load_library; its static initialisers register the CUDA implementations of the ops _C
// defines. A separate library because its glue links libtorch_cuda and the CUDA runtime, which a
// CPU-only torch does not have.
#include <Python.h>

extern "C" {
PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
