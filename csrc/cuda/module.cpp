// `import deqkern._C_cuda` loads this library, whose static initialisers register the CUDA kernels
// (TORCH_LIBRARY_IMPL(deqkern, CUDA, m)) for the schemas that deqkern._C declares. The module is empty.
#include <Python.h>

// PyMODINIT_FUNC is extern "C" and exports the symbol even under -fvisibility=hidden.
PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
