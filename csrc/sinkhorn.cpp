// Fused Sinkhorn–Knopp on the CPU (SPEC §1): forward and backward, both domains.
//
// Layout: a block of L matrices is copied once into a float/double scratch tile in "lanes"
// order, x[(i * M + j) * L + l] for matrix l. Small matrices use L = 16 so every row and
// column step is element-wise across 16 matrices (full SIMD width even for 4x4); large
// matrices use L = 1 and vectorize along the contiguous rows. Blocks are spread over
// threads with at::parallel_for; each thread allocates its scratch once.
//
// Saved for backward (per matrix and iteration): linear domain, the row scales
// alpha_t = row_sum / (rowsum_t + eps) and column scales beta_t; log domain, the
// cumulative potentials f_t, g_t with L_t = K + f_t + g_t. The backward rebuilds every
// intermediate matrix from K and these vectors instead of storing 2 * n_iters matrices.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_dispatch.h"

namespace piumr {
namespace {

// Matrices with at most this many entries go through the 16-lane path.
constexpr int64_t kLanesMaxEntries = 1024;
constexpr int kLanes = 16;

struct Problem {
  int64_t n_rows, n_cols, n_iters;
  double eps, row_sum, col_sum;
  bool log_domain;
};

template <typename scalar_t, typename acc_t>
struct BlockArgs {
  const Problem* problem;
  const scalar_t* K;          // first matrix of the block, (count, N, M) contiguous
  const scalar_t* grad;       // backward only: upstream gradient, same layout as K
  scalar_t* out;              // P (forward) or grad_K (backward)
  acc_t* row_stats;           // (count, n_iters, N)
  acc_t* col_stats;           // (count, n_iters, M)
  int64_t count;              // matrices in this block, <= L
  acc_t* scratch;             // scratch_size<L>(problem) values
};

template <int L>
int64_t scratch_size(const Problem& p) {
  const int64_t nm = p.n_rows * p.n_cols;
  // x, g (matrix tiles), then per-row and per-column vectors for every iteration.
  return L * (2 * nm + (p.n_iters + 3) * (p.n_rows + p.n_cols));
}

template <typename scalar_t, typename acc_t, int L>
PIUMR_ALWAYS_INLINE void load_lanes(const scalar_t* src, acc_t* dst, int64_t count, int64_t nm, acc_t fill) {
  for (int64_t l = 0; l < count; ++l) {
    const scalar_t* s = src + l * nm;
    for (int64_t e = 0; e < nm; ++e) dst[e * L + l] = static_cast<acc_t>(s[e]);
  }
  for (int64_t l = count; l < L; ++l) {
    for (int64_t e = 0; e < nm; ++e) dst[e * L + l] = fill;
  }
}

template <typename scalar_t, typename acc_t, int L>
PIUMR_ALWAYS_INLINE void store_lanes(const acc_t* src, scalar_t* dst, int64_t count, int64_t nm) {
  for (int64_t l = 0; l < count; ++l) {
    scalar_t* d = dst + l * nm;
    for (int64_t e = 0; e < nm; ++e) d[e] = static_cast<scalar_t>(src[e * L + l]);
  }
}

// Per-lane stats live at stats[(l * n_iters + t) * len + k]; the tile keeps them as v[k * L + l].
template <typename acc_t, int L>
PIUMR_ALWAYS_INLINE void store_stats(const acc_t* v, acc_t* stats, int64_t count, int64_t n_iters,
                                     int64_t t, int64_t len) {
  for (int64_t l = 0; l < count; ++l) {
    acc_t* s = stats + (l * n_iters + t) * len;
    for (int64_t k = 0; k < len; ++k) s[k] = v[k * L + l];
  }
}

template <typename acc_t, int L>
PIUMR_ALWAYS_INLINE void load_stats(const acc_t* stats, acc_t* v, int64_t count, int64_t n_iters,
                                    int64_t t, int64_t len, acc_t fill) {
  for (int64_t l = 0; l < count; ++l) {
    const acc_t* s = stats + (l * n_iters + t) * len;
    for (int64_t k = 0; k < len; ++k) v[k * L + l] = s[k];
  }
  for (int64_t l = count; l < L; ++l) {
    for (int64_t k = 0; k < len; ++k) v[k * L + l] = fill;
  }
}

// row[i * L + l] = sum_j x[(i * M + j) * L + l] * (w ? w[(i * M + j) * L + l] : 1)
template <typename acc_t, int L, bool kWeighted>
PIUMR_ALWAYS_INLINE void row_sums(const acc_t* x, const acc_t* w, acc_t* row, int64_t n, int64_t m) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t* xr = x + i * m * L;
    const acc_t* wr = w + i * m * L;
    if constexpr (L == 1) {
      acc_t s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < m; ++j) s += kWeighted ? xr[j] * wr[j] : xr[j];
      row[i] = s;
    } else {
      acc_t s[L] = {};
      for (int64_t j = 0; j < m; ++j) {
#pragma omp simd
        for (int l = 0; l < L; ++l) s[l] += kWeighted ? xr[j * L + l] * wr[j * L + l] : xr[j * L + l];
      }
      for (int l = 0; l < L; ++l) row[i * L + l] = s[l];
    }
  }
}

