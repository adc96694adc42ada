// Fused GIRL loss on the CPU (SPEC §3): the risk L_g of every group, their combination
// loss = mean L_g + lambda_var Var L_g and, with it, dloss/dz for every row, without ever
// forming a B x B matrix. Fakes and the autograd formula are registered in Python
// (piumr_kernels/girl/op.py, shared with the triton backend).
//
// Input: the raw features in batch order, their labels, the partition as `order` (group g
// is the samples order[offsets[g]..offsets[g+1]]) and the options. The rows are gathered
// into group order and normalized once into an O(B*C) buffer F. A group with fewer than 2
// members has no partner pairs: it is skipped, its risk is 0 and its rows of D are 0.
//
// The gradient is computed in the forward. dloss/dz depends only on the forward's own
// quantities, so when the caller needs a gradient the forward also forms D = dL_g/dz for
// every row of group g and writes it over that group's rows of F once they are no longer
// read, so F's buffer becomes D (one (B, C) buffer for both); once the risks are combined,
// each group's rows are scaled by dloss/dL_g. The backward then only scales D by the
// upstream gradient of the loss and scatters it back to batch order: no second pass over
// the pairs, and the cosines of a small group are used for the statistics and for the
// gradient while they are in cache. (The backward's schema also takes the forward's
// inputs, which the triton backend recomputes from; this one ignores them.)
//
// Within a group, with gamma = 1 / |I_g| and g_ij = dl_i/dc_ij (a function of c_ij and the
// per-sample statistics of i), dL_g/dF_i = gamma sum_j (g_ij + g_ji) F_j = (H F)_i with H
// symmetric. Two kinds of work:
//  - a group of at most kTile samples is one work item: its cosines (GramKernel), the
//    per-anchor statistics (two log-sum-exps and the positive sums), then H on the same
//    tile, H F (ProductKernel) into per-task scratch, and D from it over F's rows;
//  - a larger group is streamed in kTile x kTile tiles (I, J), I <= J only (the cosine
//    matrix is symmetric, so each pair is computed once). Pass 1: flash-style online
//    log-sum-exps, updated row-wise for the anchors of I and column-wise for those of J.
//    Pass 2 (with a gradient): the tile's cosines again, H_IJ, then (HF)_I += H_IJ F_J and
//    (HF)_J += H_IJ^T F_I; D from it over F's rows at the end. The tiles are split into one
//    contiguous chunk per thread; each chunk accumulates into its own partial buffers (statistics O(B), gradient
//    O(n*C)), summed in chunk order afterwards: no races, and deterministic for a thread count.
// Tile cosines come from GramKernel (diagonal tiles) or at::mm (single-threaded BLAS inside
// the parallel region) into per-task scratch, the products H F from ProductKernel; per-pair work runs in the vectorized
// micro-kernels below. Memory: F (then D), O(B*C); per streamed group one O(n*C) gradient per chunk (thread);
// O(kTile^2) scratch per task, plus O(kTile*C) with a gradient.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "accumulation.h"
#include "cpu_dispatch.h"
#include "vec_math.h"

