// The deqkern._C_cuda extension module. `import deqkern._C_cuda` loads this library, whose static initialisers
// register the CUDA kernels (csrc/<op>/<op>_cuda.cu, TORCH_LIBRARY_IMPL(deqkern, CUDA, m)) for the schemas that
// deqkern._C declares. The module reports the constants it was built with, as deqkern._C does.
#include <Python.h>

#include "common/module_constants.h"

// PyMODINIT_FUNC is extern "C" and exports the symbol even under -fvisibility=hidden.
PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1,
                                          deqkern::module_methods()};
  return PyModule_Create(&module_def);
}