// col[k] = sum_i x[i * ML + k] * (w ? w[i * ML + k] : 1), k = j * L + l (contiguous for any L)
template <typename acc_t, bool kWeighted>
PIUMR_ALWAYS_INLINE void col_sums(const acc_t* x, const acc_t* w, acc_t* col, int64_t n, int64_t ml) {
  for (int64_t k = 0; k < ml; ++k) col[k] = 0;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t* xr = x + i * ml;
    const acc_t* wr = w + i * ml;
#pragma omp simd
    for (int64_t k = 0; k < ml; ++k) col[k] += kWeighted ? xr[k] * wr[k] : xr[k];
  }
}

// x[i, j, l] *= row[i, l]
template <typename acc_t, int L>
PIUMR_ALWAYS_INLINE void scale_rows(acc_t* x, const acc_t* row, int64_t n, int64_t m) {
  for (int64_t i = 0; i < n; ++i) {
    acc_t* xr = x + i * m * L;
    const acc_t* r = row + i * L;
    for (int64_t j = 0; j < m; ++j) {
#pragma omp simd
      for (int l = 0; l < L; ++l) xr[j * L + l] *= r[l];
    }
  }
}

// x[i, k] *= col[k]
template <typename acc_t>
PIUMR_ALWAYS_INLINE void scale_cols(acc_t* x, const acc_t* col, int64_t n, int64_t ml) {
  for (int64_t i = 0; i < n; ++i) {
    acc_t* xr = x + i * ml;
#pragma omp simd
    for (int64_t k = 0; k < ml; ++k) xr[k] *= col[k];
  }
}

// v <- target / (v + eps), or 0 where the denominator is 0 (a zero row stays zero, never NaN).
template <typename acc_t>
PIUMR_ALWAYS_INLINE void safe_scales(acc_t* v, int64_t len, acc_t target, acc_t eps) {
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) {
    const acc_t d = v[k] + eps;
    v[k] = d > 0 ? target / (d > 0 ? d : acc_t(1)) : acc_t(0);
  }
}

// row[i, l] = logsumexp_j x[i, j, l]
template <typename acc_t, int L>
PIUMR_ALWAYS_INLINE void row_logsumexp(const acc_t* x, acc_t* row, int64_t n, int64_t m) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t* xr = x + i * m * L;
    acc_t mx[L], s[L];
    for (int l = 0; l < L; ++l) { mx[l] = -std::numeric_limits<acc_t>::infinity(); s[l] = 0; }
    for (int64_t j = 0; j < m; ++j)
      for (int l = 0; l < L; ++l) mx[l] = std::max(mx[l], xr[j * L + l]);
    for (int64_t j = 0; j < m; ++j)
      for (int l = 0; l < L; ++l) s[l] += std::exp(xr[j * L + l] - mx[l]);
    for (int l = 0; l < L; ++l) row[i * L + l] = mx[l] + std::log(s[l]);
  }
}

// col[k] = logsumexp_i x[i, k]; `tmp` holds the running column max.
template <typename acc_t>
PIUMR_ALWAYS_INLINE void col_logsumexp(const acc_t* x, acc_t* col, acc_t* tmp, int64_t n, int64_t ml) {
  for (int64_t k = 0; k < ml; ++k) { tmp[k] = -std::numeric_limits<acc_t>::infinity(); col[k] = 0; }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < ml; ++k) tmp[k] = std::max(tmp[k], x[i * ml + k]);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < ml; ++k) col[k] += std::exp(x[i * ml + k] - tmp[k]);
  for (int64_t k = 0; k < ml; ++k) col[k] = tmp[k] + std::log(col[k]);
}