namespace piumr {
namespace {

constexpr int64_t kTile = 256;      // samples per tile side; larger groups stream
constexpr double kNormEps = 1e-12;  // f = z / max(||z||, kNormEps)
// Multiply-adds a thread task should at least get: below that, waking threads costs more
// than it saves (small batches run inline on the calling thread).
constexpr int64_t kMinTaskWork = int64_t{1} << 22;
// Elements a task of a memory-bound pass over rows (normalize, scatter) should at least get.
constexpr int64_t kMinTaskElements = int64_t{1} << 18;
constexpr int64_t kNumStats = 5;  // per-sample statistics, rows of a (5, B) buffer
enum Stat { kLogitLse = 0, kEmphasisLse, kPositiveWeight, kAnchorLoss, kNumPositive };
constexpr int64_t kNumOnline = 7;  // running max/sum of both LSEs, positive sums, |P(i)|
enum Online { kLogitMax = 0, kLogitSum, kEmphMax, kEmphSum, kPosLogit, kPosWeight, kPosCount };

template <typename acc_t>
struct Params {
  acc_t inv_tau, eta, inv_eta;
};

// Gaussian emphasis exponent: log r = -0.5 ((c - eta) / eta)^2.
template <typename acc_t>
PIUMR_ALWAYS_INLINE acc_t log_emphasis(acc_t c, const Params<acc_t>& p) {
  const acc_t d = (c - p.eta) * p.inv_eta;
  return acc_t(-0.5) * d * d;
}

// ---------------------------------------------------------------- gather + normalize
template <typename scalar_t, typename acc_t>
struct NormalizeArgs {
  const scalar_t* z;     // (B, C) batch order
  const int64_t* order;  // (B,) row of z for each group-order position
  acc_t* f;              // (B, C) normalized rows, group order
  acc_t* norm;           // (B,) ||z||, group order
  int64_t begin, end, width;
};

template <typename scalar_t, typename acc_t>
struct NormalizeKernel {
  static PIUMR_ALWAYS_INLINE void run(const NormalizeArgs<scalar_t, acc_t>& a) {
    for (int64_t i = a.begin; i < a.end; ++i) {
      const scalar_t* zi = a.z + a.order[i] * a.width;
      acc_t* fi = a.f + i * a.width;
      acc_t sum_sq = 0;
#pragma omp simd reduction(+ : sum_sq)
      for (int64_t k = 0; k < a.width; ++k) {
        const acc_t v = static_cast<acc_t>(zi[k]);
        sum_sq += v * v;
      }
      const acc_t norm = std::sqrt(sum_sq);
      const acc_t inv = acc_t(1) / std::max(norm, acc_t(kNormEps));
#pragma omp simd
      for (int64_t k = 0; k < a.width; ++k) fi[k] = static_cast<acc_t>(zi[k]) * inv;
      a.norm[i] = norm;
    }
  }
};

// ---------------------------------------------------------------- online statistics
// The running state of an anchor lives in a (kNumOnline, stride) buffer, one column per
// anchor. Both LSEs use a running maximum; sums are rescaled whenever it grows.
template <typename acc_t>
void reset_online(acc_t* online, int64_t stride) {
  std::fill_n(online, kNumOnline * stride, acc_t(0));
  std::fill_n(online + kLogitMax * stride, stride, -std::numeric_limits<acc_t>::infinity());
  std::fill_n(online + kEmphMax * stride, stride, -std::numeric_limits<acc_t>::infinity());
}

// Folds the partial state `from` into `into` (same layout), anchors 0..count-1.
template <typename acc_t>
void merge_online(acc_t* into, const acc_t* from, int64_t stride, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    const acc_t lm_a = into[kLogitMax * stride + i], lm_b = from[kLogitMax * stride + i];
    const acc_t em_a = into[kEmphMax * stride + i], em_b = from[kEmphMax * stride + i];
    const acc_t lm = std::max(lm_a, lm_b), em = std::max(em_a, em_b);
    if (lm == -std::numeric_limits<acc_t>::infinity()) continue;  // `from` saw nothing
    const acc_t la = std::exp(lm_a - lm), lb = std::exp(lm_b - lm);
    const acc_t ea = std::exp(em_a - em), eb = std::exp(em_b - em);
    into[kLogitMax * stride + i] = lm;
    into[kEmphMax * stride + i] = em;
    into[kLogitSum * stride + i] = into[kLogitSum * stride + i] * la + from[kLogitSum * stride + i] * lb;
    into[kEmphSum * stride + i] = into[kEmphSum * stride + i] * ea + from[kEmphSum * stride + i] * eb;
    into[kPosLogit * stride + i] = into[kPosLogit * stride + i] * ea + from[kPosLogit * stride + i] * eb;
    into[kPosWeight * stride + i] = into[kPosWeight * stride + i] * ea + from[kPosWeight * stride + i] * eb;
    into[kPosCount * stride + i] += from[kPosCount * stride + i];
  }
}

// The final per-anchor statistics of `count` anchors of a group of `size` from their
// state: LSE_i, log sum_k r_ik, W_i = sum_P w_ij, l_i and |P(i)|, where
// l_i = -(|I_g| - 1) / sum_k r_ik * (sum_P r_ij s_ij - LSE_i sum_P r_ij) / max(|P(i)|, 1).
template <typename acc_t>
void finish_stats(const acc_t* online, int64_t stride, int64_t count, int64_t size, acc_t* stats,
                  int64_t stats_stride) {
  const acc_t partners = acc_t(size - 1);
  for (int64_t i = 0; i < count; ++i) {
    const acc_t logit_lse = online[kLogitMax * stride + i] + std::log(online[kLogitSum * stride + i]);
    const acc_t emph_sum = online[kEmphSum * stride + i];
    const acc_t num_pos = online[kPosCount * stride + i];
    const acc_t pos_weight = online[kPosWeight * stride + i];
    stats[kLogitLse * stats_stride + i] = logit_lse;
    stats[kEmphasisLse * stats_stride + i] = online[kEmphMax * stride + i] + std::log(emph_sum);
    stats[kPositiveWeight * stats_stride + i] = partners * pos_weight / emph_sum;
    stats[kAnchorLoss * stats_stride + i] =
        -partners / emph_sum * (online[kPosLogit * stride + i] - logit_lse * pos_weight) / std::max(num_pos, acc_t(1));
    stats[kNumPositive * stats_stride + i] = num_pos;
  }
}

template <typename acc_t>
struct StatsTileArgs {
  const acc_t* cosine;        // (rows, cols) tile
  const int32_t* row_labels;  // (rows,) dense class ids
  const int32_t* col_labels;  // (cols,)
  acc_t* online;              // state of the anchors being updated (rows, or columns)
  acc_t* column_max;          // (2, cols) scratch of the column-wise update
  int64_t rows, cols, stride;
  int64_t self_offset;  // column of row r's self pair is r + self_offset (may be outside)
  Params<acc_t> params;
};

// Row-wise update: the tile's rows are anchors, its columns their partners.
template <typename acc_t>
struct RowStatsKernel {
  static PIUMR_ALWAYS_INLINE void run(const StatsTileArgs<acc_t>& a) {
    const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
    const Params<acc_t>& p = a.params;
    const int32_t cols = static_cast<int32_t>(a.cols);
    const int32_t* col_labels = a.col_labels;
    for (int64_t r = 0; r < a.rows; ++r) {
      // |self| <= group size < 2^31.
      const int32_t self = static_cast<int32_t>(r + a.self_offset);
      const acc_t* c = a.cosine + r * a.cols;
      const int32_t label = a.row_labels[r];
      acc_t cos_max = neg_inf, emph_max = neg_inf;
      // Values are computed unconditionally and masks select them: branch-free bodies
      // vectorize (a select of a possibly trapping expression keeps its branch).
#pragma omp simd reduction(max : cos_max, emph_max)
      for (int32_t j = 0; j < cols; ++j) {
        const acc_t cj = c[j];
        const acc_t log_r = log_emphasis(cj, p);
        const bool partner = j != self;
        cos_max = max_of(cos_max, partner ? cj : neg_inf);
        emph_max = max_of(emph_max, partner ? log_r : neg_inf);
      }
      if (cos_max == neg_inf) continue;  // the tile holds only the self pair
      acc_t* state = a.online + r;
      const int64_t s = a.stride;
      const acc_t logit_max = std::max(state[kLogitMax * s], cos_max * p.inv_tau);
      const acc_t emph_max_new = std::max(state[kEmphMax * s], emph_max);
      acc_t logit_sum = 0, emph_sum = 0, pos_logit = 0, pos_weight = 0, pos_count = 0;
#pragma omp simd reduction(+ : logit_sum, emph_sum, pos_logit, pos_weight, pos_count)
      for (int32_t j = 0; j < cols; ++j) {
        const acc_t cj = c[j];
        const bool partner = j != self;
        const bool positive = partner & (col_labels[j] == label);
        const acc_t logit = cj * p.inv_tau;
        const acc_t r_exp = vexp<acc_t>(log_emphasis(cj, p) - emph_max_new);
        const acc_t p_exp = vexp<acc_t>(logit - logit_max);
        logit_sum += partner ? p_exp : acc_t(0);
        emph_sum += partner ? r_exp : acc_t(0);
        pos_logit += positive ? r_exp * logit : acc_t(0);
        pos_weight += positive ? r_exp : acc_t(0);
        pos_count += positive ? acc_t(1) : acc_t(0);
      }
      // Rescale the running sums to the new maxima (exp(-inf) = 0 on the first tile).
      const acc_t logit_scale = std::exp(state[kLogitMax * s] - logit_max);
      const acc_t emph_scale = std::exp(state[kEmphMax * s] - emph_max_new);
      state[kLogitMax * s] = logit_max;
      state[kEmphMax * s] = emph_max_new;
      state[kLogitSum * s] = state[kLogitSum * s] * logit_scale + logit_sum;
      state[kEmphSum * s] = state[kEmphSum * s] * emph_scale + emph_sum;
      state[kPosLogit * s] = state[kPosLogit * s] * emph_scale + pos_logit;
      state[kPosWeight * s] = state[kPosWeight * s] * emph_scale + pos_weight;
      state[kPosCount * s] += pos_count;
    }
  }
};

// Column-wise update of an off-diagonal tile (no self pairs): its columns are anchors,
// its rows their partners. Loops run along the columns, so they vectorize the same way.
template <typename acc_t>
struct ColumnStatsKernel {
  static PIUMR_ALWAYS_INLINE void run(const StatsTileArgs<acc_t>& a) {
    const Params<acc_t>& p = a.params;
    const int64_t cols = a.cols, s = a.stride;
    acc_t* cos_max = a.column_max;
    acc_t* emph_max = a.column_max + cols;
    std::fill_n(cos_max, cols, -std::numeric_limits<acc_t>::infinity());
    std::fill_n(emph_max, cols, -std::numeric_limits<acc_t>::infinity());
    for (int64_t r = 0; r < a.rows; ++r) {
      const acc_t* c = a.cosine + r * cols;
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) {
        cos_max[j] = max_of(cos_max[j], c[j]);
        emph_max[j] = max_of(emph_max[j], log_emphasis(c[j], p));
      }
    }
    acc_t* logit_max = a.online + kLogitMax * s;
    acc_t* emph_run = a.online + kEmphMax * s;
    acc_t* logit_sum = a.online + kLogitSum * s;
    acc_t* emph_sum = a.online + kEmphSum * s;
    acc_t* pos_logit = a.online + kPosLogit * s;
    acc_t* pos_weight = a.online + kPosWeight * s;
    acc_t* pos_count = a.online + kPosCount * s;
    // New running maxima; the sums so far are rescaled to them (still 0 before the first tile).
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) {
      const acc_t lm = max_of(logit_max[j], cos_max[j] * p.inv_tau);
      const acc_t em = max_of(emph_run[j], emph_max[j]);
      const acc_t logit_scale = vexp<acc_t>(logit_max[j] - lm);
      const acc_t emph_scale = vexp<acc_t>(emph_run[j] - em);
      logit_sum[j] *= logit_scale;
      emph_sum[j] *= emph_scale;
      pos_logit[j] *= emph_scale;
      pos_weight[j] *= emph_scale;
      logit_max[j] = lm;
      emph_run[j] = em;
    }
    for (int64_t r = 0; r < a.rows; ++r) {
      const acc_t* c = a.cosine + r * cols;
      const int32_t label = a.row_labels[r];
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) {
        const acc_t cj = c[j];
        const bool positive = a.col_labels[j] == label;
        const acc_t logit = cj * p.inv_tau;
        const acc_t r_exp = vexp<acc_t>(log_emphasis(cj, p) - emph_run[j]);
        logit_sum[j] += vexp<acc_t>(logit - logit_max[j]);
        emph_sum[j] += r_exp;
        pos_logit[j] += positive ? r_exp * logit : acc_t(0);
        pos_weight[j] += positive ? r_exp : acc_t(0);
        pos_count[j] += positive ? acc_t(1) : acc_t(0);
      }
    }
  }
};

