// The `constants()` function of the extension modules (module.cpp, cuda_module.cpp): the values of constants.h this
// library was compiled with, so that tests/test_constants.py can compare them with deqkern/core/constants.py.
#pragma once

#include <Python.h>

#include "common/constants.h"

namespace deqkern {

inline PyObject* compiled_constants(PyObject*, PyObject*) {
  return Py_BuildValue("{s:d,s:i,s:d}", "RESIDUAL_EPS", kResidualEps, "ANDERSON_MAX_HISTORY", kAndersonMaxHistory,
                       "ANDERSON_DEFAULT_LAM", kAndersonDefaultLam);
}

// The method table of both modules: constants() and the sentinel.
inline PyMethodDef* module_methods() {
  static PyMethodDef methods[] = {
      {"constants", compiled_constants, METH_NOARGS,
       "The constants of csrc/common/constants.h this library was built with."},
      {nullptr, nullptr, 0, nullptr}};
  return methods;
}

}  // namespace deqkern
