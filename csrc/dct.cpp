// Fused DCT filter bank on the CPU (SPEC §2): forward (energies + stable stats) and backward.
//
// Forward, one op call, two parallel phases:
//  1. Channel/time reduction, the only large read: s[b] = (1/T) sum_{c,t} x[b, c, t], over
//     tasks (b, band of rows) so a small batch still fills the threads. Each task adds whole
//     (c, t) planes element-wise into an L1-sized accumulator (vectorized along the plane,
//     four planes per sweep; no horizontal reductions). Any strides for B, C, T, H, W.
//  2. Per image b: the separable correlation. First the k 1-D filters along H,
//     R_u[h, w] = sum_i a_u[i] s[h + i - p, w] (k^2 multiply-adds per pixel), stored in rows
//     padded with p zeros on each side; then per filter d = (u, v) along W,
//     E_d[h, w] = sum_j a_v[j] R_u[h, w + j] (k per pixel per filter, k^3 for the full bank).
//     Each row of E_d is written once and its mean and M2 (two passes over the row, in L1)
//     are merged into the running per-filter moments with Chan's formula.
// Backward, per image b: recompute R from the saved s, rebuild each E_d row, form
// G_d = dE_d + dmean_d / HW + dvar_d * 2 (E_d - mean_d) / HW, scatter it through the
// adjoint of the W pass into Q_u, then g = adjoint of the H pass over the Q_u, and write
// the small (B, H, W) map g / T. The glue expands it over (C, T).
// Scratch is allocated once per thread; basis vectors are float64 cosines cast to acc_t.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_dispatch.h"

namespace piumr {
namespace {

// Elements of the accumulator one reduction task sweeps: 4096 floats = 16 KiB, in L1.
constexpr int64_t kReduceChunk = 4096;

// The separable bank: the 1-D rows needed (`slots`) and, per output filter, its slot and v.
template <typename acc_t>
struct Bank {
  int64_t k, pad, n_filters, n_slots;
  std::vector<acc_t> basis;          // (k, k): basis[u * k + i] = c(u) cos(pi (2i+1) u / 2k)
  std::vector<int64_t> slot_u;       // (n_slots): the u of each H-pass slot
  std::vector<int64_t> filter_slot;  // (n_filters): slot holding R_u for filter n
  std::vector<int64_t> filter_v;     // (n_filters)