// ---------------------------------------------------------------- gradient tile
template <typename acc_t>
struct GradTileArgs {
  acc_t* tile;  // (rows, cols): cosines in, H = gamma (G + G^T) out
  const int32_t* row_labels;
  const int32_t* col_labels;
  const acc_t* row_stats;  // (kNumStats, stats_stride), anchor of tile row 0 first
  const acc_t* col_stats;  // same, anchor of tile column 0 first
  int64_t stats_stride, rows, cols, self_offset;
  acc_t gamma, partners, inv_partners;  // 1 / |I_g|, |I_g| - 1, 1 / (|I_g| - 1)
  Params<acc_t> params;
};

// dl_i/dc_ij for anchor i (its stats given) and partner j (cosine c, positive or not):
//   -(1 / (tau m_i)) (w_ij [j in P(i)] - W_i p_ij)          through the logits, and with
//   w_ij (q_ij - l_i / (|I_g| - 1)) dlogr_ij/dc_ij          through the weights (not detached),
// where p_ij = softmax of the logits, w_ij = (|I_g| - 1) softmax of log r, W_i = sum_P w_ij,
// q_ij = -[j in P(i)] (s_ij - LSE_i) / m_i and dlogr/dc = -(c - eta) / eta^2.
template <typename acc_t, bool kDetach>
PIUMR_ALWAYS_INLINE acc_t anchor_cosine_grad(acc_t c, acc_t s, acc_t log_r, bool positive, acc_t logit_lse,
                                             acc_t emphasis_lse, acc_t positive_weight, acc_t anchor_loss, acc_t inv_m,
                                             acc_t partners, acc_t inv_partners, const Params<acc_t>& p) {
  const acc_t prob = vexp<acc_t>(s - logit_lse);
  const acc_t w = partners * vexp<acc_t>(log_r - emphasis_lse);
  acc_t g = -p.inv_tau * inv_m * ((positive ? w : acc_t(0)) - positive_weight * prob);
  if constexpr (!kDetach) {
    const acc_t q = positive ? -inv_m * (s - logit_lse) : acc_t(0);
    g += w * (q - anchor_loss * inv_partners) * (-(c - p.eta) * p.inv_eta * p.inv_eta);
  }
  return g;
}

