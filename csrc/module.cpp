// The deqkern._C extension module. `import deqkern._C` loads this library, whose static initialisers declare every
// op's schema (csrc/<op>/<op>.cpp, TORCH_LIBRARY_FRAGMENT) and register the CPU kernels (csrc/<op>/<op>_cpu.cpp);
// everything is then reached through torch.ops.deqkern. The module itself only reports the constants it was built
// with (common/constants.h), which tests/test_constants.py compares with deqkern/core/constants.py.
#include <Python.h>

#include <torch/library.h>

#include "common/module_constants.h"

// Claims the namespace (an op library may be defined once); the ops are declared by the fragments of each op folder.
TORCH_LIBRARY(deqkern, m) {}

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          deqkern::module_methods()};
  return PyModule_Create(&module_def);
}
