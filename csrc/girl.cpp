// Fused GIRL loss on the CPU (SPEC §3): forward and backward, never forming a B x B matrix.
//
// Input: the features sorted by group ((B, C), group g is rows offsets[g]..offsets[g+1]),
// their labels and the G + 1 offsets. The rows are normalized once into an O(B*C) buffer.
// The work items are blocks of kRowTile anchors of one group, spread over the threads by
// one at::parallel_for (coarse tasks: the machine may be oversubscribed). An item walks
// its group's partners in tiles of kColTile: the tile's cosines come from one at::mm into
// the task's preallocated scratch (single-threaded MKL inside the parallel region), and the
// per-pair work (logits, Gaussian emphasis, masks, exponentials) runs in the vectorized
// micro-kernels below. Memory: O(B*C) plus O(kRowTile * (kColTile + C)) per thread.
//
// Forward: one pass over the partners of each anchor with two online log-sum-exps
// (flash style): LSE_i of the logits and log sum_k r_ik of the emphasis, plus the
// emphasis-weighted sums over the positives, rescaled whenever a running maximum grows.
// It saves six numbers per sample (see STATS in op.py) and returns the group risks.
//
// Backward: with gamma = dLoss/dL_g / |I_g| and G_ij = gamma * dl_i/dc_ij, the feature
// gradient is dF_i = sum_j (G_ij + G_ji) f_j. Both terms come from the saved per-sample
// stats, so an item forms H = G + G^T for its rows tile by tile, accumulates H F_C into
// its own rows only (no races, deterministic) and finishes with the normalization
// backward of those rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_dispatch.h"