template <typename acc_t, bool kDetach>
struct GradTileKernel {
  static PIUMR_ALWAYS_INLINE void run(const GradTileArgs<acc_t>& a) {
    const Params<acc_t>& p = a.params;
    const int64_t S = a.stats_stride;
    const int32_t cols = static_cast<int32_t>(a.cols);
    const acc_t* col_lse = a.col_stats + kLogitLse * S;
    const acc_t* col_emph = a.col_stats + kEmphasisLse * S;
    const acc_t* col_wpos = a.col_stats + kPositiveWeight * S;
    const acc_t* col_loss = a.col_stats + kAnchorLoss * S;
    const acc_t* col_npos = a.col_stats + kNumPositive * S;
    for (int64_t r = 0; r < a.rows; ++r) {
      const int32_t self = static_cast<int32_t>(r + a.self_offset);
      acc_t* h = a.tile + r * a.cols;
      const int32_t label = a.row_labels[r];
      const acc_t lse_i = a.row_stats[kLogitLse * S + r], emph_i = a.row_stats[kEmphasisLse * S + r];
      const acc_t wpos_i = a.row_stats[kPositiveWeight * S + r], loss_i = a.row_stats[kAnchorLoss * S + r];
      const acc_t inv_m_i = acc_t(1) / std::max(a.row_stats[kNumPositive * S + r], acc_t(1));
#pragma omp simd
      for (int32_t j = 0; j < cols; ++j) {
        const acc_t c = h[j];
        const acc_t s = c * p.inv_tau;
        const acc_t log_r = log_emphasis(c, p);
        const bool positive = a.col_labels[j] == label;
        const acc_t inv_m_j = acc_t(1) / max_of(col_npos[j], acc_t(1));
        const acc_t g_ij = anchor_cosine_grad<acc_t, kDetach>(c, s, log_r, positive, lse_i, emph_i, wpos_i, loss_i,
                                                              inv_m_i, a.partners, a.inv_partners, p);
        const acc_t g_ji =
            anchor_cosine_grad<acc_t, kDetach>(c, s, log_r, positive, col_lse[j], col_emph[j], col_wpos[j], col_loss[j],
                                               inv_m_j, a.partners, a.inv_partners, p);
        const acc_t value = a.gamma * (g_ij + g_ji);
        h[j] = j != self ? value : acc_t(0);
      }
    }
  }
};

// ---------------------------------------------------------------- normalization backward
template <typename acc_t>
struct NormBackwardArgs {
  acc_t* f;           // (rows, C): normalized rows in, dL/dz out (in place)
  const acc_t* grad;  // (rows, C) dL/df
  const acc_t* norm;  // (rows,)
  int64_t rows, width;
};

// f = z / max(||z||, eps): dz = (df - f (f . df)) / ||z|| when ||z|| >= eps, else df / eps.
template <typename acc_t>
struct NormBackwardKernel {
  static PIUMR_ALWAYS_INLINE void run(const NormBackwardArgs<acc_t>& a) {
    for (int64_t i = 0; i < a.rows; ++i) {
      acc_t* fi = a.f + i * a.width;
      const acc_t* gi = a.grad + i * a.width;
      const acc_t norm = a.norm[i];
      const acc_t inv = acc_t(1) / std::max(norm, acc_t(kNormEps));
      acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t k = 0; k < a.width; ++k) dot += fi[k] * gi[k];
      if (norm < acc_t(kNormEps)) dot = 0;
#pragma omp simd
      for (int64_t k = 0; k < a.width; ++k) fi[k] = inv * (gi[k] - fi[k] * dot);
    }
  }
};

// ---------------------------------------------------------------- backward: scale + scatter
template <typename scalar_t, typename acc_t>
struct ScatterArgs {
  const acc_t* direction;  // (B, C) dL_g/dz, group order
  const int64_t* order;
  acc_t scale;     // the upstream gradient of the loss
  scalar_t* grad;  // (B, C) batch order
  int64_t begin, end, width;
};

template <typename scalar_t, typename acc_t>
struct ScatterKernel {
  static PIUMR_ALWAYS_INLINE void run(const ScatterArgs<scalar_t, acc_t>& a) {
    for (int64_t i = a.begin; i < a.end; ++i) {
      const acc_t* d = a.direction + i * a.width;
      scalar_t* out = a.grad + a.order[i] * a.width;
#pragma omp simd
      for (int64_t k = 0; k < a.width; ++k) out[k] = static_cast<scalar_t>(a.scale * d[k]);
    }
  }
};

// ---------------------------------------------------------------- symmetric Gram
template <typename acc_t>
struct GramArgs {
  const acc_t* f;  // (rows, width) contiguous rows
  int64_t rows, width;
  acc_t* out;  // (rows, rows) = f f^T
};

// Only the 4 x 4 blocks on and above the diagonal, then mirrored: 16 dot products at a
// time along the rows (16 vector accumulators; 8 row loads per 16 multiply-adds). For
// groups of up to kTile rows this beats BLAS, which packs both operands and computes
// every block: at C = 2048 on one Zen 4 core, 11 vs 36 us at 20 rows, 0.40 vs 0.69 ms at
// 128 (the full product; 0.52 ms as three half-size products).
constexpr int64_t kGramBlock = 4;

template <typename acc_t>
struct GramKernel {
  static PIUMR_ALWAYS_INLINE void run(const GramArgs<acc_t>& a) {
    const int64_t n = a.rows, width = a.width;
    // Block rows past the end repeat the last row; their sums are not stored.
    const auto row = [&](int64_t i) { return a.f + std::min(i, n - 1) * width; };
    for (int64_t i0 = 0; i0 < n; i0 += kGramBlock) {
      const acc_t *x0 = row(i0), *x1 = row(i0 + 1), *x2 = row(i0 + 2), *x3 = row(i0 + 3);
      for (int64_t j0 = i0; j0 < n; j0 += kGramBlock) {
        const acc_t *y0 = row(j0), *y1 = row(j0 + 1), *y2 = row(j0 + 2), *y3 = row(j0 + 3);
        acc_t s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
        acc_t s20 = 0, s21 = 0, s22 = 0, s23 = 0, s30 = 0, s31 = 0, s32 = 0, s33 = 0;
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)
        for (int64_t k = 0; k < width; ++k) {
          const acc_t u0 = x0[k], u1 = x1[k], u2 = x2[k], u3 = x3[k];
          const acc_t v0 = y0[k], v1 = y1[k], v2 = y2[k], v3 = y3[k];
          s00 += u0 * v0, s01 += u0 * v1, s02 += u0 * v2, s03 += u0 * v3;
          s10 += u1 * v0, s11 += u1 * v1, s12 += u1 * v2, s13 += u1 * v3;
          s20 += u2 * v0, s21 += u2 * v1, s22 += u2 * v2, s23 += u2 * v3;
          s30 += u3 * v0, s31 += u3 * v1, s32 += u3 * v2, s33 += u3 * v3;
        }
        const acc_t sums[kGramBlock][kGramBlock] = {
            {s00, s01, s02, s03}, {s10, s11, s12, s13}, {s20, s21, s22, s23}, {s30, s31, s32, s33}};
        for (int64_t r = 0; r < kGramBlock && i0 + r < n; ++r)
          for (int64_t c = 0; c < kGramBlock && j0 + c < n; ++c) a.out[(i0 + r) * n + j0 + c] = sums[r][c];
      }
    }
    for (int64_t i = 1; i < n; ++i)
      for (int64_t j = 0; j < i; ++j) a.out[i * n + j] = a.out[j * n + i];
  }
};