  Bank(int64_t kernel_size, const std::vector<int64_t>& frequencies)
      : k(kernel_size), pad(kernel_size / 2), n_filters(static_cast<int64_t>(frequencies.size())) {
    basis.resize(k * k);
    const double pi = std::acos(-1.0);
    for (int64_t u = 0; u < k; ++u) {
      const double c = std::sqrt((u == 0 ? 1.0 : 2.0) / static_cast<double>(k));
      for (int64_t i = 0; i < k; ++i) {
        basis[u * k + i] = static_cast<acc_t>(c * std::cos(pi * (2 * i + 1) * u / (2.0 * k)));
      }
    }
    std::vector<int64_t> slot_of_u(k, -1);
    for (int64_t d : frequencies) {
      const int64_t u = d % k;
      if (slot_of_u[u] < 0) {
        slot_of_u[u] = static_cast<int64_t>(slot_u.size());
        slot_u.push_back(u);
      }
      filter_slot.push_back(slot_of_u[u]);
      filter_v.push_back(d / k);
    }
    n_slots = static_cast<int64_t>(slot_u.size());
  }
};

template <typename scalar_t, typename acc_t>
struct ReduceArgs {
  const scalar_t* x;              // x[b] at row h0
  const int64_t* plane_offsets;   // (C * T) element offsets of each (c, t) plane
  int64_t n_planes, n_rows, width, stride_h, stride_w;
  acc_t scale;                    // 1 / T
  acc_t* acc;                     // n_rows * width accumulator (scratch)
  acc_t* out;                     // s[b] at row h0, contiguous rows
};

template <typename scalar_t, typename acc_t>
struct ReduceKernel {
  static PIUMR_ALWAYS_INLINE void run(const ReduceArgs<scalar_t, acc_t>& a) {
    const bool flat = a.stride_w == 1 && (a.stride_h == a.width || a.n_rows == 1);
    const int64_t n = a.n_rows * a.width;
    acc_t* acc = a.acc;
    for (int64_t e = 0; e < n; ++e) acc[e] = 0;
    if (flat) {
      int64_t q = 0;
      for (; q + 4 <= a.n_planes; q += 4) {
        const scalar_t* p0 = a.x + a.plane_offsets[q];
        const scalar_t* p1 = a.x + a.plane_offsets[q + 1];
        const scalar_t* p2 = a.x + a.plane_offsets[q + 2];
        const scalar_t* p3 = a.x + a.plane_offsets[q + 3];
#pragma omp simd
        for (int64_t e = 0; e < n; ++e) {
          acc[e] += (static_cast<acc_t>(p0[e]) + static_cast<acc_t>(p1[e])) +
                    (static_cast<acc_t>(p2[e]) + static_cast<acc_t>(p3[e]));
        }
      }
      for (; q < a.n_planes; ++q) {
        const scalar_t* p0 = a.x + a.plane_offsets[q];
#pragma omp simd
        for (int64_t e = 0; e < n; ++e) acc[e] += static_cast<acc_t>(p0[e]);
      }
    } else {
      for (int64_t q = 0; q < a.n_planes; ++q) {
        for (int64_t h = 0; h < a.n_rows; ++h) {
          const scalar_t* row = a.x + a.plane_offsets[q] + h * a.stride_h;
          acc_t* acc_row = acc + h * a.width;
#pragma omp simd
          for (int64_t w = 0; w < a.width; ++w) acc_row[w] += static_cast<acc_t>(row[w * a.stride_w]);
        }
      }
    }
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) a.out[e] = acc[e] * a.scale;
  }
};

// R_u rows for every slot: rp[(slot * H + h) * Wp + p + w] = sum_i a_u[i] s[h + i - p, w].
// The p pad columns on each side stay zero (zero padding of the W pass).
template <typename acc_t>
PIUMR_ALWAYS_INLINE void filter_rows_along_h(const acc_t* s, const acc_t* basis, const int64_t* slot_u,
                                             int64_t n_slots, int64_t k, int64_t pad, int64_t height,
                                             int64_t width, acc_t* rp) {
  const int64_t wp = width + 2 * pad;
  for (int64_t e = 0; e < n_slots * height * wp; ++e) rp[e] = 0;
  for (int64_t h = 0; h < height; ++h) {
    const int64_t i_begin = std::max<int64_t>(0, pad - h);
    const int64_t i_end = std::min<int64_t>(k, height + pad - h);
    for (int64_t i = i_begin; i < i_end; ++i) {
      const acc_t* s_row = s + (h + i - pad) * width;
      for (int64_t slot = 0; slot < n_slots; ++slot) {
        const acc_t a = basis[slot_u[slot] * k + i];
        acc_t* r_row = rp + (slot * height + h) * wp + pad;
#pragma omp simd
        for (int64_t w = 0; w < width; ++w) r_row[w] += a * s_row[w];
      }
    }
  }
}

// e[w] = sum_j a_v[j] r_padded[w + j]: one row of E_d from the padded row of R_u.
template <typename acc_t>
PIUMR_ALWAYS_INLINE void filter_row_along_w(const acc_t* r_padded, const acc_t* a_v, int64_t k, int64_t width,
                                            acc_t* e) {
  for (int64_t w = 0; w < width; ++w) e[w] = 0;
  for (int64_t j = 0; j < k; ++j) {
    const acc_t a = a_v[j];
    const acc_t* r = r_padded + j;
#pragma omp simd
    for (int64_t w = 0; w < width; ++w) e[w] += a * r[w];
  }
}

template <typename scalar_t, typename acc_t>
struct ImageArgs {
  const Bank<acc_t>* bank;
  int64_t height, width;
  const acc_t* s;          // s[b], (H, W)
  // forward
  scalar_t* E;             // E[b], (D, H, W)
  acc_t* mean;             // mean[b], (D)
  acc_t* var;              // var[b], (D)
  // backward
  const scalar_t* grad_E;  // (D, H, W)
  const acc_t* grad_mean;  // (D)
  const acc_t* grad_var;   // (D)
  const acc_t* saved_mean; // (D)
  acc_t inv_frames;
  scalar_t* grad_map;      // (H, W)
  acc_t* scratch;          // image_scratch_size()
};

template <typename acc_t>
int64_t image_scratch_size(const Bank<acc_t>& bank, int64_t height, int64_t width) {
  // R (padded rows), Q (padded rows, backward), one row of E and one of G.
  return 2 * bank.n_slots * height * (width + 2 * bank.pad) + 2 * width;
}

template <typename scalar_t, typename acc_t>
struct ForwardImageKernel {
  static PIUMR_ALWAYS_INLINE void run(const ImageArgs<scalar_t, acc_t>& a) {
    const Bank<acc_t>& bank = *a.bank;
    const int64_t k = bank.k, height = a.height, width = a.width, wp = width + 2 * bank.pad;
    acc_t* rp = a.scratch;
    acc_t* e = rp + 2 * bank.n_slots * height * wp;
    filter_rows_along_h(a.s, bank.basis.data(), bank.slot_u.data(), bank.n_slots, k, bank.pad, height, width, rp);
    const acc_t inv_width = acc_t(1) / static_cast<acc_t>(width);
    for (int64_t n = 0; n < bank.n_filters; ++n) {
      const acc_t* a_v = bank.basis.data() + bank.filter_v[n] * k;
      const acc_t* r_slot = rp + bank.filter_slot[n] * height * wp;
      scalar_t* E_n = a.E + n * height * width;
      acc_t mean = 0, m2 = 0;
      for (int64_t h = 0; h < height; ++h) {
        filter_row_along_w(r_slot + h * wp, a_v, k, width, e);
        scalar_t* out = E_n + h * width;
        acc_t row_sum = 0;
#pragma omp simd reduction(+ : row_sum)
        for (int64_t w = 0; w < width; ++w) {
          out[w] = static_cast<scalar_t>(e[w]);
          row_sum += e[w];
        }
        const acc_t row_mean = row_sum * inv_width;
        acc_t row_m2 = 0;
#pragma omp simd reduction(+ : row_m2)
        for (int64_t w = 0; w < width; ++w) row_m2 += (e[w] - row_mean) * (e[w] - row_mean);
        // Chan et al.: merge (h * W, mean, m2) with (W, row_mean, row_m2).
        const acc_t seen = static_cast<acc_t>(h * width), total = seen + static_cast<acc_t>(width);
        const acc_t delta = row_mean - mean;
        mean += delta * (static_cast<acc_t>(width) / total);
        m2 += row_m2 + delta * delta * (seen * static_cast<acc_t>(width) / total);
      }
      a.mean[n] = mean;
      a.var[n] = m2 / static_cast<acc_t>(height * width);
    }
  }
};

template <typename scalar_t, typename acc_t>
struct BackwardImageKernel {
  static PIUMR_ALWAYS_INLINE void run(const ImageArgs<scalar_t, acc_t>& a) {
    const Bank<acc_t>& bank = *a.bank;
    const int64_t k = bank.k, pad = bank.pad, height = a.height, width = a.width, wp = width + 2 * pad;
    const int64_t plane = bank.n_slots * height * wp;
    acc_t* rp = a.scratch;
    acc_t* qp = rp + plane;
    acc_t* e = qp + plane;
    acc_t* g = e + width;
    filter_rows_along_h(a.s, bank.basis.data(), bank.slot_u.data(), bank.n_slots, k, pad, height, width, rp);
    for (int64_t i = 0; i < plane; ++i) qp[i] = 0;
    const acc_t inv_hw = acc_t(1) / static_cast<acc_t>(height * width);
    for (int64_t n = 0; n < bank.n_filters; ++n) {
      const acc_t* a_v = bank.basis.data() + bank.filter_v[n] * k;
      const acc_t* r_slot = rp + bank.filter_slot[n] * height * wp;
      acc_t* q_slot = qp + bank.filter_slot[n] * height * wp;
      const scalar_t* dE = a.grad_E + n * height * width;
      const acc_t from_mean = a.grad_mean[n] * inv_hw;
      const acc_t from_var = 2 * a.grad_var[n] * inv_hw;  // times (E - mean)
      const acc_t mean = a.saved_mean[n];
      for (int64_t h = 0; h < height; ++h) {
        const scalar_t* dE_row = dE + h * width;
        if (from_var != 0) {
          filter_row_along_w(r_slot + h * wp, a_v, k, width, e);
#pragma omp simd
          for (int64_t w = 0; w < width; ++w) {
            g[w] = static_cast<acc_t>(dE_row[w]) + from_mean + from_var * (e[w] - mean);
          }
        } else {
#pragma omp simd
          for (int64_t w = 0; w < width; ++w) g[w] = static_cast<acc_t>(dE_row[w]) + from_mean;
        }
        // Adjoint of the W pass: Q_u[h, w + j] += a_v[j] G[h, w] (padded columns dropped later).
        acc_t* q_row = q_slot + h * wp;
        for (int64_t j = 0; j < k; ++j) {
          const acc_t coef = a_v[j];
          acc_t* q = q_row + j;
#pragma omp simd
          for (int64_t w = 0; w < width; ++w) q[w] += coef * g[w];
        }
      }
    }
    // Adjoint of the H pass: g[y] = sum_u sum_i a_u[i] Q_u[y - i + p], rows inside the map.
    for (int64_t y = 0; y < height; ++y) {
      for (int64_t w = 0; w < width; ++w) g[w] = 0;
      const int64_t i_begin = std::max<int64_t>(0, y + pad - (height - 1));
      const int64_t i_end = std::min<int64_t>(k, y + pad + 1);
      for (int64_t i = i_begin; i < i_end; ++i) {
        for (int64_t slot = 0; slot < bank.n_slots; ++slot) {
          const acc_t coef = bank.basis[bank.slot_u[slot] * k + i];
          const acc_t* q = qp + (slot * height + (y - i + pad)) * wp + pad;
#pragma omp simd
          for (int64_t w = 0; w < width; ++w) g[w] += coef * q[w];
        }
      }
      scalar_t* out = a.grad_map + y * width;
#pragma omp simd
      for (int64_t w = 0; w < width; ++w) out[w] = static_cast<scalar_t>(g[w] * a.inv_frames);
    }
  }
};

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_bank(int64_t kernel_size, const std::vector<int64_t>& frequencies, const char* op) {
  TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1, op, ": kernel_size must be odd and >= 1, got ",
              kernel_size);
  TORCH_CHECK(!frequencies.empty(), op, ": frequencies must not be empty");
  for (int64_t d : frequencies) {
    TORCH_CHECK(d >= 0 && d < kernel_size * kernel_size, op, ": frequency index ", d, " outside [0, ",
                kernel_size * kernel_size, ")");
  }
}