namespace piumr {
namespace {

constexpr int64_t kRowTile = 128;       // anchors per work item
constexpr int64_t kColTile = 256;       // partners per tile
constexpr double kNormEps = 1e-12;      // f = z / max(||z||, kNormEps)
// Multiply-adds a thread task should at least get: below that, waking threads costs more
// than it saves (small batches run inline on the calling thread).
constexpr int64_t kMinTaskWork = int64_t{1} << 22;
constexpr int64_t kNumStats = 6;        // rows of the (6, B) stats tensor
enum Stat { kNorm = 0, kLogitLse, kEmphasisLse, kPositiveWeight, kAnchorLoss, kNumPositive };
constexpr int64_t kNumOnline = 7;       // running max/sum of both LSEs, positive sums, |P(i)|
enum Online { kLogitMax = 0, kLogitSum, kEmphMax, kEmphSum, kPosLogit, kPosWeight, kPosCount };

// Value-semantics min/max for the simd loops: std::max takes references, and under
// `omp simd` the referenced temporaries become per-lane arrays that block vectorization.
template <typename T>
PIUMR_ALWAYS_INLINE T max_of(T a, T b) { return a > b ? a : b; }
template <typename T>
PIUMR_ALWAYS_INLINE T min_of(T a, T b) { return a < b ? a : b; }

// exp for float that the compiler vectorizes inside `omp simd` loops (std::exp is a
// scalar libm call): 2^k * p(r), |r| <= ln2 / 2, degree-7 Taylor (< 1 ulp error there).
// Inputs are clamped to [-87, 88]; callers only use it for exp(x - running max) <= 1,
// where exp(-87) ~ 1e-38 is as good as 0. Double keeps std::exp (the gradcheck path).
template <typename acc_t>
PIUMR_ALWAYS_INLINE acc_t vexp(acc_t x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    x = min_of(max_of(x, -87.0f), 88.0f);
    const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    const float t = x * 1.44269504088896341f + shifter;
    const float k = t - shifter;
    const int32_t ki = __builtin_bit_cast(int32_t, t) - __builtin_bit_cast(int32_t, shifter);
    const float r = (x - k * 0.693145751953125f) - k * 1.428606765330187e-06f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p * __builtin_bit_cast(float, (ki + 127) << 23);
  } else {
    return std::exp(x);
  }
}

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

// ---------------------------------------------------------------- row normalization
template <typename scalar_t, typename acc_t>
struct NormalizeArgs {
  const scalar_t* z;
  acc_t* f;         // (B, C) normalized rows
  acc_t* norm;      // (B,) ||z_i||
  int64_t begin, end, width;
};

template <typename scalar_t, typename acc_t>
struct NormalizeKernel {
  static PIUMR_ALWAYS_INLINE void run(const NormalizeArgs<scalar_t, acc_t>& a) {
    for (int64_t i = a.begin; i < a.end; ++i) {
      const scalar_t* zi = a.z + i * a.width;
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

template <typename scalar_t, typename acc_t>
void normalize_rows(const at::Tensor& z, at::Tensor& f, acc_t* norm) {
  const int64_t batch = z.size(0), width = z.size(1);
  const scalar_t* z_ptr = z.data_ptr<scalar_t>();
  acc_t* f_ptr = f.data_ptr<acc_t>();
  const int64_t grain = std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(width, 1));
  at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
    run_for_this_cpu<NormalizeKernel<scalar_t, acc_t>>(
        NormalizeArgs<scalar_t, acc_t>{z_ptr, f_ptr, norm, begin, end, width});
  });
}

// ---------------------------------------------------------------- forward tile
template <typename acc_t>
struct ForwardTileArgs {
  const acc_t* cosine;      // (rows, cols) tile
  const int32_t* labels;    // (B,) dense class ids, sorted by group
  acc_t* online;            // (kNumOnline, kRowTile) running state of the item's rows
  int64_t rows, cols;
  int64_t first_row, first_col;  // global index of tile row 0 / column 0
  Params<acc_t> params;
};

template <typename acc_t>
struct ForwardTileKernel {
  static PIUMR_ALWAYS_INLINE void run(const ForwardTileArgs<acc_t>& a) {
    const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
    const Params<acc_t>& p = a.params;
    const int32_t* col_labels = a.labels + a.first_col;
    const int32_t cols = static_cast<int32_t>(a.cols);
    for (int64_t r = 0; r < a.rows; ++r) {
      // Column of the self pair (may be outside the tile); |self| <= group size < 2^31.
      const int32_t self = static_cast<int32_t>(a.first_row + r - a.first_col);
      const acc_t* c = a.cosine + r * a.cols;
      const int32_t label = a.labels[a.first_row + r];
      acc_t cos_max = neg_inf, emph_max = neg_inf;
      // Loads happen unconditionally and masks select values: branch-free bodies vectorize.
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
      const acc_t logit_max = std::max(state[kLogitMax * kRowTile], cos_max * p.inv_tau);
      const acc_t emph_max_new = std::max(state[kEmphMax * kRowTile], emph_max);
      acc_t logit_sum = 0, emph_sum = 0, pos_logit = 0, pos_weight = 0, pos_count = 0;
#pragma omp simd reduction(+ : logit_sum, emph_sum, pos_logit, pos_weight, pos_count)
      for (int32_t j = 0; j < cols; ++j) {
        const acc_t cj = c[j];
        const bool partner = j != self;
        const bool positive = partner & (col_labels[j] == label);
        const acc_t s = cj * p.inv_tau;
        const acc_t r_exp = vexp<acc_t>(log_emphasis(cj, p) - emph_max_new);
        const acc_t p_exp = vexp<acc_t>(s - logit_max);
        logit_sum += partner ? p_exp : acc_t(0);
        emph_sum += partner ? r_exp : acc_t(0);
        pos_logit += positive ? r_exp * s : acc_t(0);
        pos_weight += positive ? r_exp : acc_t(0);
        pos_count += positive ? acc_t(1) : acc_t(0);
      }
      // Rescale the running sums to the new maxima (exp(-inf) = 0 on the first tile).
      const acc_t logit_scale = std::exp(state[kLogitMax * kRowTile] - logit_max);
      const acc_t emph_scale = std::exp(state[kEmphMax * kRowTile] - emph_max_new);
      state[kLogitMax * kRowTile] = logit_max;
      state[kEmphMax * kRowTile] = emph_max_new;
      state[kLogitSum * kRowTile] = state[kLogitSum * kRowTile] * logit_scale + logit_sum;
      state[kEmphSum * kRowTile] = state[kEmphSum * kRowTile] * emph_scale + emph_sum;
      state[kPosLogit * kRowTile] = state[kPosLogit * kRowTile] * emph_scale + pos_logit;
      state[kPosWeight * kRowTile] = state[kPosWeight * kRowTile] * emph_scale + pos_weight;
      state[kPosCount * kRowTile] += pos_count;
    }
  }
};

// ---------------------------------------------------------------- backward tile
template <typename acc_t>
struct BackwardTileArgs {
  acc_t* tile;              // (rows, cols): cosines in, H = gamma (G + G^T) out
  const int32_t* labels;    // (B,) dense class ids, sorted by group
  const acc_t* stats;       // (kNumStats, B)
  int64_t batch, rows, cols, first_row, first_col;
  acc_t gamma, partners, inv_partners;  // dLoss/dL_g / |I_g|, |I_g| - 1, 1 / (|I_g| - 1)
  Params<acc_t> params;
};

// dl_i/dc_ij for anchor i (its stats given) and partner j (cosine c, positive or not):
//   -(1 / (tau m_i)) (w_ij [j in P(i)] - W_i p_ij)          through the logits, and with
//   w_ij (q_ij - l_i / (|I_g| - 1)) dlogr_ij/dc_ij          through the weights (not detached),
// where p_ij = softmax of the logits, w_ij = (|I_g| - 1) softmax of log r, W_i = sum_P w_ij,
// q_ij = -[j in P(i)] (s_ij - LSE_i) / m_i and dlogr/dc = -(c - eta) / eta^2.
template <typename acc_t, bool kDetach>
PIUMR_ALWAYS_INLINE acc_t anchor_cosine_grad(acc_t c, acc_t s, acc_t log_r, bool positive, acc_t logit_lse,
                                             acc_t emphasis_lse, acc_t positive_weight, acc_t anchor_loss,
                                             acc_t inv_m, acc_t partners, acc_t inv_partners,
                                             const Params<acc_t>& p) {
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
struct BackwardTileKernel {
  static PIUMR_ALWAYS_INLINE void run(const BackwardTileArgs<acc_t>& a) {
    const Params<acc_t>& p = a.params;
    const int64_t B = a.batch;
    const int32_t* col_labels = a.labels + a.first_col;
    const int32_t cols = static_cast<int32_t>(a.cols);
    const acc_t* col_lse = a.stats + kLogitLse * B + a.first_col;
    const acc_t* col_emph = a.stats + kEmphasisLse * B + a.first_col;
    const acc_t* col_wpos = a.stats + kPositiveWeight * B + a.first_col;
    const acc_t* col_loss = a.stats + kAnchorLoss * B + a.first_col;
    const acc_t* col_npos = a.stats + kNumPositive * B + a.first_col;
    for (int64_t r = 0; r < a.rows; ++r) {
      const int64_t i = a.first_row + r;
      const int32_t self = static_cast<int32_t>(i - a.first_col);
      acc_t* h = a.tile + r * a.cols;
      const int32_t label = a.labels[i];
      const acc_t lse_i = a.stats[kLogitLse * B + i], emph_i = a.stats[kEmphasisLse * B + i];
      const acc_t wpos_i = a.stats[kPositiveWeight * B + i], loss_i = a.stats[kAnchorLoss * B + i];
      const acc_t inv_m_i = acc_t(1) / std::max(a.stats[kNumPositive * B + i], acc_t(1));
#pragma omp simd
      for (int32_t j = 0; j < cols; ++j) {
        const acc_t c = h[j];
        const acc_t s = c * p.inv_tau;
        const acc_t log_r = log_emphasis(c, p);
        const bool positive = col_labels[j] == label;
        const acc_t inv_m_j = acc_t(1) / max_of(col_npos[j], acc_t(1));
        const acc_t g_ij = anchor_cosine_grad<acc_t, kDetach>(c, s, log_r, positive, lse_i, emph_i, wpos_i, loss_i,
                                                              inv_m_i, a.partners, a.inv_partners, p);
        const acc_t g_ji = anchor_cosine_grad<acc_t, kDetach>(c, s, log_r, positive, col_lse[j], col_emph[j],
                                                              col_wpos[j], col_loss[j], inv_m_j, a.partners,
                                                              a.inv_partners, p);
        const acc_t value = a.gamma * (g_ij + g_ji);
        h[j] = j != self ? value : acc_t(0);
      }
    }
  }
};

// ---------------------------------------------------------------- normalization backward
template <typename scalar_t, typename acc_t>
struct InputGradArgs {
  const acc_t* f;           // (rows, C) normalized rows
  const acc_t* grad_f;      // (rows, C)
  const acc_t* norm;        // (rows,)
  scalar_t* grad_z;         // (rows, C)
  int64_t rows, width;
};

// f = z / max(||z||, eps): dz = (df - f (f . df)) / ||z|| when ||z|| >= eps, else df / eps.
template <typename scalar_t, typename acc_t>
struct InputGradKernel {
  static PIUMR_ALWAYS_INLINE void run(const InputGradArgs<scalar_t, acc_t>& a) {
    for (int64_t i = 0; i < a.rows; ++i) {
      const acc_t* fi = a.f + i * a.width;
      const acc_t* gi = a.grad_f + i * a.width;
      scalar_t* out = a.grad_z + i * a.width;
      const acc_t norm = a.norm[i];
      const acc_t inv = acc_t(1) / std::max(norm, acc_t(kNormEps));
      acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t k = 0; k < a.width; ++k) dot += fi[k] * gi[k];
      if (norm < acc_t(kNormEps)) dot = 0;
#pragma omp simd
      for (int64_t k = 0; k < a.width; ++k) out[k] = static_cast<scalar_t>(inv * (gi[k] - fi[k] * dot));
    }
  }
};

// ---------------------------------------------------------------- drivers
struct WorkItem {
  int64_t group, start, size, first_row, rows;  // rows first_row.. of the group at start..start+size
};

// Items per task so that each task has about kMinTaskWork multiply-adds (pairs x width).
int64_t item_grain(const std::vector<WorkItem>& items, int64_t width) {
  if (items.empty()) return 1;
  int64_t work = 0;
  for (const WorkItem& it : items) work += it.rows * it.size * (width + 32);
  const int64_t per_item = std::max<int64_t>(1, work / static_cast<int64_t>(items.size()));
  return std::max<int64_t>(1, kMinTaskWork / per_item);
}

std::vector<WorkItem> work_items(const int64_t* offsets, int64_t num_groups) {
  std::vector<WorkItem> items;
  for (int64_t g = 0; g < num_groups; ++g) {
    const int64_t start = offsets[g], size = offsets[g + 1] - start;
    for (int64_t r0 = 0; r0 < size; r0 += kRowTile)
      items.push_back({g, start, size, start + r0, std::min(kRowTile, size - r0)});
  }
  return items;
}

// Class ids renumbered 0..K-1 as int32, so the label tests in the float loops use 32-bit
// lanes like the values (mixed 64/32-bit masks keep GCC from vectorizing them).
at::Tensor dense_labels(const at::Tensor& labels) {
  return std::get<1>(at::_unique(labels, /*sorted=*/false, /*return_inverse=*/true)).to(at::kInt).contiguous();
}

// A (rows x cols) view of a flat scratch buffer, for at::mm_out.
at::Tensor tile_view(const at::Tensor& scratch, int64_t rows, int64_t cols) {
  return scratch.narrow(0, 0, rows * cols).view({rows, cols});
}

template <typename scalar_t>
void forward_impl(const at::Tensor& features, const at::Tensor& labels, const at::Tensor& offsets, double tau,
                  double eta, at::Tensor& risks, at::Tensor& stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = features.size(0), width = features.size(1);
  const auto acc_opts = features.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor f = at::empty({B, width}, acc_opts);
  acc_t* st = stats.data_ptr<acc_t>();
  normalize_rows<scalar_t, acc_t>(features, f, st + kNorm * B);
  const Params<acc_t> params{acc_t(1 / tau), acc_t(eta), acc_t(1 / eta)};
  const at::Tensor label_ids = dense_labels(labels);
  const int32_t* label_ptr = label_ids.data_ptr<int32_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t num_groups = offsets.size(0) - 1;
  const std::vector<WorkItem> items = work_items(off, num_groups);
  const int64_t grain = item_grain(items, width);
  at::parallel_for(0, static_cast<int64_t>(items.size()), grain, [&](int64_t begin, int64_t end) {
    at::Tensor scratch = at::empty({kRowTile * kColTile}, acc_opts);
    std::vector<acc_t> online(kNumOnline * kRowTile);
    for (int64_t w = begin; w < end; ++w) {
      const WorkItem& it = items[w];
      std::fill(online.begin(), online.end(), acc_t(0));
      std::fill_n(online.data() + kLogitMax * kRowTile, kRowTile, -std::numeric_limits<acc_t>::infinity());
      std::fill_n(online.data() + kEmphMax * kRowTile, kRowTile, -std::numeric_limits<acc_t>::infinity());
      const at::Tensor f_rows = f.narrow(0, it.first_row, it.rows);
      for (int64_t c0 = 0; c0 < it.size; c0 += kColTile) {
        const int64_t cols = std::min(kColTile, it.size - c0);
        at::Tensor tile = tile_view(scratch, it.rows, cols);
        at::mm_out(tile, f_rows, f.narrow(0, it.start + c0, cols).t());
        run_for_this_cpu<ForwardTileKernel<acc_t>>(ForwardTileArgs<acc_t>{
            tile.data_ptr<acc_t>(), label_ptr, online.data(), it.rows, cols, it.first_row, it.start + c0, params});
      }
      // l_i = -(|I_g| - 1) / sum_k r_ik * (sum_P r_ij s_ij - LSE_i sum_P r_ij) / max(|P(i)|, 1).
      const acc_t partners = acc_t(it.size - 1);
      for (int64_t r = 0; r < it.rows; ++r) {
        const acc_t* state = online.data() + r;
        const int64_t i = it.first_row + r;
        const acc_t logit_lse = state[kLogitMax * kRowTile] + std::log(state[kLogitSum * kRowTile]);
        const acc_t emph_sum = state[kEmphSum * kRowTile];
        const acc_t num_pos = state[kPosCount * kRowTile];
        st[kLogitLse * B + i] = logit_lse;
        st[kEmphasisLse * B + i] = state[kEmphMax * kRowTile] + std::log(emph_sum);
        st[kPositiveWeight * B + i] = partners * state[kPosWeight * kRowTile] / emph_sum;
        st[kAnchorLoss * B + i] = -partners / emph_sum *
                                  (state[kPosLogit * kRowTile] - logit_lse * state[kPosWeight * kRowTile]) /
                                  std::max(num_pos, acc_t(1));
        st[kNumPositive * B + i] = num_pos;
      }
    }
  });
  acc_t* risk_ptr = risks.data_ptr<acc_t>();
  for (int64_t g = 0; g < num_groups; ++g) {
    acc_t total = 0;
    for (int64_t i = off[g]; i < off[g + 1]; ++i) total += st[kAnchorLoss * B + i];
    risk_ptr[g] = total / acc_t(off[g + 1] - off[g]);
  }
}

template <typename scalar_t, bool kDetach>
void backward_impl(const at::Tensor& grad_risks, const at::Tensor& features, const at::Tensor& labels,
                   const at::Tensor& offsets, const at::Tensor& stats, double tau, double eta,
                   at::Tensor& grad_features) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = features.size(0), width = features.size(1);
  const auto acc_opts = features.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor f = at::empty({B, width}, acc_opts);
  at::Tensor norm = at::empty({B}, acc_opts);
  normalize_rows<scalar_t, acc_t>(features, f, norm.data_ptr<acc_t>());
  const Params<acc_t> params{acc_t(1 / tau), acc_t(eta), acc_t(1 / eta)};
  const at::Tensor label_ids = dense_labels(labels);
  const int32_t* label_ptr = label_ids.data_ptr<int32_t>();
  const acc_t* st = stats.data_ptr<acc_t>();
  const acc_t* grad_risk_ptr = grad_risks.data_ptr<acc_t>();
  const acc_t* f_ptr = f.data_ptr<acc_t>();
  const acc_t* norm_ptr = norm.data_ptr<acc_t>();
  scalar_t* out = grad_features.data_ptr<scalar_t>();
  const std::vector<WorkItem> items = work_items(offsets.data_ptr<int64_t>(), offsets.size(0) - 1);
  const int64_t grain = item_grain(items, width);
  at::parallel_for(0, static_cast<int64_t>(items.size()), grain, [&](int64_t begin, int64_t end) {
    at::Tensor scratch = at::empty({kRowTile * kColTile}, acc_opts);
    at::Tensor grad_rows_buffer = at::empty({kRowTile * width}, acc_opts);
    for (int64_t w = begin; w < end; ++w) {
      const WorkItem& it = items[w];
      const acc_t partners = acc_t(it.size - 1);
      const acc_t gamma = grad_risk_ptr[it.group] / acc_t(it.size);
      const at::Tensor f_rows = f.narrow(0, it.first_row, it.rows);
      at::Tensor grad_rows = tile_view(grad_rows_buffer, it.rows, width);
      grad_rows.zero_();
      for (int64_t c0 = 0; c0 < it.size; c0 += kColTile) {
        const int64_t cols = std::min(kColTile, it.size - c0);
        const at::Tensor f_cols = f.narrow(0, it.start + c0, cols);
        at::Tensor tile = tile_view(scratch, it.rows, cols);
        at::mm_out(tile, f_rows, f_cols.t());
        run_for_this_cpu<BackwardTileKernel<acc_t, kDetach>>(BackwardTileArgs<acc_t>{
            tile.data_ptr<acc_t>(), label_ptr, st, B, it.rows, cols, it.first_row, it.start + c0, gamma, partners,
            acc_t(1) / partners, params});
        grad_rows.addmm_(tile, f_cols);
      }
      run_for_this_cpu<InputGradKernel<scalar_t, acc_t>>(InputGradArgs<scalar_t, acc_t>{
          f_ptr + it.first_row * width, grad_rows.data_ptr<acc_t>(), norm_ptr + it.first_row,
          out + it.first_row * width, it.rows, width});
    }
  });
}