// ---------------------------------------------------------------- H F products
template <typename acc_t>
struct ProductArgs {
  const acc_t* a;                      // A(i, k) = a[i * a_row_stride + k * a_col_stride]
  int64_t a_row_stride, a_col_stride;  // (a transposed tile: swap the strides)
  const acc_t* b;                      // (inner, width) contiguous rows
  int64_t rows, inner, width;
  acc_t* out;       // (rows, width) contiguous rows
  bool accumulate;  // out += A B instead of out = A B
};

// out (+)= A B for the gradient products H F (A at most kTile x kTile, B = F's rows): a
// 4-row x 4-vector register block of accumulators, each step one row of B (4 vector loads)
// against 4 broadcast entries of A (16 multiply-adds). MKL's sgemm runs its AVX2 kernel
// on AMD processors; on the project's Zen 5 machine this is 1.8x faster at 128 x 128 x
// 2048 (one core: 0.36 vs 0.65 ms). The columns past the last full block take a plain loop.
constexpr int kProductRows = 4;
constexpr int kProductVectors = 4;

template <typename acc_t>
struct ProductKernel {
  static PIUMR_ALWAYS_INLINE void run(const ProductArgs<acc_t>& p) {
    using V = typename Vec64<acc_t>::type;
    constexpr int64_t kLanes = 64 / sizeof(acc_t);
    constexpr int64_t kBlock = kProductVectors * kLanes;
    const int64_t full = p.width - p.width % kBlock;
    const auto a_at = [&](int64_t i, int64_t k) { return p.a[i * p.a_row_stride + k * p.a_col_stride]; };
    for (int64_t j0 = 0; j0 < full; j0 += kBlock) {
      for (int64_t i0 = 0; i0 < p.rows; i0 += kProductRows) {
        // Block rows past the end repeat the last row; they are not stored.
        int64_t row[kProductRows];
        for (int r = 0; r < kProductRows; ++r) row[r] = std::min(i0 + r, p.rows - 1);
        V acc[kProductRows][kProductVectors];
        for (int r = 0; r < kProductRows; ++r) {
          for (int q = 0; q < kProductVectors; ++q) {
            if (p.accumulate) {
              std::memcpy(&acc[r][q], p.out + row[r] * p.width + j0 + q * kLanes, sizeof(V));
            } else {
              acc[r][q] = V{};
            }
          }
        }
        for (int64_t k = 0; k < p.inner; ++k) {
          V b[kProductVectors];
          for (int q = 0; q < kProductVectors; ++q) std::memcpy(&b[q], p.b + k * p.width + j0 + q * kLanes, sizeof(V));
          for (int r = 0; r < kProductRows; ++r) {
            const V a = V{} + a_at(row[r], k);
            for (int q = 0; q < kProductVectors; ++q) acc[r][q] += a * b[q];
          }
        }
        for (int r = 0; r < kProductRows && i0 + r < p.rows; ++r) {
          for (int q = 0; q < kProductVectors; ++q) {
            std::memcpy(p.out + (i0 + r) * p.width + j0 + q * kLanes, &acc[r][q], sizeof(V));
          }
        }
      }
    }
    if (full == p.width) return;
    for (int64_t i = 0; i < p.rows; ++i) {
      acc_t* out = p.out + i * p.width;
      if (!p.accumulate) std::fill(out + full, out + p.width, acc_t(0));
      for (int64_t k = 0; k < p.inner; ++k) {
        const acc_t a = a_at(i, k);
        const acc_t* b = p.b + k * p.width;
#pragma omp simd
        for (int64_t c = full; c < p.width; ++c) out[c] += a * b[c];
      }
    }
  }
};

// ---------------------------------------------------------------- drivers
// Everything a forward needs, in group order.
template <typename acc_t>
struct GroupData {
  at::Tensor f;  // (B, C) normalized rows; with a gradient, D = dL_g/dz at the end
  acc_t* f_ptr;
  const acc_t* norm;      // (B,)
  const int32_t* labels;  // (B,) dense class ids
  acc_t* stats;           // (kNumStats, B)
  bool need_grad;
  int64_t batch, width;
  Params<acc_t> params;
};

// A (rows x cols) view of a flat scratch buffer, for at::mm_out.
at::Tensor tile_view(const at::Tensor& scratch, int64_t rows, int64_t cols) {
  return scratch.narrow(0, 0, rows * cols).view({rows, cols});
}

// tile = the cosines of rows..rows+size of F with themselves (a diagonal tile).
template <typename acc_t>
void symmetric_gram(at::Tensor& tile, const acc_t* rows, int64_t size, int64_t width) {
  run_for_this_cpu<GramKernel<acc_t>>(GramArgs<acc_t>{rows, size, width, tile.data_ptr<acc_t>()});
}

// A group of at most kTile samples, start..start+size: statistics, then (with a
// gradient) H F for its rows into `grad_scratch` (kTile x C) and D over F's rows, all
// from one cosine tile.
template <typename acc_t, bool kDetach>
void small_group(const GroupData<acc_t>& d, int64_t start, int64_t size, at::Tensor& scratch,
                 const at::Tensor& grad_scratch, acc_t* online) {
  at::Tensor tile = tile_view(scratch, size, size);
  symmetric_gram(tile, d.f_ptr + start * d.width, size, d.width);
  acc_t* cosine = tile.data_ptr<acc_t>();
  const int32_t* labels = d.labels + start;
  reset_online(online, kTile);
  run_for_this_cpu<RowStatsKernel<acc_t>>(
      StatsTileArgs<acc_t>{cosine, labels, labels, online, nullptr, size, size, kTile, 0, d.params});
  acc_t* stats = d.stats + start;
  finish_stats(online, kTile, size, size, stats, d.batch);
  if (!d.need_grad) return;
  const acc_t partners = acc_t(size - 1);
  run_for_this_cpu<GradTileKernel<acc_t, kDetach>>(GradTileArgs<acc_t>{cosine, labels, labels, stats, stats, d.batch,
                                                                       size, size, 0, acc_t(1) / acc_t(size), partners,
                                                                       acc_t(1) / partners, d.params});
  acc_t* grad_rows = grad_scratch.data_ptr<acc_t>();
  run_for_this_cpu<ProductKernel<acc_t>>(
      ProductArgs<acc_t>{cosine, size, 1, d.f_ptr + start * d.width, size, size, d.width, grad_rows, false});
  run_for_this_cpu<NormBackwardKernel<acc_t>>(
      NormBackwardArgs<acc_t>{d.f_ptr + start * d.width, grad_rows, d.norm + start, size, d.width});
}