// Phase 1: s = (1/T) sum_{c,t} x, over (b, band of rows) tasks.
template <typename scalar_t>
void reduce_channels_and_frames(const at::Tensor& x, at::Tensor& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = x.size(0), channels = x.size(1), frames = x.size(2);
  const int64_t height = x.size(3), width = x.size(4);
  std::vector<int64_t> plane_offsets(channels * frames);
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t t = 0; t < frames; ++t) plane_offsets[c * frames + t] = c * x.stride(1) + t * x.stride(2);
  const int64_t rows_per_band = std::max<int64_t>(1, kReduceChunk / width);
  const int64_t n_bands = (height + rows_per_band - 1) / rows_per_band;
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  acc_t* s_ptr = s.data_ptr<acc_t>();
  const acc_t scale = acc_t(1) / static_cast<acc_t>(frames);
  at::parallel_for(0, batch * n_bands, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(std::min(height, rows_per_band) * width);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_bands, h0 = (task % n_bands) * rows_per_band;
      const int64_t n_rows = std::min(rows_per_band, height - h0);
      ReduceArgs<scalar_t, acc_t> args{x_ptr + b * x.stride(0) + h0 * x.stride(3),
                                       plane_offsets.data(),
                                       channels * frames,
                                       n_rows,
                                       width,
                                       x.stride(3),
                                       x.stride(4),
                                       scale,
                                       acc.data(),
                                       s_ptr + (b * height + h0) * width};
      run_for_this_cpu<ReduceKernel<scalar_t, acc_t>>(args);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dct_forward(const at::Tensor& x, int64_t kernel_size,
                                                                        at::IntArrayRef frequencies) {
  const char* op = "dct_filter_bank_cpp";
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 5, op, ": x must be (B, C, T, H, W), got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating, got ", x.scalar_type());
  for (int64_t dim = 1; dim < 5; ++dim) TORCH_CHECK(x.size(dim) >= 1, op, ": x must have C, T, H, W >= 1");
  const std::vector<int64_t> freq(frequencies.begin(), frequencies.end());
  check_bank(kernel_size, freq, op);
  const int64_t batch = x.size(0), height = x.size(3), width = x.size(4);
  const int64_t n_filters = static_cast<int64_t>(freq.size());
  auto acc_opts = x.options().dtype(acc_type(x.scalar_type()));
  at::Tensor E = at::empty({batch, n_filters, height, width}, x.options());
  at::Tensor mean = at::empty({batch, n_filters}, acc_opts);
  at::Tensor var = at::empty({batch, n_filters}, acc_opts);
  at::Tensor s = at::empty({batch, height, width}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dct_filter_bank_cpp", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    reduce_channels_and_frames<scalar_t>(x, s);
    const Bank<acc_t> bank(kernel_size, freq);
    const acc_t* s_ptr = s.data_ptr<acc_t>();
    scalar_t* E_ptr = E.data_ptr<scalar_t>();
    acc_t* mean_ptr = mean.data_ptr<acc_t>();
    acc_t* var_ptr = var.data_ptr<acc_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(image_scratch_size(bank, height, width));
      for (int64_t b = begin; b < end; ++b) {
        ImageArgs<scalar_t, acc_t> args{};
        args.bank = &bank;
        args.height = height;
        args.width = width;
        args.s = s_ptr + b * height * width;
        args.E = E_ptr + b * n_filters * height * width;
        args.mean = mean_ptr + b * n_filters;
        args.var = var_ptr + b * n_filters;
        args.scratch = scratch.data();
        run_for_this_cpu<ForwardImageKernel<scalar_t, acc_t>>(args);
      }
    });
  });
  return {E, mean, var, s};
}

