// The extension module: importing piumr_kernels._C runs the TORCH_LIBRARY registrations of
// every csrc/*.cpp (static initializers); the Python module itself has no functions.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu_dispatch.h"

namespace piumr {
namespace {
std::string cpu_isa() { return selected_isa_name(); }
}  // namespace

TORCH_LIBRARY_FRAGMENT(piumr_kernels, m) {
  m.def("cpu_isa() -> str", &cpu_isa);
}
}  // namespace piumr

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
