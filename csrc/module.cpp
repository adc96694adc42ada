// The extension module: importing piumr_kernels._C runs the TORCH_LIBRARY registrations of
// every csrc/*.cpp (static initializers). Its Python functions are eager entry points:
// each calls a registered op through the dispatcher (autograd, fake tensors and modes work
// as for torch.ops), but skips torch.ops' Python-side argument boxing, ~2 us per call, which
// is a large share of a small CPU problem. Under torch.compile the ops are called through
// torch.ops instead, so they are traced.
#include <torch/extension.h>

#include <string>
#include <tuple>

#include "cpu_dispatch.h"

namespace piumr {
namespace {

std::string cpu_isa() { return selected_isa_name(); }

using SinkhornSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, int64_t, double, bool,
                                                                         double, double, bool);

at::Tensor sinkhorn(const at::Tensor& K, int64_t n_iters, double eps, bool log_domain, double row_sum, double col_sum,
                    bool save_stats) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("piumr_kernels::sinkhorn_cpp", "")
                             .typed<SinkhornSignature>();
  return std::get<0>(op.call(K, n_iters, eps, log_domain, row_sum, col_sum, save_stats));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(piumr_kernels, m) {
  m.def("cpu_isa() -> str", &cpu_isa);
}

}  // namespace piumr

PYBIND11_MODULE(_C, m) {
  m.def("sinkhorn", &piumr::sinkhorn, "P of torch.ops.piumr_kernels.sinkhorn_cpp (same arguments)");
}