template <typename scalar_t, typename acc_t, int L>
struct ForwardKernel {
  static PIUMR_ALWAYS_INLINE void run(const BlockArgs<scalar_t, acc_t>& a) {
    const Problem& p = *a.problem;
    const int64_t n = p.n_rows, m = p.n_cols, nm = n * m, ml = m * L, iters = p.n_iters;
    acc_t* x = a.scratch;
    acc_t* row = x + 2 * nm * L;      // N * L
    acc_t* col = row + n * L;         // M * L
    acc_t* tmp = col + m * L;         // M * L (log domain column max)
    acc_t* f = tmp + m * L;           // N * L cumulative row potential (log domain)
    acc_t* g = f + n * L;             // M * L cumulative column potential (log domain)
    const acc_t eps = static_cast<acc_t>(p.eps);
    load_lanes<scalar_t, acc_t, L>(a.K, x, a.count, nm, acc_t(1));
    if (p.log_domain) {
      const acc_t log_r = std::log(static_cast<acc_t>(p.row_sum));
      const acc_t log_c = std::log(static_cast<acc_t>(p.col_sum));
      for (int64_t k = 0; k < n * L; ++k) f[k] = 0;
      for (int64_t k = 0; k < ml; ++k) g[k] = 0;
      for (int64_t t = 0; t < iters; ++t) {
        row_logsumexp<acc_t, L>(x, row, n, m);
        for (int64_t k = 0; k < n * L; ++k) { row[k] = log_r - row[k]; f[k] += row[k]; }
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < m; ++j)
#pragma omp simd
            for (int l = 0; l < L; ++l) x[(i * m + j) * L + l] += row[i * L + l];
        store_stats<acc_t, L>(f, a.row_stats, a.count, iters, t, n);
        col_logsumexp<acc_t>(x, col, tmp, n, ml);
        for (int64_t k = 0; k < ml; ++k) { col[k] = log_c - col[k]; g[k] += col[k]; }
        for (int64_t i = 0; i < n; ++i)
#pragma omp simd
          for (int64_t k = 0; k < ml; ++k) x[i * ml + k] += col[k];
        store_stats<acc_t, L>(g, a.col_stats, a.count, iters, t, m);
      }
      for (int64_t k = 0; k < nm * L; ++k) x[k] = std::exp(x[k]);
    } else {
      const acc_t target_r = static_cast<acc_t>(p.row_sum), target_c = static_cast<acc_t>(p.col_sum);
      for (int64_t t = 0; t < iters; ++t) {
        row_sums<acc_t, L, false>(x, x, row, n, m);
        safe_scales<acc_t>(row, n * L, target_r, eps);
        scale_rows<acc_t, L>(x, row, n, m);
        store_stats<acc_t, L>(row, a.row_stats, a.count, iters, t, n);
        col_sums<acc_t, false>(x, x, col, n, ml);
        safe_scales<acc_t>(col, ml, target_c, eps);
        scale_cols<acc_t>(x, col, n, ml);
        store_stats<acc_t, L>(col, a.col_stats, a.count, iters, t, m);
      }
    }
    store_lanes<scalar_t, acc_t, L>(x, a.out, a.count, nm);
  }
};

