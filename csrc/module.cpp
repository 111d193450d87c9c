// The Python module stub of papr_kernels._C (no pybind11: builds fast) with its one function,
// build_info(). Importing it loads the library, whose static initialisers register the ops:
// schemas in csrc/ops/prune.cpp and csrc/ops/rows.cpp, kernels in csrc/cpu and csrc/cuda.
#include <Python.h>

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
// `import papr_kernels._C` loads this library, which runs the op registrations.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}
