// The extension module: importing piumr_kernels._C runs the TORCH_LIBRARY registrations of
// every csrc/*.cpp (static initializers); the ops are then called through torch.ops, and
// their fakes and autograd formulas are registered in Python (piumr_kernels/fused_op.py).
#include <torch/extension.h>

#include <string>

#include "cpu_dispatch.h"

namespace piumr {
namespace {

std::string cpu_isa() { return selected_isa_name(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(piumr_kernels, m) { m.def("cpu_isa() -> str", &cpu_isa); }

}  // namespace piumr

// Python needs a module init function to import the library; it exports nothing itself.
PYBIND11_MODULE(_C, m) {}