struct TilePair {
  int64_t row0, rows, col0, cols;  // offsets within the group
};

// The cosines of tile t of the group's rows f_group (contiguous).
template <typename acc_t>
void tile_cosines(at::Tensor& tile, const at::Tensor& f_group, const TilePair& t) {
  if (t.row0 == t.col0) {
    const int64_t width = f_group.size(1);
    symmetric_gram(tile, f_group.data_ptr<acc_t>() + t.row0 * width, t.rows, width);
  } else {
    at::mm_out(tile, f_group.narrow(0, t.row0, t.rows), f_group.narrow(0, t.col0, t.cols).t());
  }
}

// Tiles (I, J), I <= J, of a group, split into `chunks` contiguous runs of about equal
// cost (with a gradient, the heavier pass: a diagonal tile takes two products, an
// off-diagonal one three).
std::vector<std::vector<TilePair>> tile_chunks(int64_t size, int64_t chunks) {
  std::vector<TilePair> tiles;
  for (int64_t r0 = 0; r0 < size; r0 += kTile)
    for (int64_t c0 = r0; c0 < size; c0 += kTile)
      tiles.push_back({r0, std::min(kTile, size - r0), c0, std::min(kTile, size - c0)});
  const auto cost = [](const TilePair& t) { return t.rows * t.cols * (t.row0 == t.col0 ? 2 : 3); };
  int64_t total = 0;
  for (const TilePair& t : tiles) total += cost(t);
  chunks = std::max<int64_t>(1, std::min<int64_t>(chunks, static_cast<int64_t>(tiles.size())));
  std::vector<std::vector<TilePair>> out(chunks);
  int64_t done = 0;
  for (const TilePair& t : tiles) {
    const int64_t chunk = std::min<int64_t>(chunks - 1, done * chunks / std::max<int64_t>(total, 1));
    out[chunk].push_back(t);
    done += cost(t);
  }
  return out;
}

// A group of more than kTile samples, streamed over the tiles I <= J (see the top).
template <typename acc_t, bool kDetach>
void large_group(const GroupData<acc_t>& d, int64_t start, int64_t size) {
  const auto opts = d.f.options();
  const int64_t width = d.width;
  const auto chunks = tile_chunks(size, at::get_num_threads());
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  const at::Tensor f_group = d.f.narrow(0, start, size);
  const int32_t* labels = d.labels + start;
  const acc_t partners = acc_t(size - 1);

  // Pass 1: per-chunk partial online states, merged in chunk order.
  std::vector<acc_t> online(num_chunks * kNumOnline * size);
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor scratch = at::empty({kTile * kTile}, opts);
    std::vector<acc_t> column_max(2 * kTile);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      acc_t* state = online.data() + chunk * kNumOnline * size;
      reset_online(state, size);
      for (const TilePair& t : chunks[chunk]) {
        at::Tensor tile = tile_view(scratch, t.rows, t.cols);
        tile_cosines<acc_t>(tile, f_group, t);
        const StatsTileArgs<acc_t> rows{tile.data_ptr<acc_t>(), labels + t.row0, labels + t.col0, state + t.row0,
                                        column_max.data(),      t.rows,          t.cols,          size,
                                        t.row0 - t.col0,        d.params};
        run_for_this_cpu<RowStatsKernel<acc_t>>(rows);
        if (t.row0 != t.col0) {
          StatsTileArgs<acc_t> columns = rows;
          columns.online = state + t.col0;
          run_for_this_cpu<ColumnStatsKernel<acc_t>>(columns);
        }
      }
    }
  });
  for (int64_t chunk = 1; chunk < num_chunks; ++chunk)
    merge_online(online.data(), online.data() + chunk * kNumOnline * size, size, size);
  acc_t* stats = d.stats + start;
  finish_stats(online.data(), size, size, size, stats, d.batch);
  if (!d.need_grad) return;

  // Pass 2: each chunk accumulates dL_g/dF into its own buffer; chunk 0's gets the sum.
  at::Tensor partial = at::zeros({num_chunks, size, width}, opts);
  at::Tensor grad_group = partial[0];
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor scratch = at::empty({kTile * kTile}, opts);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      at::Tensor grad = partial[chunk];
      for (const TilePair& t : chunks[chunk]) {
        const at::Tensor f_rows = f_group.narrow(0, t.row0, t.rows), f_cols = f_group.narrow(0, t.col0, t.cols);
        at::Tensor tile = tile_view(scratch, t.rows, t.cols);
        tile_cosines<acc_t>(tile, f_group, t);
        run_for_this_cpu<GradTileKernel<acc_t, kDetach>>(GradTileArgs<acc_t>{
            tile.data_ptr<acc_t>(), labels + t.row0, labels + t.col0, stats + t.row0, stats + t.col0, d.batch, t.rows,
            t.cols, t.row0 - t.col0, acc_t(1) / acc_t(size), partners, acc_t(1) / partners, d.params});
        acc_t* grad_ptr = grad.data_ptr<acc_t>();
        const acc_t* h = tile.data_ptr<acc_t>();
        run_for_this_cpu<ProductKernel<acc_t>>(ProductArgs<acc_t>{h, t.cols, 1, f_cols.data_ptr<acc_t>(), t.rows,
                                                                  t.cols, width, grad_ptr + t.row0 * width, true});
        if (t.row0 != t.col0) {
          run_for_this_cpu<ProductKernel<acc_t>>(ProductArgs<acc_t>{h, 1, t.cols, f_rows.data_ptr<acc_t>(), t.cols,
                                                                    t.rows, width, grad_ptr + t.col0 * width, true});
        }
      }
    }
  });
  for (int64_t chunk = 1; chunk < num_chunks; ++chunk) grad_group.add_(partial[chunk]);
  const acc_t* grad_ptr = grad_group.data_ptr<acc_t>();
  const int64_t grain = std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(width, 1));
  at::parallel_for(0, size, grain, [&](int64_t begin, int64_t end) {
    run_for_this_cpu<NormBackwardKernel<acc_t>>(NormBackwardArgs<acc_t>{
        d.f_ptr + (start + begin) * width, grad_ptr + begin * width, d.norm + start + begin, end - begin, width});
  });
}