// ---------------------------------------------------------------- op entry points
at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Returns the number of groups.
int64_t check_inputs(const at::Tensor& features, const at::Tensor& labels, const at::Tensor& offsets, double tau,
                     double eta) {
  TORCH_CHECK(features.device().is_cpu() && labels.device().is_cpu() && offsets.device().is_cpu(),
              "girl_cpp: features, labels and offsets must be CPU tensors");
  TORCH_CHECK(features.dim() == 2 && features.is_contiguous() && at::isFloatingType(features.scalar_type()),
              "girl_cpp: features must be a contiguous floating (B, C) tensor, got ", features.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == features.size(0) && labels.scalar_type() == at::kLong &&
                  labels.is_contiguous(),
              "girl_cpp: labels must be a contiguous int64 (B,) tensor");
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 2 && offsets.scalar_type() == at::kLong &&
                  offsets.is_contiguous(),
              "girl_cpp: offsets must be a contiguous int64 (G + 1,) tensor");
  TORCH_CHECK(tau > 0 && eta > 0, "girl_cpp: tau and eta must be > 0, got ", tau, " and ", eta);
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t count = offsets.size(0) - 1;
  TORCH_CHECK(off[0] == 0 && off[count] == features.size(0), "girl_cpp: offsets must run from 0 to B");
  for (int64_t g = 0; g < count; ++g)
    TORCH_CHECK(off[g + 1] - off[g] >= 2, "girl_cpp: every group needs at least 2 members, group ", g, " has ",
                off[g + 1] - off[g]);
  return count;
}