at::Tensor dct_backward(const at::Tensor& grad_E, const at::Tensor& grad_mean, const at::Tensor& grad_var,
                        const at::Tensor& s, const at::Tensor& mean, int64_t kernel_size,
                        at::IntArrayRef frequencies, int64_t frames) {
  const char* op = "dct_filter_bank_cpp_backward";
  const std::vector<int64_t> freq(frequencies.begin(), frequencies.end());
  check_bank(kernel_size, freq, op);
  TORCH_CHECK(frames >= 1, op, ": frames must be >= 1, got ", frames);
  TORCH_CHECK(s.dim() == 3 && s.is_contiguous(), op, ": s must be contiguous (B, H, W)");
  const int64_t batch = s.size(0), height = s.size(1), width = s.size(2);
  const int64_t n_filters = static_cast<int64_t>(freq.size());
  const auto acc = acc_type(grad_E.scalar_type());
  TORCH_CHECK(grad_E.is_contiguous() && grad_E.sizes() == at::IntArrayRef({batch, n_filters, height, width}),
              op, ": grad_E must be contiguous (B, D, H, W)");
  for (const at::Tensor* t : {&grad_mean, &grad_var, &mean}) {
    TORCH_CHECK(t->is_contiguous() && t->sizes() == at::IntArrayRef({batch, n_filters}) && t->scalar_type() == acc,
                op, ": grad_mean, grad_var and mean must be contiguous (B, D) of ", acc);
  }
  TORCH_CHECK(s.scalar_type() == acc, op, ": s must be ", acc);
  at::Tensor grad_map = at::empty({batch, height, width}, grad_E.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_E.scalar_type(), "dct_filter_bank_cpp_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Bank<acc_t> bank(kernel_size, freq);
    const scalar_t* gE = grad_E.data_ptr<scalar_t>();
    const acc_t* gm = grad_mean.data_ptr<acc_t>();
    const acc_t* gv = grad_var.data_ptr<acc_t>();
    const acc_t* mu = mean.data_ptr<acc_t>();
    const acc_t* s_ptr = s.data_ptr<acc_t>();
    scalar_t* out = grad_map.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(image_scratch_size(bank, height, width));
      for (int64_t b = begin; b < end; ++b) {
        ImageArgs<scalar_t, acc_t> args{};
        args.bank = &bank;
        args.height = height;
        args.width = width;
        args.s = s_ptr + b * height * width;
        args.grad_E = gE + b * n_filters * height * width;
        args.grad_mean = gm + b * n_filters;
        args.grad_var = gv + b * n_filters;
        args.saved_mean = mu + b * n_filters;
        args.inv_frames = acc_t(1) / static_cast<acc_t>(frames);
        args.grad_map = out + b * height * width;
        args.scratch = scratch.data();
        run_for_this_cpu<BackwardImageKernel<scalar_t, acc_t>>(args);
      }
    });
  });
  return grad_map;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(piumr_kernels, m) {
  m.def("dct_filter_bank_cpp(Tensor x, int kernel_size, int[] frequencies) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("dct_filter_bank_cpp_backward(Tensor grad_E, Tensor grad_mean, Tensor grad_var, Tensor s, Tensor mean,"
        " int kernel_size, int[] frequencies, int frames) -> Tensor");
}

TORCH_LIBRARY_IMPL(piumr_kernels, CPU, m) {
  m.impl("dct_filter_bank_cpp", &dct_forward);
  m.impl("dct_filter_bank_cpp_backward", &dct_backward);
}

}  // namespace piumr