// Class ids in group order as int32, so the label tests in the float loops use 32-bit
// lanes like the values (mixed 64/32-bit masks keep GCC from vectorizing them). Ids
// outside the int32 range are renumbered first (only equality matters).
at::Tensor group_order_labels(const at::Tensor& labels, const int64_t* order) {
  const int64_t batch = labels.size(0);
  at::Tensor ids = labels;
  const int64_t* raw = labels.data_ptr<int64_t>();
  const bool fits = std::all_of(raw, raw + batch, [](int64_t v) {
    return v >= std::numeric_limits<int32_t>::min() && v <= std::numeric_limits<int32_t>::max();
  });
  if (!fits) ids = std::get<1>(at::_unique(labels, /*sorted=*/false, /*return_inverse=*/true)).contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  at::Tensor out = at::empty({batch}, labels.options().dtype(at::kInt));
  int32_t* dst = out.data_ptr<int32_t>();
  for (int64_t i = 0; i < batch; ++i) dst[i] = static_cast<int32_t>(id[order[i]]);
  return out;
}

// The combination over the groups of at least 2 members (G' of them):
// loss = mean L_g + lambda_var Var L_g (population variance; both 0 when G' = 0). With
// `grad`, dloss/dL_g of every group: (1 + 2 lambda_var (L_g - mean)) / G' with var_grad,
// 1 / G' without (the variance then carries no gradient), 0 for the left-out groups.
template <typename acc_t>
std::pair<acc_t, acc_t> combine_risks(const acc_t* risks, const int64_t* off, int64_t num_groups, acc_t lambda_var,
                                      bool var_grad, acc_t* grad) {
  int64_t counted = 0;
  acc_t total = 0;
  for (int64_t g = 0; g < num_groups; ++g) {
    if (off[g + 1] - off[g] < 2) continue;
    ++counted;
    total += risks[g];
  }
  const acc_t count = acc_t(std::max<int64_t>(counted, 1));
  const acc_t mean = total / count;
  acc_t spread = 0;
  for (int64_t g = 0; g < num_groups; ++g)
    if (off[g + 1] - off[g] >= 2) spread += (risks[g] - mean) * (risks[g] - mean);
  const acc_t risk_var = spread / count;
  if (grad != nullptr) {
    for (int64_t g = 0; g < num_groups; ++g) {
      const acc_t slope = var_grad ? acc_t(1) + acc_t(2) * lambda_var * (risks[g] - mean) : acc_t(1);
      grad[g] = off[g + 1] - off[g] >= 2 ? slope / count : acc_t(0);
    }
  }
  return {mean + lambda_var * risk_var, risk_var};
}

// Writes the group risks, the loss and the variance; returns D = dloss/dz (B, C) in group
// order with `need_grad`. Groups of fewer than 2 members are left out: risk 0, rows of D 0.
template <typename scalar_t, bool kDetach>
at::Tensor forward_impl(const at::Tensor& features, const at::Tensor& labels, const at::Tensor& order,
                        const at::Tensor& offsets, double tau, double eta, double lambda_var, bool var_grad,
                        bool need_grad, at::Tensor& risks, at::Tensor& loss, at::Tensor& risk_var) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = features.size(0), width = features.size(1);
  const auto acc_opts = features.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t* order_ptr = order.data_ptr<int64_t>();
  at::Tensor f = at::empty({B, width}, acc_opts);
  at::Tensor norm = at::empty({B}, acc_opts);
  at::Tensor stats = at::empty({kNumStats, B}, acc_opts);
  const at::Tensor label_ids = group_order_labels(labels, order_ptr);
  {
    const scalar_t* z = features.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(width, 1));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      run_for_this_cpu<NormalizeKernel<scalar_t, acc_t>>(
          NormalizeArgs<scalar_t, acc_t>{z, order_ptr, f.data_ptr<acc_t>(), norm.data_ptr<acc_t>(), begin, end, width});
    });
  }
  const GroupData<acc_t> data{f,
                              f.data_ptr<acc_t>(),
                              norm.data_ptr<acc_t>(),
                              label_ids.data_ptr<int32_t>(),
                              stats.data_ptr<acc_t>(),
                              need_grad,
                              B,
                              width,
                              Params<acc_t>{acc_t(1 / tau), acc_t(eta), acc_t(1 / eta)}};
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t num_groups = offsets.size(0) - 1;
  std::vector<int64_t> small, large;
  int64_t small_work = 0, largest_small = 0;
  for (int64_t g = 0; g < num_groups; ++g) {
    const int64_t size = off[g + 1] - off[g];
    if (size < 2) continue;
    (size <= kTile ? small : large).push_back(g);
    if (size > kTile) continue;
    small_work += size * size * (width + 32) * (need_grad ? 2 : 1);
    largest_small = std::max(largest_small, size);
  }
  if (!small.empty()) {
    const int64_t per_group = std::max<int64_t>(1, small_work / static_cast<int64_t>(small.size()));
    at::parallel_for(0, static_cast<int64_t>(small.size()), std::max<int64_t>(1, kMinTaskWork / per_group),
                     [&](int64_t begin, int64_t end) {
                       at::Tensor scratch = at::empty({kTile * kTile}, acc_opts);
                       const at::Tensor grad_scratch = at::empty({need_grad ? largest_small : 0, width}, acc_opts);
                       std::vector<acc_t> online(kNumOnline * kTile);
                       for (int64_t k = begin; k < end; ++k) {
                         const int64_t g = small[k];
                         small_group<acc_t, kDetach>(data, off[g], off[g + 1] - off[g], scratch, grad_scratch,
                                                     online.data());
                       }
                     });
  }
  for (int64_t g : large) large_group<acc_t, kDetach>(data, off[g], off[g + 1] - off[g]);

  acc_t* risk_ptr = risks.data_ptr<acc_t>();
  const acc_t* anchor_loss = data.stats + kAnchorLoss * B;
  for (int64_t g = 0; g < num_groups; ++g) {
    const int64_t size = off[g + 1] - off[g];
    acc_t total = 0;
    if (size >= 2) {
      for (int64_t i = off[g]; i < off[g + 1]; ++i) total += anchor_loss[i];
      total /= acc_t(size);
    } else if (need_grad) {
      std::fill_n(data.f_ptr + off[g] * width, size * width, acc_t(0));  // still the normalized row otherwise
    }
    risk_ptr[g] = total;
  }
  std::vector<acc_t> risk_grad(need_grad ? num_groups : 0);
  const auto [value, spread] = combine_risks<acc_t>(risk_ptr, off, num_groups, acc_t(lambda_var), var_grad,
                                                    need_grad ? risk_grad.data() : nullptr);
  loss.fill_(value);
  risk_var.fill_(spread);
  if (!need_grad) return at::empty({0, width}, acc_opts);
  std::vector<acc_t> row_scale(B);
  for (int64_t g = 0; g < num_groups; ++g)
    std::fill(row_scale.begin() + off[g], row_scale.begin() + off[g + 1], risk_grad[g]);
  const int64_t grain = std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(width, 1));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t* row = data.f_ptr + i * width;
      const acc_t scale = row_scale[i];
