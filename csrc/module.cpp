// The extension module: importing piumr_kernels._C runs the TORCH_LIBRARY registrations of
// every csrc/*.cpp (static initializers). Its Python functions are eager entry points:
// each calls a registered op through the dispatcher (autograd, fake tensors and modes work
// as for torch.ops), but skips torch.ops' Python-side argument boxing, ~2 us per call, which
// is a large share of a small CPU problem. Under torch.compile the ops are called through
// torch.ops instead, so they are traced.
#include <torch/extension.h>

#include <string>

#include "cpu_dispatch.h"

namespace piumr {

// Defined next to the op they call (csrc/<op>.cpp).
at::Tensor sinkhorn_eager(const at::Tensor& K, int64_t n_iters, double eps, bool log_domain, double row_sum,
                          double col_sum, bool save_stats);

namespace {

std::string cpu_isa() { return selected_isa_name(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(piumr_kernels, m) {
  m.def("cpu_isa() -> str", &cpu_isa);
}

}  // namespace piumr

PYBIND11_MODULE(_C, m) {
  m.def("sinkhorn", &piumr::sinkhorn_eager, "P of torch.ops.piumr_kernels.sinkhorn_cpp (same arguments)");
}