template <typename scalar_t, typename acc_t, int L>
struct BackwardKernel {
  static PIUMR_ALWAYS_INLINE void run(const BlockArgs<scalar_t, acc_t>& a) {
    const Problem& p = *a.problem;
    const int64_t n = p.n_rows, m = p.n_cols, nm = n * m, ml = m * L, iters = p.n_iters;
    acc_t* x = a.scratch;             // K, then the rebuilt intermediate Q
    acc_t* gr = x + nm * L;           // running gradient
    acc_t* row = gr + nm * L;         // N * L
    acc_t* col = row + n * L;         // M * L
    acc_t* w = col + m * L;           // M * L scratch
    acc_t* u = w + m * L;             // N * L
    acc_t* v = u + n * L;             // M * L (then (iters + 1) * (N + M) * L of per-iteration vectors)
    acc_t* row_t = v + m * L;         // iters * N * L stored row vectors
    acc_t* col_t = row_t + iters * n * L;
    load_lanes<scalar_t, acc_t, L>(a.grad, gr, a.count, nm, acc_t(0));
    for (int64_t t = 0; t < iters; ++t) {
      load_stats<acc_t, L>(a.row_stats, row_t + t * n * L, a.count, iters, t, n, acc_t(0));
      load_stats<acc_t, L>(a.col_stats, col_t + t * m * L, a.count, iters, t, m, acc_t(0));
    }
    acc_t* kx = x;  // K in lanes, kept unchanged; Q is formed on the fly
    load_lanes<scalar_t, acc_t, L>(a.K, kx, a.count, nm, acc_t(0));
    if (p.log_domain) {
      backward_log(p, kx, gr, row, col, row_t, col_t, w, n, m, ml, iters);
    } else {
      backward_linear(p, kx, gr, row, col, row_t, col_t, u, v, w, n, m, ml, iters);
    }
    store_lanes<scalar_t, acc_t, L>(gr, a.out, a.count, nm);
  }

  // Linear domain: intermediate after the row step of iteration t is U_t K V_{t-1} and
  // after its column step U_t K V_t, with U_t, V_t the running products of the scales.
  static PIUMR_ALWAYS_INLINE void backward_linear(const Problem& p, const acc_t* kx, acc_t* gr, acc_t* row,
                                                  acc_t* col, const acc_t* alpha, const acc_t* beta, acc_t* u,
                                                  acc_t* v, acc_t* kv, int64_t n, int64_t m, int64_t ml,
                                                  int64_t iters) {
    const acc_t inv_r = acc_t(1) / static_cast<acc_t>(p.row_sum);
    const acc_t inv_c = acc_t(1) / static_cast<acc_t>(p.col_sum);
    for (int64_t t = iters - 1; t >= 0; --t) {
      // U_t and V_t from the stored scales.
      for (int64_t k = 0; k < n * L; ++k) u[k] = alpha[k];
      for (int64_t s = 1; s <= t; ++s)
        for (int64_t k = 0; k < n * L; ++k) u[k] *= alpha[s * n * L + k];
      for (int64_t k = 0; k < ml; ++k) v[k] = beta[k];
      for (int64_t s = 1; s <= t; ++s)
        for (int64_t k = 0; k < ml; ++k) v[k] *= beta[s * ml + k];
      // Column step: Q = U_t K V_t; d_j = sum_i G_ij Q_ij; G <- beta_j (G - d_j / col_sum).
      for (int64_t k = 0; k < ml; ++k) col[k] = 0;
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = 0; j < m; ++j)
#pragma omp simd
          for (int l = 0; l < L; ++l) {
            const int64_t e = (i * m + j) * L + l;
            col[j * L + l] += gr[e] * (u[i * L + l] * kx[e]);
          }
      }
      const acc_t* beta_t = beta + t * ml;
      for (int64_t k = 0; k < ml; ++k) { col[k] *= v[k] * inv_c; }
      for (int64_t i = 0; i < n; ++i)
#pragma omp simd
        for (int64_t k = 0; k < ml; ++k) gr[i * ml + k] = beta_t[k] * (gr[i * ml + k] - col[k]);
      // Row step: Q = U_t K V_{t-1}; r_i = sum_j G_ij Q_ij; G <- alpha_i (G - r_i / row_sum).
      if (t == 0) {
        for (int64_t k = 0; k < ml; ++k) kv[k] = 1;
      } else {
        for (int64_t k = 0; k < ml; ++k) kv[k] = beta[k];
        for (int64_t s = 1; s < t; ++s)
          for (int64_t k = 0; k < ml; ++k) kv[k] *= beta[s * ml + k];
      }
      for (int64_t i = 0; i < n; ++i) {
        acc_t r[L] = {};
        for (int64_t j = 0; j < m; ++j)
#pragma omp simd
          for (int l = 0; l < L; ++l) {
            const int64_t e = (i * m + j) * L + l;
            r[l] += gr[e] * (kx[e] * kv[j * L + l]);
          }
        const acc_t* alpha_t = alpha + t * n * L + i * L;
        for (int64_t j = 0; j < m; ++j)
#pragma omp simd
          for (int l = 0; l < L; ++l) {
            const int64_t e = (i * m + j) * L + l;
            gr[e] = alpha_t[l] * (gr[e] - u[i * L + l] * r[l] * inv_r);
          }
      }
    }
  }

  // Log domain: L_t after the row step is K + f_t + g_{t-1}, after the column step
  // K + f_t + g_t; the softmax Jacobian of each step is exp(L) / target.
  static PIUMR_ALWAYS_INLINE void backward_log(const Problem& p, const acc_t* kx, acc_t* gr, acc_t* row, acc_t* col,
                                               const acc_t* f, const acc_t* g, acc_t* gprev, int64_t n, int64_t m,
                                               int64_t ml, int64_t iters) {
    const acc_t inv_r = acc_t(1) / static_cast<acc_t>(p.row_sum);
    const acc_t inv_c = acc_t(1) / static_cast<acc_t>(p.col_sum);
    const acc_t* f_last = f + (iters - 1) * n * L;
    const acc_t* g_last = g + (iters - 1) * ml;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < m; ++j)
        for (int l = 0; l < L; ++l) {
          const int64_t e = (i * m + j) * L + l;
          gr[e] *= std::exp(kx[e] + f_last[i * L + l] + g_last[j * L + l]);
        }
    for (int64_t t = iters - 1; t >= 0; --t) {
      const acc_t* f_t = f + t * n * L;
      const acc_t* g_t = g + t * ml;
      col_sums<acc_t, false>(gr, gr, col, n, ml);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < m; ++j)
          for (int l = 0; l < L; ++l) {
            const int64_t e = (i * m + j) * L + l;
            gr[e] -= std::exp(kx[e] + f_t[i * L + l] + g_t[j * L + l]) * inv_c * col[j * L + l];
          }
      if (t == 0) {
        for (int64_t k = 0; k < ml; ++k) gprev[k] = 0;
      } else {
        for (int64_t k = 0; k < ml; ++k) gprev[k] = g[(t - 1) * ml + k];
      }
      row_sums<acc_t, L, false>(gr, gr, row, n, m);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < m; ++j)
          for (int l = 0; l < L; ++l) {
            const int64_t e = (i * m + j) * L + l;
            gr[e] -= std::exp(kx[e] + f_t[i * L + l] + gprev[j * L + l]) * inv_r * row[i * L + l];
          }
    }
  }
};

