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

  // GAE over packed sequences (csrc/gae_cpu.cpp, csrc/cuda/gae_cuda.cpp). Its fake
  // (meta) implementation for torch.compile is registered from Python;
  // set_python_module tells torch which module to import to find it, and applies to
  // the defs that follow until the next call.
  m.set_python_module("fastrlhf.ops.advantages");
  m.def(
      "packed_gae(Tensor rewards, Tensor values, Tensor cu_seqlens, float gamma=1.0, "
      "float lam=0.95, Tensor? mask=None, Tensor? bootstrap=None, bool validate=False) "
      "-> (Tensor, Tensor)");
}