#pragma omp simd
      for (int64_t k = 0; k < width; ++k) row[k] *= scale;
    }
  });
  return f;
}

// ---------------------------------------------------------------- op entry points
// Checks the partition (groups may be empty) and returns the number of groups.
int64_t check_partition(const char* op, const at::Tensor& order, const at::Tensor& offsets, int64_t batch) {
  TORCH_CHECK(order.device().is_cpu() && offsets.device().is_cpu(), op, ": order and offsets must be CPU tensors");
  TORCH_CHECK(order.dim() == 1 && order.size(0) == batch && order.scalar_type() == at::kLong && order.is_contiguous(),
              op, ": order must be a contiguous int64 (B,) tensor");
  TORCH_CHECK(
      offsets.dim() == 1 && offsets.size(0) >= 2 && offsets.scalar_type() == at::kLong && offsets.is_contiguous(), op,
      ": offsets must be a contiguous int64 (G + 1,) tensor");
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t count = offsets.size(0) - 1;
  TORCH_CHECK(off[0] == 0 && off[count] == batch, op, ": offsets must run from 0 to B");
  for (int64_t g = 0; g < count; ++g)
    TORCH_CHECK(off[g + 1] >= off[g], op, ": offsets must be non-decreasing, group ", g, " has ", off[g + 1] - off[g],
                " members");
  const int64_t* idx = order.data_ptr<int64_t>();
  std::vector<bool> seen(batch, false);
  for (int64_t i = 0; i < batch; ++i) {
    TORCH_CHECK(idx[i] >= 0 && idx[i] < batch && !seen[idx[i]], op, ": order must be a permutation of 0..B-1");
    seen[idx[i]] = true;
  }
  return count;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> girl_forward(
    const at::Tensor& features, const at::Tensor& labels, const at::Tensor& order, const at::Tensor& offsets,
    double tau, double eta, double lambda_var, bool var_grad, bool detach_weights, bool need_grad) {
  TORCH_CHECK(features.device().is_cpu() && labels.device().is_cpu(),
              "girl_cpp: features and labels must be on the CPU");
  TORCH_CHECK(features.dim() == 2 && features.is_contiguous() && at::isFloatingType(features.scalar_type()),
              "girl_cpp: features must be a contiguous floating (B, C) tensor, got ", features.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == features.size(0) && labels.scalar_type() == at::kLong &&
                  labels.is_contiguous(),
              "girl_cpp: labels must be a contiguous int64 (B,) tensor");
  TORCH_CHECK(tau > 0 && eta > 0, "girl_cpp: need tau > 0 and eta > 0, got ", tau, ", ", eta);
  TORCH_CHECK(lambda_var >= 0, "girl_cpp: need lambda_var >= 0, got ", lambda_var);
  const int64_t num_groups = check_partition("girl_cpp", order, offsets, features.size(0));
  const auto acc_opts = features.options().dtype(accumulation_dtype(features.scalar_type()));
  at::Tensor risks = at::empty({num_groups}, acc_opts);
  at::Tensor loss = at::empty({}, features.options());
  at::Tensor risk_var = at::empty({}, acc_opts);
  at::Tensor direction;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "girl_cpp", [&] {
    if (detach_weights) {
      direction = forward_impl<scalar_t, true>(features, labels, order, offsets, tau, eta, lambda_var, var_grad,
                                               need_grad, risks, loss, risk_var);
    } else {
      direction = forward_impl<scalar_t, false>(features, labels, order, offsets, tau, eta, lambda_var, var_grad,
                                                need_grad, risks, loss, risk_var);
    }
  });
  return {loss, risks, risk_var, direction};
}

// grad_features[order[i]] = grad_loss * direction[i], in the features' dtype (the other
// inputs of the shared schema are not needed here).
at::Tensor girl_backward(const at::Tensor& grad_loss, const at::Tensor& direction, const at::Tensor& features,
                         const at::Tensor& /*labels*/, const at::Tensor& order, const at::Tensor& offsets,
                         double /*tau*/, double /*eta*/, bool /*detach_weights*/) {
  const int64_t B = order.size(0);
  check_partition("girl_cpp_backward", order, offsets, B);
  const auto dtype = features.scalar_type();
  const auto acc = accumulation_dtype(dtype);
  TORCH_CHECK(
      direction.dim() == 2 && direction.size(0) == B && direction.scalar_type() == acc && direction.is_contiguous(),
      "girl_cpp_backward: saved must be the contiguous (B, C) ", acc,
      " direction of a forward run with need_grad=True, got shape ", direction.sizes());
  TORCH_CHECK(grad_loss.numel() == 1 && grad_loss.device().is_cpu(),
              "girl_cpp_backward: grad_loss must be a one-element CPU tensor, got shape ", grad_loss.sizes());
  const int64_t width = direction.size(1);
  at::Tensor grad_features = at::empty({B, width}, direction.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "girl_cpp_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale = grad_loss.to(acc).item<acc_t>();
    const acc_t* dir = direction.data_ptr<acc_t>();
    const int64_t* order_ptr = order.data_ptr<int64_t>();
    scalar_t* out = grad_features.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(width, 1));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      run_for_this_cpu<ScatterKernel<scalar_t, acc_t>>(
          ScatterArgs<scalar_t, acc_t>{dir, order_ptr, scale, out, begin, end, width});
    });
  });
  return grad_features;
}

}  // namespace

// Autograd and fakes are registered in Python (piumr_kernels/girl/op.py).
TORCH_LIBRARY_FRAGMENT(piumr_kernels, m) {
  m.def(
      "girl_cpp(Tensor features, Tensor labels, Tensor order, Tensor offsets, float tau, float eta,"
      " float lambda_var, bool var_grad, bool detach_weights, bool need_grad)"
      " -> (Tensor loss, Tensor group_risks, Tensor risk_var, Tensor saved)");
  m.def(
      "girl_cpp_backward(Tensor grad_loss, Tensor saved, Tensor features, Tensor labels, Tensor order,"
      " Tensor offsets, float tau, float eta, bool detach_weights) -> Tensor");
}

TORCH_LIBRARY_IMPL(piumr_kernels, CPU, m) {
  m.impl("girl_cpp", &girl_forward);
  m.impl("girl_cpp_backward", &girl_backward);
}

}  // namespace piumr