template <template <typename, typename, int> class Kernel, typename scalar_t, int L>
void run_blocks(const Problem& p, const at::Tensor& K, const at::Tensor* grad, at::Tensor& out,
                at::Tensor& row_stats, at::Tensor& col_stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = K.size(0);
  const int64_t nm = p.n_rows * p.n_cols;
  const int64_t n_blocks = (batch + L - 1) / L;
  // Enough work per task (~64K element-steps) that thread start-up is amortized.
  const int64_t work_per_block = std::max<int64_t>(1, nm * L * p.n_iters);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / work_per_block);
  const scalar_t* k_ptr = K.data_ptr<scalar_t>();
  const scalar_t* g_ptr = grad ? grad->data_ptr<scalar_t>() : nullptr;
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  acc_t* rs_ptr = row_stats.data_ptr<acc_t>();
  acc_t* cs_ptr = col_stats.data_ptr<acc_t>();
  at::parallel_for(0, n_blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(scratch_size<L>(p));
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t first = blk * L;
      BlockArgs<scalar_t, acc_t> args{&p,
                                      k_ptr + first * nm,
                                      g_ptr ? g_ptr + first * nm : nullptr,
                                      out_ptr + first * nm,
                                      rs_ptr + first * p.n_iters * p.n_rows,
                                      cs_ptr + first * p.n_iters * p.n_cols,
                                      std::min<int64_t>(L, batch - first),
                                      scratch.data()};
      run_for_this_cpu<Kernel<scalar_t, acc_t, L>>(args);
    }
  });
}

template <template <typename, typename, int> class Kernel, typename scalar_t>
void run(const Problem& p, const at::Tensor& K, const at::Tensor* grad, at::Tensor& out, at::Tensor& row_stats,
         at::Tensor& col_stats) {
  if (p.n_rows * p.n_cols <= kLanesMaxEntries) {
    run_blocks<Kernel, scalar_t, kLanes>(p, K, grad, out, row_stats, col_stats);
  } else {
    run_blocks<Kernel, scalar_t, 1>(p, K, grad, out, row_stats, col_stats);
  }
}