std::tuple<at::Tensor, at::Tensor> girl_forward(const at::Tensor& features, const at::Tensor& labels,
                                                const at::Tensor& offsets, double tau, double eta,
                                                bool /*detach_weights: the forward is the same*/) {
  const int64_t num_groups = check_inputs(features, labels, offsets, tau, eta);
  const auto opts = features.options().dtype(acc_type(features.scalar_type()));
  at::Tensor risks = at::empty({num_groups}, opts);
  at::Tensor stats = at::empty({kNumStats, features.size(0)}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "girl_cpp", [&] {
    forward_impl<scalar_t>(features, labels, offsets, tau, eta, risks, stats);
  });
  return {risks, stats};
}

at::Tensor girl_backward(const at::Tensor& grad_risks, const at::Tensor& features, const at::Tensor& labels,
                         const at::Tensor& offsets, const at::Tensor& stats, double tau, double eta,
                         bool detach_weights) {
  const int64_t num_groups = check_inputs(features, labels, offsets, tau, eta);
  const auto acc = acc_type(features.scalar_type());
  TORCH_CHECK(grad_risks.dim() == 1 && grad_risks.size(0) == num_groups && grad_risks.scalar_type() == acc &&
                  grad_risks.is_contiguous(),
              "girl_cpp_backward: grad_risks must be a contiguous (G,) tensor of ", acc);
  TORCH_CHECK(stats.scalar_type() == acc && stats.is_contiguous() &&
                  stats.sizes() == at::IntArrayRef({kNumStats, features.size(0)}),
              "girl_cpp_backward: stats must be the contiguous (6, B) tensor of the forward");
  at::Tensor grad_features = at::empty_like(features);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "girl_cpp_backward", [&] {
    if (detach_weights) {
      backward_impl<scalar_t, true>(grad_risks, features, labels, offsets, stats, tau, eta, grad_features);
    } else {
      backward_impl<scalar_t, false>(grad_risks, features, labels, offsets, stats, tau, eta, grad_features);
    }
  });
  return grad_features;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(piumr_kernels, m) {
  m.def("girl_cpp(Tensor features, Tensor labels, Tensor offsets, float tau, float eta, bool detach_weights)"
        " -> (Tensor, Tensor)");
  m.def("girl_cpp_backward(Tensor grad_risks, Tensor features, Tensor labels, Tensor offsets, Tensor stats,"
        " float tau, float eta, bool detach_weights) -> Tensor");
}

TORCH_LIBRARY_IMPL(piumr_kernels, CPU, m) {
  m.impl("girl_cpp", &girl_forward);
  m.impl("girl_cpp_backward", &girl_backward);
}

}  // namespace piumr
