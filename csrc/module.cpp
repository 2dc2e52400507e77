// fastrlhf._C: the Python module shell and the schema of every op in the
// `fastrlhf` torch.library namespace. Kernels register their implementations
// with TORCH_LIBRARY_IMPL in their own files (CPU here, CUDA in csrc/cuda/).
//
// The module defines no Python functions: importing it runs the static
// registrations below, after which the ops live at torch.ops.fastrlhf.*.

#include <Python.h>
#include <torch/library.h>

extern "C" {
// Py_mod_exec-free module: `import fastrlhf._C` only needs to load the library.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fastrlhf compiled ops (see torch.ops.fastrlhf)", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastrlhf, m) {
  // Op schemas are declared here, once; see csrc/README in the source tree.
}