void check_matrices(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "sinkhorn_cpp: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 3, "sinkhorn_cpp: ", name, " must be (batch, N, M), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "sinkhorn_cpp: ", name, " must be contiguous");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "sinkhorn_cpp: ", name, " must be floating, got ",
              t.scalar_type());
}

Problem make_problem(const at::Tensor& K, int64_t n_iters, double eps, bool log_domain, double row_sum,
                     double col_sum) {
  TORCH_CHECK(n_iters >= 1, "sinkhorn_cpp: n_iters must be >= 1, got ", n_iters);
  TORCH_CHECK(eps >= 0, "sinkhorn_cpp: eps must be >= 0, got ", eps);
  TORCH_CHECK(row_sum > 0 && col_sum > 0, "sinkhorn_cpp: row_sum and col_sum must be > 0");
  return Problem{K.size(1), K.size(2), n_iters, eps, row_sum, col_sum, log_domain};
}

at::ScalarType stats_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_forward(const at::Tensor& K, int64_t n_iters, double eps,
                                                                bool log_domain, double row_sum, double col_sum) {
  check_matrices(K, "K");
  const Problem p = make_problem(K, n_iters, eps, log_domain, row_sum, col_sum);
  at::Tensor out = at::empty_like(K);
  auto stat_opts = K.options().dtype(stats_type(K.scalar_type()));
  at::Tensor row_stats = at::empty({K.size(0), n_iters, p.n_rows}, stat_opts);
  at::Tensor col_stats = at::empty({K.size(0), n_iters, p.n_cols}, stat_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, K.scalar_type(), "sinkhorn_cpp", [&] {
    run<ForwardKernel, scalar_t>(p, K, nullptr, out, row_stats, col_stats);
  });
  return {out, row_stats, col_stats};
}

at::Tensor sinkhorn_backward(const at::Tensor& grad_P, const at::Tensor& K, const at::Tensor& row_stats,
                             const at::Tensor& col_stats, int64_t n_iters, double eps, bool log_domain,
                             double row_sum, double col_sum) {
  check_matrices(K, "K");
  check_matrices(grad_P, "grad_P");
  TORCH_CHECK(grad_P.sizes() == K.sizes() && grad_P.scalar_type() == K.scalar_type(),
              "sinkhorn_cpp_backward: grad_P must match K in shape and dtype");
  const Problem p = make_problem(K, n_iters, eps, log_domain, row_sum, col_sum);
  const auto st = stats_type(K.scalar_type());
  TORCH_CHECK(row_stats.scalar_type() == st && row_stats.is_contiguous() &&
                  row_stats.sizes() == at::IntArrayRef({K.size(0), n_iters, p.n_rows}),
              "sinkhorn_cpp_backward: row_stats must be contiguous (batch, n_iters, N) of ", st);
  TORCH_CHECK(col_stats.scalar_type() == st && col_stats.is_contiguous() &&
                  col_stats.sizes() == at::IntArrayRef({K.size(0), n_iters, p.n_cols}),
              "sinkhorn_cpp_backward: col_stats must be contiguous (batch, n_iters, M) of ", st);
  at::Tensor grad_K = at::empty_like(K);
  at::Tensor rs = row_stats, cs = col_stats;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, K.scalar_type(), "sinkhorn_cpp_backward", [&] {
    run<BackwardKernel, scalar_t>(p, K, &grad_P, grad_K, rs, cs);
  });
  return grad_K;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(piumr_kernels, m) {
  m.def("sinkhorn_cpp(Tensor K, int n_iters, float eps, bool log_domain, float row_sum, float col_sum)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("sinkhorn_cpp_backward(Tensor grad_P, Tensor K, Tensor row_stats, Tensor col_stats, int n_iters,"
        " float eps, bool log_domain, float row_sum, float col_sum) -> Tensor");
}

TORCH_LIBRARY_IMPL(piumr_kernels, CPU, m) {
  m.impl("sinkhorn_cpp", &sinkhorn_forward);
  m.impl("sinkhorn_cpp_backward", &sinkhorn_backward);
}

}  // namespace piumr
