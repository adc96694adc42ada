// Fused Sinkhorn–Knopp on the CPU (SPEC §1): forward and backward, both domains.
//
// Layout: a block of L matrices is copied once into a float/double scratch tile in "lanes"
// order, x[(i * M + j) * L + l] for matrix l. Small matrices use L = 16 so every row and
// column step is element-wise across 16 matrices (full SIMD width even for 4x4); large
// matrices use L = 1 and vectorize along the contiguous rows. Blocks are spread over
// threads with at::parallel_for; each thread allocates its scratch once.
//
// A lanes tile sits in L1, and there the linear-domain iterations scale it in place, two
// passes per iteration (one for full float blocks of compile-time shape on AVX-512, see
// linear_forward_tile). Large matrices stream from L2, so there the pass count decides: the
// linear forward reads float/double matrices in place as diag(u) K diag(v), one read-only
// pass per iteration, and the linear backward does both steps of an iteration in one pass,
// eight rows at a time.
//
// What the backward needs per matrix and iteration: linear domain, the row scales
// alpha_t = row_sum / (rowsum_t + eps) and column scales beta_t; log domain, the
// cumulative potentials f_t, g_t with L_t = K + f_t + g_t. The backward rebuilds every
// intermediate matrix from K and these vectors instead of storing 2 * n_iters matrices.
// The forward stores the vectors when asked (save_stats); when they would outweigh the
// matrix (tiny matrices, many iterations) the backward replays the forward in cache instead.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>

#include "accumulation.h"
#include "cpu_dispatch.h"
#include "vec_math.h"

namespace piumr {
namespace {

// Matrices with at most this many entries go through the 16-lane path.
constexpr int64_t kLanesMaxEntries = 1024;
constexpr int kLanes = 16;
constexpr int64_t kMaxIters = 10000;

struct Problem {
  int64_t batch, n_rows, n_cols, n_iters;
  double eps, row_sum, col_sum;
  bool log_domain;
  bool has_stats;  // forward: store the per-iteration vectors; backward: they were stored
};

template <typename scalar_t, typename acc_t>
struct BlockArgs {
  const Problem* problem;
  const scalar_t* K;     // first matrix of the block, (count, N, M) contiguous
  const scalar_t* grad;  // backward only: upstream gradient, same layout as K
  scalar_t* out;         // P (forward) or grad_K (backward)
  acc_t* row_stats;      // (n_iters, N, stride) from the block's first matrix
  acc_t* col_stats;      // (n_iters, M, stride), likewise
  int64_t stats_stride;  // batch (the stats tensors) or kLanes (a plain-rows block's staging)
  int64_t count;         // matrices in this block, <= L
  acc_t* scratch;        // Scratch<acc_t, L>::size(problem, Kernel::needs_tiles(problem)) values
  bool wide_registers;   // running the AVX-512 variant (32 vector registers of 64 bytes)
};

// Per-block scratch: per iteration, the row and column vectors (alpha_t / f_t, beta_t /
// g_t) and their running products (linear backward); four work vectors, each long enough
// for a row or a column vector; then two matrix tiles, left out (with_tiles = false) when
// the kernel works on the tensors directly, so big matrices need no big scratch.
template <typename acc_t, int L>
struct Scratch {
  // Gap between the two tiles: 16 KiB tiles (16x16 floats in 16 lanes) would otherwise sit
  // a multiple of 4 KiB apart, where loads from one can falsely wait on stores to the other
  // (4K aliasing). A precaution: on this project's VM the effect is below the timing noise.
  static constexpr int64_t kTileSkew = 3 * 64 / sizeof(acc_t);
  acc_t *rt, *ct, *cu, *cv, *row, *col, *tmp, *aux, *x, *gr;
  static int64_t vector_len(const Problem& p) { return std::max(p.n_rows, p.n_cols) * L; }
  static int64_t size(const Problem& p, bool with_tiles) {
    const int64_t n = p.n_rows, m = p.n_cols;
    return L * 2 * p.n_iters * (n + m) + 4 * vector_len(p) + (with_tiles ? 2 * n * m * L + kTileSkew : 0);
  }
  PIUMR_ALWAYS_INLINE Scratch(acc_t* base, const Problem& p) {
    const int64_t n = p.n_rows, m = p.n_cols, t = p.n_iters, len = vector_len(p);
    rt = base;
    ct = rt + t * n * L;
    cu = ct + t * m * L;
    cv = cu + t * n * L;
    row = cv + t * m * L;
    col = row + len;
    tmp = col + len;
    aux = tmp + len;
    x = aux + len;
    gr = x + n * m * L + kTileSkew;
  }
};

// Lanes <-> matrices: 16 x 16 float transposes in registers (GCC/Clang vector extensions,
// one two-source permute per shuffle on AVX-512) instead of 256 strided scalar moves.
using Vec16f = Vec64<float>::type;

// Exchanges bit kBit of the row index with bit kBit of the column index between rows a
// (bit clear) and b (bit set); doing it for bits 0..3 transposes a 16 x 16 tile.
template <int kBit, int... J>
PIUMR_ALWAYS_INLINE void swap_index_bit(Vec16f& a, Vec16f& b, std::integer_sequence<int, J...>) {
  const Vec16f low = __builtin_shufflevector(a, b, (((J >> kBit) & 1) ? 16 + (J ^ (1 << kBit)) : J)...);
  const Vec16f high = __builtin_shufflevector(a, b, (((J >> kBit) & 1) ? 16 + J : (J ^ (1 << kBit)))...);
  a = low;
  b = high;
}

template <int kBit>
PIUMR_ALWAYS_INLINE void transpose_stage(Vec16f (&rows)[16]) {
  for (int i = 0; i < 16; ++i) {
    if (!((i >> kBit) & 1)) swap_index_bit<kBit>(rows[i], rows[i | (1 << kBit)], std::make_integer_sequence<int, 16>{});
  }
}

PIUMR_ALWAYS_INLINE void transpose16(Vec16f (&rows)[16]) {
  transpose_stage<0>(rows);
  transpose_stage<1>(rows);
  transpose_stage<2>(rows);
  transpose_stage<3>(rows);
}

// Chunk `first / 16` of 16 float matrices nm entries apart, into lanes order through the
// register transpose: v[e] holds entry first + e of every matrix.
PIUMR_ALWAYS_INLINE void load_chunk(const float* src, int64_t nm, int64_t first, Vec16f (&v)[16]) {
  for (int l = 0; l < 16; ++l) std::memcpy(&v[l], src + l * nm + first, sizeof(v[l]));
  transpose16(v);
}

// The inverse: lanes-order v (transposed in place) to entries first.. of 16 matrices.
PIUMR_ALWAYS_INLINE void store_chunk(Vec16f (&v)[16], float* dst, int64_t nm, int64_t first) {
  transpose16(v);
  for (int l = 0; l < 16; ++l) std::memcpy(dst + l * nm + first, &v[l], sizeof(v[l]));
}

// Whether a block takes the register-transpose path: float, full 16-lane block; entries
// past the last multiple of 16 go through the scalar loops.
template <typename scalar_t, typename acc_t, int L>
constexpr bool kTransposeInRegisters = std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float> && L == 16;

// Whether blocks of this kernel can go through the chunked tile passes (linear_forward_tile
// and the backward's transposing first and last steps): float lanes blocks of compile-time
// shape whose 16-entry chunks hold whole rows. They run for full blocks on AVX-512 only.
template <typename scalar_t, typename acc_t, int L, int kM>
constexpr bool kChunkedTile = kTransposeInRegisters<scalar_t, acc_t, L> && kM > 0 && 16 % (kM > 0 ? kM : 1) == 0;

template <typename scalar_t, typename acc_t, int L>
PIUMR_ALWAYS_INLINE void load_lanes(const scalar_t* src, acc_t* dst, int64_t count, int64_t nm, acc_t fill) {
  // A partial block fills its unused lanes first, with whole-vector stores (lane by lane,
  // the strided scalar stores cost more than the block's math).
  if (count < L) std::fill(dst, dst + nm * L, fill);
  int64_t done = 0;
  if constexpr (kTransposeInRegisters<scalar_t, acc_t, L>) {
    if (count == L) {
      for (; done + 16 <= nm; done += 16) {
        Vec16f rows[16];
        load_chunk(src, nm, done, rows);
        for (int e = 0; e < 16; ++e) std::memcpy(dst + (done + e) * L, &rows[e], sizeof(Vec16f));
      }
    }
  }
  for (int64_t l = 0; l < count; ++l) {
    const scalar_t* s = src + l * nm;
    for (int64_t e = done; e < nm; ++e) dst[e * L + l] = static_cast<acc_t>(s[e]);
  }
}

template <typename scalar_t, typename acc_t, int L>
PIUMR_ALWAYS_INLINE void store_lanes(const acc_t* src, scalar_t* dst, int64_t count, int64_t nm) {
  int64_t done = 0;
  if constexpr (kTransposeInRegisters<scalar_t, acc_t, L>) {
    if (count == L) {
      for (; done + 16 <= nm; done += 16) {
        Vec16f rows[16];
        for (int e = 0; e < 16; ++e) std::memcpy(&rows[e], src + (done + e) * L, sizeof(Vec16f));
        store_chunk(rows, dst, nm, done);
      }
    }
  }
  for (int64_t l = 0; l < count; ++l) {
    scalar_t* d = dst + l * nm;
    for (int64_t e = done; e < nm; ++e) d[e] = static_cast<scalar_t>(src[e * L + l]);
  }
}

// Stats are batch-last, stats[(t * len + k) * batch + matrix], so the 16 lanes of a block
// store and load them as one contiguous run; the tile keeps them as v[k * L + l]. `stride`
// is the distance between a matrix's consecutive values: batch, or kLanes when staged.
// A full lanes block copies with a compile-time size (inlined vector moves); a variable-size
// memcpy is a library call per row, which at 16x16 cost more than the copies themselves.
// A plain-rows block (L == 1) is one matrix: a strided copy of single values, out of line
// and not vectorized (a memcpy call per value was a tenth of a 32x128x128 forward and
// backward; vectorized, the strided side becomes AVX-512 scatters or gathers, slow on AMD).
// Its stride is kLanes: run_blocks stages plain-rows stats in lanes order.
template <typename acc_t>
__attribute__((noinline, optimize("no-tree-vectorize"))) void copy_strided(const acc_t* src, int64_t src_stride,
                                                                           acc_t* dst, int64_t dst_stride, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k * dst_stride] = src[k * src_stride];
}

template <typename acc_t, int L>
PIUMR_ALWAYS_INLINE void store_stats(const acc_t* v, acc_t* stats, int64_t count, int64_t stride, int64_t rows) {
  if constexpr (L == 1) {
    copy_strided(v, 1, stats, stride, rows);
  } else if (count == L) {
    for (int64_t k = 0; k < rows; ++k) std::memcpy(stats + k * stride, v + k * L, L * sizeof(acc_t));
  } else {
    for (int64_t k = 0; k < rows; ++k) std::memcpy(stats + k * stride, v + k * L, count * sizeof(acc_t));
  }
}

template <typename acc_t, int L>
PIUMR_ALWAYS_INLINE void load_stats(const acc_t* stats, acc_t* v, int64_t count, int64_t stride, int64_t rows) {
  if constexpr (L == 1) {
    copy_strided(stats, stride, v, 1, rows);
  } else if (count == L) {
    for (int64_t k = 0; k < rows; ++k) std::memcpy(v + k * L, stats + k * stride, L * sizeof(acc_t));
  } else {
    std::fill(v, v + rows * L, acc_t(0));
    for (int64_t k = 0; k < rows; ++k) std::memcpy(v + k * L, stats + k * stride, count * sizeof(acc_t));
  }
}

// Calls f(e, r, c) for every entry of an n x m tile: e = (i * m + j) * L + l is the entry,
// r = i * L + l its row-vector index, c = j * L + l its column-vector index. The SIMD loop
// runs along the lanes (L > 1) or along the contiguous row (L == 1).
template <int L, typename F>
PIUMR_ALWAYS_INLINE void for_each_entry(int64_t n, int64_t m, F&& f) {
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (L == 1) {
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) f(i * m + j, i, j);
    } else {
      for (int64_t j = 0; j < m; ++j) {
#pragma omp simd
        for (int l = 0; l < L; ++l) f((i * m + j) * L + l, i * L + l, j * L + l);
      }
    }
  }
}

// Reductions keep kChains independent accumulators: one add chain would wait on the add
// latency (4 cycles) at every step instead of issuing back to back.
constexpr int kChains = 4;

// The row-by-row passes take kRowGroup rows at a time: along contiguous rows (L == 1) their
// reductions are independent chains, so one row's horizontal sum overlaps the next rows',
// and the column sums they feed are loaded and stored once per group.
constexpr int64_t kRowGroup = 8;

// Lane o of the vector that packs, for x's and then y's rows (kRows per vector, kLanes
// lanes each), half h of each row's lanes: rows keep their order, lanes halve.
constexpr int packed_lane(int o, int rows, int lanes, int width, int h) {
  const int row = o / (lanes / 2);
  return (row < rows ? 0 : width) + (row % rows) * lanes + h * (lanes / 2) + o % (lanes / 2);
}

template <int kRows, int kLanes, typename V, int... O>
PIUMR_ALWAYS_INLINE void add_halves(const V& x, const V& y, V& out, std::integer_sequence<int, O...>) {
  constexpr int kWidth = sizeof...(O);
  out = __builtin_shufflevector(x, y, packed_lane(O, kRows, kLanes, kWidth, 0)...) +
        __builtin_shufflevector(x, y, packed_lane(O, kRows, kLanes, kWidth, 1)...);
}

// sums[r] = the sum of partial[r]'s lanes for 8 rows of one 64-byte vector each, as a
// shuffle-and-add tree (each level packs twice the rows into a vector with half the lanes
// each): 15 shuffles and 8 adds instead of 8 lane-by-lane reductions, which cost more than
// the row sums themselves at 128 columns.
template <typename acc_t>
PIUMR_ALWAYS_INLINE void sum_lanes_of_8_rows(const acc_t (&partial)[8][64 / sizeof(acc_t)], acc_t* sums) {
  using V = typename Vec64<acc_t>::type;
  constexpr int kWidth = 64 / sizeof(acc_t);
  constexpr auto lanes = std::make_integer_sequence<int, kWidth>{};
  V v[8];
  for (int r = 0; r < 8; ++r) std::memcpy(&v[r], partial[r], sizeof(V));
  for (int i = 0; i < 4; ++i) add_halves<1, kWidth>(v[2 * i], v[2 * i + 1], v[i], lanes);
  for (int i = 0; i < 2; ++i) add_halves<2, kWidth / 2>(v[2 * i], v[2 * i + 1], v[i], lanes);
  add_halves<4, kWidth / 4>(v[0], v[1], v[0], lanes);
  if constexpr (kWidth == 16) add_halves<8, 2>(v[0], v[0], v[0], lanes);
  std::memcpy(sums, &v[0], 8 * sizeof(acc_t));
}

// out[i] = sum_j term(e, i, j) for the kRows rows from i0, with kRowChains vectors of
// partial sums per row.
template <int kRows, int kRowChains, typename acc_t, typename F>
PIUMR_ALWAYS_INLINE void reduce_row_group(int64_t i0, int64_t m, acc_t* out, F&& term) {
  constexpr int64_t kWidth = kRowChains * 64 / sizeof(acc_t);
  const int64_t full = m - m % kWidth;
  acc_t partial[kRows][kWidth] = {};
  // Rows written out (a fold, not a loop) so every partial sum has a fixed register.
  const auto add_row = [&](int r, int64_t j) PIUMR_ALWAYS_INLINE_LAMBDA {
    const int64_t i = i0 + r;
#pragma omp simd
    for (int64_t k = 0; k < kWidth; ++k) partial[r][k] += term(i * m + j + k, i, j + k);
  };
  [&]<int... R>(std::integer_sequence<int, R...>) PIUMR_ALWAYS_INLINE_LAMBDA {
    for (int64_t j = 0; j < full; j += kWidth) (add_row(R, j), ...);
  }(std::make_integer_sequence<int, kRows>{});
  acc_t sums[kRows];
  if constexpr (kRows == 8 && kRowChains == 1) {
    sum_lanes_of_8_rows<acc_t>(partial, sums);
  } else {
    for (int r = 0; r < kRows; ++r) {
      acc_t s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < kWidth; ++k) s += partial[r][k];
      sums[r] = s;
    }
  }
  for (int r = 0; r < kRows; ++r) {
    const int64_t i = i0 + r;
    acc_t s = sums[r];
    for (int64_t j = full; j < m; ++j) s += term(i * m + j, i, j);
    out[i] = s;
  }
}

// out[i, l] = sum_j term(e, r, c) over the row's entries.
template <typename acc_t, int L, typename F>
PIUMR_ALWAYS_INLINE void reduce_rows(int64_t n, int64_t m, acc_t* out, F&& term) {
  if constexpr (L == 1) {
    const int64_t grouped = n - n % kRowGroup;
    for (int64_t i = 0; i < grouped; i += kRowGroup) reduce_row_group<kRowGroup, 1>(i, m, out, term);
    for (int64_t i = grouped; i < n; ++i) reduce_row_group<1, kChains>(i, m, out, term);
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    // The remainder's start is computed, not carried out of the main loop, so with a
    // compile-time m the empty remainder folds away.
    const int64_t full = m - m % kChains;
    acc_t s[kChains][L] = {};
    for (int64_t j = 0; j < full; j += kChains) {
      for (int u = 0; u < kChains; ++u) {
#pragma omp simd
        for (int l = 0; l < L; ++l) s[u][l] += term((i * m + j + u) * L + l, i * L + l, (j + u) * L + l);
      }
    }
    for (int64_t j = full; j < m; ++j) {
#pragma omp simd
      for (int l = 0; l < L; ++l) s[0][l] += term((i * m + j) * L + l, i * L + l, j * L + l);
    }
#pragma omp simd
    for (int l = 0; l < L; ++l) out[i * L + l] = (s[0][l] + s[1][l]) + (s[2][l] + s[3][l]);
  }
}

// out[c] += sum_i term(e, r, c) over the column's entries (c = j * L + l). Along contiguous
// rows (L == 1) kRowGroup rows are added per load and store of out (the columns are
// independent chains already); with lanes each column's sums stay in registers, with
// kChains independent chains.
template <typename acc_t, int L, typename F>
PIUMR_ALWAYS_INLINE void accumulate_cols(int64_t n, int64_t m, acc_t* out, F&& term) {
  if constexpr (L == 1) {
    const int64_t grouped = n - n % kRowGroup;
    for (int64_t i0 = 0; i0 < grouped; i0 += kRowGroup) {
      // The group's rows are written out (a fold, not a loop) so the loop over c
      // vectorizes whatever the size of term.
      [&]<int64_t... R>(std::integer_sequence<int64_t, R...>) PIUMR_ALWAYS_INLINE_LAMBDA {
#pragma omp simd
        for (int64_t c = 0; c < m; ++c) {
          acc_t s = out[c];
          ((s += term((i0 + R) * m + c, i0 + R, c)), ...);
          out[c] = s;
        }
      }(std::make_integer_sequence<int64_t, kRowGroup>{});
    }
    for (int64_t i = grouped; i < n; ++i) {
#pragma omp simd
      for (int64_t c = 0; c < m; ++c) out[c] += term(i * m + c, i, c);
    }
  } else {
    for (int64_t j = 0; j < m; ++j) {
      const int64_t full = n - n % kChains;
      acc_t s[kChains][L] = {};
      for (int64_t i = 0; i < full; i += kChains) {
        for (int u = 0; u < kChains; ++u) {
#pragma omp simd
          for (int l = 0; l < L; ++l) s[u][l] += term(((i + u) * m + j) * L + l, (i + u) * L + l, j * L + l);
        }
      }
      for (int64_t i = full; i < n; ++i) {
#pragma omp simd
        for (int l = 0; l < L; ++l) s[0][l] += term((i * m + j) * L + l, i * L + l, j * L + l);
      }
#pragma omp simd
      for (int l = 0; l < L; ++l) out[j * L + l] += (s[0][l] + s[1][l]) + (s[2][l] + s[3][l]);
    }
  }
}

// out[c] = sum_i term(e, r, c) over the column's entries.
template <typename acc_t, int L, typename F>
PIUMR_ALWAYS_INLINE void reduce_cols(int64_t n, int64_t m, acc_t* out, F&& term) {
  std::fill(out, out + m * L, acc_t(0));
  accumulate_cols<acc_t, L>(n, m, out, term);
}

// The scale target / (sum + eps) of a row or column, or 0 where the denominator is 0.
template <typename acc_t>
PIUMR_ALWAYS_INLINE acc_t safe_scale(acc_t sum, acc_t target, acc_t eps) {
  const acc_t d = sum + eps;
  return d > 0 ? target / (d > 0 ? d : acc_t(1)) : acc_t(0);
}

// v <- safe_scale(v) in place: sums to scales.
template <typename acc_t>
PIUMR_ALWAYS_INLINE void safe_scales(acc_t* v, int64_t len, acc_t target, acc_t eps) {
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) v[k] = safe_scale(v[k], target, eps);
}

// scale[k] = safe_scale(sum[k] * cumulative[k]) for a row or column of diag(u) K diag(v),
// whose sum is cumulative[k] times the sum of K weighted by the other side's scales;
// then cumulative[k] takes the new scale, except where the sum is 0: that row or column is
// zero for good, and leaving its scale alone keeps it finite (target / eps per iteration
// would overflow, and 0 * inf is NaN).
template <typename acc_t>
PIUMR_ALWAYS_INLINE void update_scales(acc_t* scale, acc_t* cumulative, const acc_t* sum, int64_t len, acc_t target,
                                       acc_t eps) {
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) {
    const acc_t total = sum[k] * cumulative[k];
    scale[k] = safe_scale(total, target, eps);
    cumulative[k] *= total != 0 ? scale[k] : acc_t(1);
  }
}

// out[i, l] = logsumexp_j x[i, j, l] (by max, then sum of exp).
template <typename acc_t, int L>
PIUMR_ALWAYS_INLINE void row_logsumexp(const acc_t* x, acc_t* out, acc_t* peak, int64_t n, int64_t m) {
  for (int64_t k = 0; k < n * L; ++k) peak[k] = -std::numeric_limits<acc_t>::infinity();
  for_each_entry<L>(n, m, [&](int64_t e, int64_t r, int64_t) { peak[r] = max_of(peak[r], x[e]); });
  reduce_rows<acc_t, L>(n, m, out, [&](int64_t e, int64_t r, int64_t) { return vexp<acc_t>(x[e] - peak[r]); });
#pragma omp simd
  for (int64_t k = 0; k < n * L; ++k) out[k] = peak[k] + vlog<acc_t>(out[k]);
}

template <typename acc_t, int L>
PIUMR_ALWAYS_INLINE void col_logsumexp(const acc_t* x, acc_t* out, acc_t* peak, int64_t n, int64_t m) {
  for (int64_t k = 0; k < m * L; ++k) peak[k] = -std::numeric_limits<acc_t>::infinity();
  for_each_entry<L>(n, m, [&](int64_t e, int64_t, int64_t c) { peak[c] = max_of(peak[c], x[e]); });
  reduce_cols<acc_t, L>(n, m, out, [&](int64_t e, int64_t, int64_t c) { return vexp<acc_t>(x[e] - peak[c]); });
#pragma omp simd
  for (int64_t k = 0; k < m * L; ++k) out[k] = peak[k] + vlog<acc_t>(out[k]);
}

// Log domain: the n_iters iterations on the tile x, in place. Writes each iteration's
// cumulative potentials f_t to rt[t] and g_t to ct[t]; `peak` is scratch for the maxima.
template <typename acc_t, int L>
PIUMR_ALWAYS_INLINE void log_iterations(const Problem& p, acc_t* x, acc_t* rt, acc_t* ct, acc_t* peak) {
  const int64_t n = p.n_rows, m = p.n_cols, nl = n * L, ml = m * L;
  const acc_t log_r = std::log(static_cast<acc_t>(p.row_sum));
  const acc_t log_c = std::log(static_cast<acc_t>(p.col_sum));
  for (int64_t t = 0; t < p.n_iters; ++t) {
    acc_t* f = rt + t * nl;
    acc_t* g = ct + t * ml;
    row_logsumexp<acc_t, L>(x, f, peak, n, m);
    for (int64_t k = 0; k < nl; ++k) f[k] = log_r - f[k];
    for_each_entry<L>(n, m, [&](int64_t e, int64_t r, int64_t) { x[e] += f[r]; });
    if (t > 0) {
      for (int64_t k = 0; k < nl; ++k) f[k] += f[k - nl];
    }
    col_logsumexp<acc_t, L>(x, g, peak, n, m);
    for (int64_t k = 0; k < ml; ++k) g[k] = log_c - g[k];
    for_each_entry<L>(n, m, [&](int64_t e, int64_t, int64_t c) { x[e] += g[c]; });
    if (t > 0) {
      for (int64_t k = 0; k < ml; ++k) g[k] += g[k - ml];
    }
  }
}

// Linear domain on a tile in L1 (lanes; also the backward's replay): the n_iters iterations
// on x in place, two passes per iteration, each scaling pass also summing what the next
// step needs (the row scale with the column sums, the column scale with the next row
// sums). Writes the scales alpha_t to rt[t] and beta_t to ct[t].
template <typename acc_t, int L>
PIUMR_ALWAYS_INLINE void linear_iterations_in_place(const Problem& p, acc_t* x, acc_t* rt, acc_t* ct) {
  const int64_t n = p.n_rows, m = p.n_cols, nl = n * L, ml = m * L;
  const acc_t eps = static_cast<acc_t>(p.eps);
  reduce_rows<acc_t, L>(n, m, rt, [&](int64_t e, int64_t, int64_t) { return x[e]; });
  for (int64_t t = 0; t < p.n_iters; ++t) {
    acc_t* alpha = rt + t * nl;
    acc_t* beta = ct + t * ml;
    safe_scales<acc_t>(alpha, nl, static_cast<acc_t>(p.row_sum), eps);
    reduce_cols<acc_t, L>(n, m, beta, [&](int64_t e, int64_t r, int64_t) {
      const acc_t scaled = x[e] * alpha[r];
      x[e] = scaled;
      return scaled;
    });
    safe_scales<acc_t>(beta, ml, static_cast<acc_t>(p.col_sum), eps);
    if (t + 1 < p.n_iters) {
      reduce_rows<acc_t, L>(n, m, alpha + nl, [&](int64_t e, int64_t, int64_t c) {
        const acc_t scaled = x[e] * beta[c];
        x[e] = scaled;
        return scaled;
      });
    } else {
      for_each_entry<L>(n, m, [&](int64_t e, int64_t, int64_t c) { x[e] *= beta[c]; });
    }
  }
}

// Linear domain on plain rows (L == 1, streamed from L2): the n_iters iterations with one
// read-only pass over x per iteration. The current matrix is diag(u) x diag(v), so row i's
// sum u_i (x v)_i gives its scale as soon as the row has been read, and the row, still in
// L1, then adds u_i x_i to the column sums. Writes the scales alpha_t to rt[t] and beta_t to
// ct[t]; leaves the cumulative scales in u (N) and v (M); col_sums is M-long scratch.
template <typename acc_t>
PIUMR_ALWAYS_INLINE void linear_iterations_read_only(const Problem& p, const acc_t* x, acc_t* rt, acc_t* ct, acc_t* u,
                                                     acc_t* v, acc_t* col_sums) {
  const int64_t n = p.n_rows, m = p.n_cols;
  const acc_t eps = static_cast<acc_t>(p.eps);
  std::fill(u, u + n, acc_t(1));
  std::fill(v, v + m, acc_t(1));
  for (int64_t t = 0; t < p.n_iters; ++t) {
    std::fill(col_sums, col_sums + m, acc_t(0));
    for (int64_t i0 = 0; i0 < n; i0 += kRowGroup) {
      const int64_t rows = std::min(kRowGroup, n - i0);
      const acc_t* x_g = x + i0 * m;
      acc_t* u_g = u + i0;
      acc_t weighted[kRowGroup];
      reduce_rows<acc_t, 1>(rows, m, weighted, [&](int64_t e, int64_t, int64_t c) { return x_g[e] * v[c]; });
      update_scales<acc_t>(rt + t * n + i0, u_g, weighted, rows, static_cast<acc_t>(p.row_sum), eps);
      accumulate_cols<acc_t, 1>(rows, m, col_sums, [&](int64_t e, int64_t r, int64_t) { return u_g[r] * x_g[e]; });
    }
    update_scales<acc_t>(ct + t * m, v, col_sums, m, static_cast<acc_t>(p.col_sum), eps);
  }
}

// sum = v[0] + ... + v[kCount - 1] as a balanced tree: a chain of adds would wait on the add
// latency at every step, and the row sums sit on the critical path of each row's scale.
template <int kCount>
PIUMR_ALWAYS_INLINE void tree_sum(const Vec16f* v, Vec16f& sum) {
  if constexpr (kCount == 1) {
    sum = v[0];
  } else {
    Vec16f low, high;
    tree_sum<kCount / 2>(v, low);
    tree_sum<kCount - kCount / 2>(v + kCount / 2, high);
    sum = low + high;
  }
}

// A full float lanes block of compile-time shape kN x kM, kM dividing 16, in the linear
// domain: one pass per iteration instead of two, the lanes transposes folded into the first
// and last. A pass takes 16 entries (16 / kM whole rows) at a time into registers, applies
// the previous column scales, sums each row, applies its scale and adds the result to the
// column sums, so an entry costs a load, a store and three vector ops. The first pass reads
// K through the transpose; the last column scaling is applied on the way out. Needs the 32
// 64-byte registers of AVX-512: with 16 narrower ones the row chunk and the column sums spill.
template <int kN, int kM>
PIUMR_ALWAYS_INLINE void linear_forward_tile(const Problem& p, const float* K, float* out, float* x, float* rt,
                                             float* ct) {
  static_assert(16 % kM == 0 && (kN * kM) % 16 == 0, "a chunk of 16 entries holds whole rows");
  constexpr int kRowsPerChunk = 16 / kM, kChunks = kN * kM / 16, nm = kN * kM;
  const Vec16f eps = Vec16f{} + static_cast<float>(p.eps);
  const Vec16f row_target = Vec16f{} + static_cast<float>(p.row_sum);
  const Vec16f col_target = Vec16f{} + static_cast<float>(p.col_sum);
  const auto store_scale = [&](const Vec16f& sum, const Vec16f& target, float* dst, Vec16f& scale)
                               PIUMR_ALWAYS_INLINE_LAMBDA {
                                 const Vec16f d = sum + eps;
                                 scale = d > 0 ? target / d : Vec16f{};
                                 std::memcpy(dst, &scale, sizeof(scale));
                               };
  // v[q] = x's entry chunk * 16 + q times its column's scale.
  const auto load_scaled = [&](const float* beta, int chunk, Vec16f(&v)[16]) PIUMR_ALWAYS_INLINE_LAMBDA {
    for (int q = 0; q < 16; ++q) {
      Vec16f b;
      std::memcpy(&b, beta + (q % kM) * kLanes, sizeof(b));
      std::memcpy(&v[q], x + (chunk * 16 + q) * kLanes, sizeof(v[q]));
      v[q] *= b;
    }
  };
  for (int64_t t = 0; t < p.n_iters; ++t) {
    Vec16f col_sums[kM] = {};
    for (int chunk = 0; chunk < kChunks; ++chunk) {
      Vec16f v[16];
      if (t == 0) {
        load_chunk(K, nm, chunk * 16, v);
      } else {
        load_scaled(ct + (t - 1) * kM * kLanes, chunk, v);
      }
      for (int r = 0; r < kRowsPerChunk; ++r) {
        Vec16f* row = v + r * kM;
        Vec16f sum, alpha;
        tree_sum<kM>(row, sum);
        store_scale(sum, row_target, rt + (t * kN + chunk * kRowsPerChunk + r) * kLanes, alpha);
        for (int j = 0; j < kM; ++j) {
          row[j] *= alpha;
          col_sums[j] += row[j];
        }
      }
      for (int q = 0; q < 16; ++q) std::memcpy(x + (chunk * 16 + q) * kLanes, &v[q], sizeof(v[q]));
    }
    for (int j = 0; j < kM; ++j) {
      Vec16f beta;
      store_scale(col_sums[j], col_target, ct + (t * kM + j) * kLanes, beta);
    }
  }
  for (int chunk = 0; chunk < kChunks; ++chunk) {
    Vec16f v[16];
    load_scaled(ct + (p.n_iters - 1) * kM * kLanes, chunk, v);
    store_chunk(v, out, nm, chunk * 16);
  }
}

// Common small shapes get N and M as compile-time constants (kN, kM > 0): every loop over
// the tile then unrolls completely, which at 4x4 removes most of the per-entry work.
template <int kN, int kM>
PIUMR_ALWAYS_INLINE Problem with_fixed_shape(const Problem& problem) {
  Problem p = problem;
  if constexpr (kN > 0) {
    p.n_rows = kN;
    p.n_cols = kM;
  }
  return p;
}

// Large float/double matrices are read from and written to the tensors directly; everything
// else goes through the scratch tile (lanes layout, or float math for half types).
template <typename scalar_t, typename acc_t, int L>
constexpr bool kDirect = L == 1 && std::is_same_v<scalar_t, acc_t>;

template <typename scalar_t, typename acc_t, int L, int kN, int kM>
struct ForwardKernel {
  static constexpr bool kWritesStats = true;
  static bool needs_tiles(const Problem& p) { return p.log_domain || !kDirect<scalar_t, acc_t, L>; }

  static PIUMR_ALWAYS_INLINE void run(const BlockArgs<scalar_t, acc_t>& a) {
    const Problem p = with_fixed_shape<kN, kM>(*a.problem);
    const int64_t n = p.n_rows, m = p.n_cols, nm = n * m;
    Scratch<acc_t, L> s(a.scratch, p);
    if (p.log_domain) {
      load_lanes<scalar_t, acc_t, L>(a.K, s.x, a.count, nm, acc_t(1));
      log_iterations<acc_t, L>(p, s.x, s.rt, s.ct, s.tmp);
#pragma omp simd
      for (int64_t k = 0; k < nm * L; ++k) s.x[k] = vexp<acc_t>(s.x[k]);
      store_lanes<scalar_t, acc_t, L>(s.x, a.out, a.count, nm);
    } else {
      if constexpr (L == 1) {
        // P = diag(u) K diag(v), written straight to the output when K is read in place.
        const acc_t* x;
        acc_t* P;
        if constexpr (kDirect<scalar_t, acc_t, L>) {
          x = a.K;
          P = a.out;
        } else {
          load_lanes<scalar_t, acc_t, L>(a.K, s.x, a.count, nm, acc_t(1));
          x = P = s.x;
        }
        linear_iterations_read_only<acc_t>(p, x, s.rt, s.ct, s.row, s.col, s.tmp);
        const acc_t* u = s.row;
        const acc_t* v = s.col;
        for_each_entry<L>(n, m, [&](int64_t e, int64_t r, int64_t c) { P[e] = u[r] * x[e] * v[c]; });
        if constexpr (!kDirect<scalar_t, acc_t, L>) store_lanes<scalar_t, acc_t, L>(s.x, a.out, a.count, nm);
      } else {
        if constexpr (kChunkedTile<scalar_t, acc_t, L, kM>) {
          if (a.count == L && a.wide_registers) {
            linear_forward_tile<kN, kM>(p, a.K, a.out, s.x, s.rt, s.ct);
            if (p.has_stats) store_block_stats(p, s, a);
            return;
          }
        }
        load_lanes<scalar_t, acc_t, L>(a.K, s.x, a.count, nm, acc_t(1));
        linear_iterations_in_place<acc_t, L>(p, s.x, s.rt, s.ct);
        store_lanes<scalar_t, acc_t, L>(s.x, a.out, a.count, nm);
      }
    }
    if (p.has_stats) store_block_stats(p, s, a);
  }

  static PIUMR_ALWAYS_INLINE void store_block_stats(const Problem& p, const Scratch<acc_t, L>& s,
                                                    const BlockArgs<scalar_t, acc_t>& a) {
    store_stats<acc_t, L>(s.rt, a.row_stats, a.count, a.stats_stride, p.n_iters * p.n_rows);
    store_stats<acc_t, L>(s.ct, a.col_stats, a.count, a.stats_stride, p.n_iters * p.n_cols);
  }
};

// One step of the linear backward on kRows plain (L == 1) rows i, streamed from L2: the
// column step's adjoint g = beta (in - col) with the dots row_i = u_i <g_i, K_i v_prev> / r,
// then, while the rows are in L1, the row step's adjoint alpha_i (g_i - row_i), written to
// out, with its column sums next_col += (...) K u_prev (none at the first iteration,
// u_prev == nullptr). Written out instead of built from reduce_rows / accumulate_cols: the
// compiler must assume the gradient stores alias every vector, so those reload each
// column's vectors and each row's scalars once per row, which made the step load-bound;
// staged in local arrays, they stay in registers. `in` may be `out`.
template <typename acc_t, int kRows>
PIUMR_ALWAYS_INLINE void linear_backward_rows(int64_t m, const acc_t* in, acc_t* out, const acc_t* k, const acc_t* beta,
                                              const acc_t* col, const acc_t* v_prev, const acc_t* alpha, const acc_t* u,
                                              acc_t inv_r, const acc_t* u_prev, acc_t* next_col) {
  constexpr int64_t kWidth = 64 / sizeof(acc_t);
  const int64_t full = m - m % kWidth;
  constexpr auto rows = std::make_integer_sequence<int, kRows>{};
  acc_t partial[kRows][kWidth] = {};
  for (int64_t j = 0; j < full; j += kWidth) {
    acc_t b[kWidth], c[kWidth], w[kWidth];
    std::memcpy(b, beta + j, sizeof(b));
    std::memcpy(c, col + j, sizeof(c));
    std::memcpy(w, v_prev + j, sizeof(w));
    [&]<int... R>(std::integer_sequence<int, R...>) PIUMR_ALWAYS_INLINE_LAMBDA {
      (
          [&]() PIUMR_ALWAYS_INLINE_LAMBDA {
#pragma omp simd
            for (int64_t q = 0; q < kWidth; ++q) {
              const int64_t e = R * m + j + q;
              const acc_t g = b[q] * (in[e] - c[q]);
              out[e] = g;
              partial[R][q] += g * k[e] * w[q];
            }
          }(),
          ...);
    }(rows);
  }
  acc_t dot[kRows];
  if constexpr (kRows == 8) {
    sum_lanes_of_8_rows<acc_t>(partial, dot);
  } else {
    for (int r = 0; r < kRows; ++r) {
      acc_t sum = 0;
      for (int64_t q = 0; q < kWidth; ++q) sum += partial[r][q];
      dot[r] = sum;
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int64_t j = full; j < m; ++j) {
      const int64_t e = r * m + j;
      const acc_t g = beta[j] * (in[e] - col[j]);
      out[e] = g;
      dot[r] += g * k[e] * v_prev[j];
    }
    dot[r] *= u[r] * inv_r;
  }
  acc_t a[kRows], w[kRows];
  for (int r = 0; r < kRows; ++r) {
    a[r] = alpha[r];
    w[r] = u_prev ? u_prev[r] : acc_t(0);
  }
  if (u_prev == nullptr) {
    for (int r = 0; r < kRows; ++r) {
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) out[r * m + j] = a[r] * (out[r * m + j] - dot[r]);
    }
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) {
    acc_t sum = next_col[j];
    [&]<int... R>(std::integer_sequence<int, R...>) PIUMR_ALWAYS_INLINE_LAMBDA {
      (
          [&]() PIUMR_ALWAYS_INLINE_LAMBDA {
            const int64_t e = R * m + j;
            const acc_t g = a[R] * (out[e] - dot[R]);
            out[e] = g;
            sum += g * k[e] * w[R];
          }(),
          ...);
    }(rows);
    next_col[j] = sum;
  }
}

// The same step on a whole lanes tile of compile-time shape kN x kM (in L1): two passes,
// each with its sums in registers and the other side's vectors staged in locals, so an
// entry costs two loads and a store. Pass one goes column by column, adding to the kN row
// dots; pass two row by row, adding to the kM column sums.
template <typename acc_t, int L, int kN, int kM>
PIUMR_ALWAYS_INLINE void linear_backward_tile_columns(const acc_t* in, acc_t* out, const acc_t* k, const acc_t* beta,
                                                      const acc_t* col, const acc_t* v_prev, const acc_t* u,
                                                      acc_t inv_r, acc_t (&dot)[kN][L]) {
  for (int i = 0; i < kN; ++i) std::fill(dot[i], dot[i] + L, acc_t(0));
  for (int j = 0; j < kM; ++j) {
    acc_t b[L], bc[L], w[L];
    std::memcpy(b, beta + j * L, sizeof(b));
    std::memcpy(w, v_prev + j * L, sizeof(w));
#pragma omp simd
    for (int l = 0; l < L; ++l) bc[l] = b[l] * col[j * L + l];
    [&]<int... I>(std::integer_sequence<int, I...>) PIUMR_ALWAYS_INLINE_LAMBDA {
      (
          [&]() PIUMR_ALWAYS_INLINE_LAMBDA {
#pragma omp simd
            for (int l = 0; l < L; ++l) {
              const int64_t e = (I * kM + j) * L + l;
              const acc_t g = b[l] * in[e] - bc[l];
              out[e] = g;
              dot[I][l] += g * k[e] * w[l];
            }
          }(),
          ...);
    }(std::make_integer_sequence<int, kN>{});
  }
  for (int i = 0; i < kN; ++i) {
#pragma omp simd
    for (int l = 0; l < L; ++l) dot[i][l] *= u[i * L + l] * inv_r;
  }
}

template <typename acc_t, int L, int kN, int kM>
PIUMR_ALWAYS_INLINE void linear_backward_tile(const acc_t* in, acc_t* out, const acc_t* k, const acc_t* beta,
                                              const acc_t* col, const acc_t* v_prev, const acc_t* alpha, const acc_t* u,
                                              acc_t inv_r, const acc_t* u_prev, acc_t* next_col) {
  acc_t dot[kN][L];
  linear_backward_tile_columns<acc_t, L, kN, kM>(in, out, k, beta, col, v_prev, u, inv_r, dot);
  acc_t sums[kM][L];
  if (u_prev != nullptr) std::memcpy(sums, next_col, sizeof(sums));
  for (int i = 0; i < kN; ++i) {
    acc_t a[L], ad[L], w[L];
    std::memcpy(a, alpha + i * L, sizeof(a));
    if (u_prev != nullptr) std::memcpy(w, u_prev + i * L, sizeof(w));
#pragma omp simd
    for (int l = 0; l < L; ++l) ad[l] = a[l] * dot[i][l];
    [&]<int... J>(std::integer_sequence<int, J...>) PIUMR_ALWAYS_INLINE_LAMBDA {
      (
          [&]() PIUMR_ALWAYS_INLINE_LAMBDA {
#pragma omp simd
            for (int l = 0; l < L; ++l) {
              const int64_t e = (i * kM + J) * L + l;
              const acc_t g = a[l] * out[e] - ad[l];
              out[e] = g;
              if (u_prev != nullptr) sums[J][l] += g * k[e] * w[l];
            }
          }(),
          ...);
    }(std::make_integer_sequence<int, kM>{});
  }
  if (u_prev != nullptr) std::memcpy(next_col, sums, sizeof(sums));
}

// The backward's first pass on a chunked tile (see kChunkedTile): the gradient comes in
// through the lanes transpose into gr, and its column sums col[j] = sum_i grad K u_i (u the
// last row scales' running product) are taken on the way.
template <int kN, int kM>
PIUMR_ALWAYS_INLINE void load_grad_with_col_sums(const float* grad, const float* kx, const float* u, float* gr,
                                                 float* col) {
  constexpr int kRowsPerChunk = 16 / kM, kChunks = kN * kM / 16, nm = kN * kM;
  Vec16f sums[kM] = {};
  for (int chunk = 0; chunk < kChunks; ++chunk) {
    Vec16f v[16];
    load_chunk(grad, nm, chunk * 16, v);
    for (int q = 0; q < 16; ++q) {
      Vec16f k, w;
      std::memcpy(&k, kx + (chunk * 16 + q) * kLanes, sizeof(k));
      std::memcpy(&w, u + (chunk * kRowsPerChunk + q / kM) * kLanes, sizeof(w));
      sums[q % kM] += v[q] * k * w;
      std::memcpy(gr + (chunk * 16 + q) * kLanes, &v[q], sizeof(v[q]));
    }
  }
  for (int j = 0; j < kM; ++j) std::memcpy(col + j * kLanes, &sums[j], sizeof(sums[j]));
}

// The backward's last row step on a chunked tile, written to grad_K through the lanes
// transpose: grad_K = alpha_i (g - dot_i).
template <int kN, int kM>
PIUMR_ALWAYS_INLINE void store_last_row_step(const float* gr, const float* alpha, const float (&dot)[kN][kLanes],
                                             float* grad_K) {
  constexpr int kRowsPerChunk = 16 / kM, kChunks = kN * kM / 16, nm = kN * kM;
  for (int chunk = 0; chunk < kChunks; ++chunk) {
    Vec16f v[16];
    for (int q = 0; q < 16; ++q) {
      const int row = chunk * kRowsPerChunk + q / kM;
      Vec16f g, a, d;
      std::memcpy(&g, gr + (chunk * 16 + q) * kLanes, sizeof(g));
      std::memcpy(&a, alpha + row * kLanes, sizeof(a));
      std::memcpy(&d, dot[row], sizeof(d));
      v[q] = a * (g - d);
    }
    store_chunk(v, grad_K, nm, chunk * 16);
  }
}

template <typename scalar_t, typename acc_t, int L, int kN, int kM>
struct BackwardKernel {
  static constexpr bool kWritesStats = false;
  static bool needs_tiles(const Problem& p) { return p.log_domain || !p.has_stats || !kDirect<scalar_t, acc_t, L>; }

  static PIUMR_ALWAYS_INLINE void run(const BlockArgs<scalar_t, acc_t>& a) {
    const Problem p = with_fixed_shape<kN, kM>(*a.problem);
    const int64_t n = p.n_rows, m = p.n_cols, nm = n * m;
    Scratch<acc_t, L> s(a.scratch, p);
    if (p.has_stats) {
      load_stats<acc_t, L>(a.row_stats, s.rt, a.count, a.stats_stride, p.n_iters * n);
      load_stats<acc_t, L>(a.col_stats, s.ct, a.count, a.stats_stride, p.n_iters * m);
    } else {
      // Not stored (cheaper to recompute than to write and read back): replay the forward.
      load_lanes<scalar_t, acc_t, L>(a.K, s.gr, a.count, nm, acc_t(1));
      if (p.log_domain) {
        log_iterations<acc_t, L>(p, s.gr, s.rt, s.ct, s.tmp);
      } else {
        linear_iterations_in_place<acc_t, L>(p, s.gr, s.rt, s.ct);
      }
    }
    if (p.log_domain) {
      load_lanes<scalar_t, acc_t, L>(a.K, s.x, a.count, nm, acc_t(0));
      load_lanes<scalar_t, acc_t, L>(a.grad, s.gr, a.count, nm, acc_t(0));
      backward_log(p, s);
      store_lanes<scalar_t, acc_t, L>(s.gr, a.out, a.count, nm);
    } else if constexpr (kDirect<scalar_t, acc_t, L>) {
      backward_linear(p, s, a.K, a.grad, a.out);
    } else {
      load_lanes<scalar_t, acc_t, L>(a.K, s.x, a.count, nm, acc_t(0));
      if constexpr (kChunkedTile<scalar_t, acc_t, L, kM>) {
        if (a.count == L && a.wide_registers) {
          backward_linear(p, s, s.x, s.gr, s.gr, &a);
          return;
        }
      }
      load_lanes<scalar_t, acc_t, L>(a.grad, s.gr, a.count, nm, acc_t(0));
      backward_linear(p, s, s.x, s.gr, s.gr);
      store_lanes<scalar_t, acc_t, L>(s.gr, a.out, a.count, nm);
    }
  }

  // Linear domain: the matrix after the row step of iteration t is U_t K V_{t-1}, after its
  // column step U_t K V_t, where U_t, V_t are the running products of the scales. A step
  // Q = diag(alpha) P has the adjoint dP = alpha (dQ - <dQ_i, Q_i> / row_sum), and likewise
  // for columns. One pass per iteration, row by row: a row's column-step adjoint gives the
  // dot product its row step needs, and the row step then adds to the next column products.
  // The gradient is read from `grad` in the first pass and kept in `out` (may be the same).
  // A chunked tile passes its block (`chunked`): the first pass then reads the gradient
  // tensor into the tile `grad`, and the last writes grad_K, both through the transpose.
  static PIUMR_ALWAYS_INLINE void backward_linear(const Problem& p, const Scratch<acc_t, L>& s, const acc_t* kx,
                                                  const acc_t* grad, acc_t* out,
                                                  const BlockArgs<scalar_t, acc_t>* chunked = nullptr) {
    const int64_t n = p.n_rows, m = p.n_cols, nl = n * L, ml = m * L;
    const acc_t inv_r = acc_t(1) / static_cast<acc_t>(p.row_sum);
    const acc_t inv_c = acc_t(1) / static_cast<acc_t>(p.col_sum);
    // The running products stop at the largest finite value: a zero row's scale is
    // row_sum / eps every iteration, and an infinite product times its zero entries would
    // make NaN that spreads through the column sums to the whole gradient (the reference
    // keeps the overflow to that row's own gradient).
    const acc_t largest = std::numeric_limits<acc_t>::max();
    for (int64_t k = 0; k < nl; ++k) s.cu[k] = std::min(s.rt[k], largest);
    for (int64_t k = nl; k < p.n_iters * nl; ++k) s.cu[k] = std::min(s.cu[k - nl] * s.rt[k], largest);
    for (int64_t k = 0; k < ml; ++k) s.cv[k] = std::min(s.ct[k], largest);
    for (int64_t k = ml; k < p.n_iters * ml; ++k) s.cv[k] = std::min(s.cv[k - ml] * s.ct[k], largest);
    acc_t* ones = s.aux;
    std::fill(ones, ones + ml, acc_t(1));
    acc_t* col = s.col;
    acc_t* next_col = s.tmp;
    acc_t* row = s.row;
    {
      const acc_t* u = s.cu + (p.n_iters - 1) * nl;
      if constexpr (kChunkedTile<scalar_t, acc_t, L, kM>) {
        if (chunked) load_grad_with_col_sums<kN, kM>(chunked->grad, kx, u, out, col);
      }
      if (!chunked) {
        reduce_cols<acc_t, L>(n, m, col, [=](int64_t e, int64_t r, int64_t) { return grad[e] * kx[e] * u[r]; });
      }
    }
    for (int64_t t = p.n_iters - 1; t >= 0; --t) {
      const acc_t* alpha = s.rt + t * nl;
      const acc_t* beta = s.ct + t * ml;
      const acc_t* u = s.cu + t * nl;
      const acc_t* v = s.cv + t * ml;
      const acc_t* v_prev = t > 0 ? s.cv + (t - 1) * ml : ones;
      const acc_t* u_prev = t > 0 ? s.cu + (t - 1) * nl : nullptr;
      const acc_t* in = t == p.n_iters - 1 ? grad : out;
#pragma omp simd
      for (int64_t k = 0; k < ml; ++k) col[k] *= v[k] * inv_c;
      if (t > 0) std::fill(next_col, next_col + ml, acc_t(0));
      if constexpr (L == 1) {
        // Plain rows stream from L2: both steps of the iteration in one pass, 8 rows at a time.
        const auto step = [&]<int kRows>(int64_t i) PIUMR_ALWAYS_INLINE_LAMBDA {
          linear_backward_rows<acc_t, kRows>(m, in + i * m, out + i * m, kx + i * m, beta, col, v_prev, alpha + i,
                                             u + i, inv_r, u_prev ? u_prev + i : nullptr, next_col);
        };
        const int64_t grouped = n - n % kRowGroup;
        for (int64_t i = 0; i < grouped; i += kRowGroup) step.template operator()<kRowGroup>(i);
        for (int64_t i = grouped; i < n; ++i) step.template operator()<1>(i);
      } else if constexpr (kN > 0) {
        if constexpr (kChunkedTile<scalar_t, acc_t, L, kM>) {
          if (chunked && t == 0) {
            acc_t dot[kN][L];
            linear_backward_tile_columns<acc_t, L, kN, kM>(in, out, kx, beta, col, v_prev, u, inv_r, dot);
            store_last_row_step<kN, kM>(out, alpha, dot, chunked->out);
            break;
          }
        }
        linear_backward_tile<acc_t, L, kN, kM>(in, out, kx, beta, col, v_prev, alpha, u, inv_r, u_prev, next_col);
      } else {
        // A lanes tile sits in L1 whole: two passes per iteration, so every vector op is
        // independent of the previous row's result.
        reduce_rows<acc_t, L>(n, m, row, [=](int64_t e, int64_t, int64_t c) {
          const acc_t g = beta[c] * (in[e] - col[c]);
          out[e] = g;
          return g * kx[e] * v_prev[c];
        });
#pragma omp simd
        for (int64_t k = 0; k < nl; ++k) row[k] *= u[k] * inv_r;
        if (t > 0) {
          accumulate_cols<acc_t, L>(n, m, next_col, [=](int64_t e, int64_t r, int64_t) {
            const acc_t g = alpha[r] * (out[e] - row[r]);
            out[e] = g;
            return g * kx[e] * u_prev[r];
          });
        } else {
          for_each_entry<L>(n, m, [=](int64_t e, int64_t r, int64_t) { out[e] = alpha[r] * (out[e] - row[r]); });
        }
      }
      std::swap(col, next_col);
    }
  }

  // Log domain: L after the row step of iteration t is K + f_t + g_{t-1}, after its column
  // step K + f_t + g_t; each step's Jacobian is that of a softmax, exp(L) / target.
  static PIUMR_ALWAYS_INLINE void backward_log(const Problem& p, const Scratch<acc_t, L>& s) {
    const int64_t n = p.n_rows, m = p.n_cols, nl = n * L, ml = m * L;
    const acc_t inv_r = acc_t(1) / static_cast<acc_t>(p.row_sum);
    const acc_t inv_c = acc_t(1) / static_cast<acc_t>(p.col_sum);
    const acc_t* kx = s.x;
    acc_t* gr = s.gr;
    acc_t* zeros = s.tmp;
    for (int64_t k = 0; k < ml; ++k) zeros[k] = 0;
    {
      const acc_t* f = s.rt + (p.n_iters - 1) * nl;
      const acc_t* g = s.ct + (p.n_iters - 1) * ml;
      for_each_entry<L>(n, m, [&](int64_t e, int64_t r, int64_t c) { gr[e] *= vexp<acc_t>(kx[e] + f[r] + g[c]); });
    }
    for (int64_t t = p.n_iters - 1; t >= 0; --t) {
      const acc_t* f = s.rt + t * nl;
      const acc_t* g = s.ct + t * ml;
      const acc_t* g_prev = t > 0 ? s.ct + (t - 1) * ml : zeros;
      acc_t* col = s.col;
      acc_t* row = s.row;
      reduce_cols<acc_t, L>(n, m, col, [&](int64_t e, int64_t, int64_t) { return gr[e]; });
      for (int64_t k = 0; k < ml; ++k) col[k] *= inv_c;
      for_each_entry<L>(n, m,
                        [&](int64_t e, int64_t r, int64_t c) { gr[e] -= vexp<acc_t>(kx[e] + f[r] + g[c]) * col[c]; });
      reduce_rows<acc_t, L>(n, m, row, [&](int64_t e, int64_t, int64_t) { return gr[e]; });
      for (int64_t k = 0; k < nl; ++k) row[k] *= inv_r;
      for_each_entry<L>(
          n, m, [&](int64_t e, int64_t r, int64_t c) { gr[e] -= vexp<acc_t>(kx[e] + f[r] + g_prev[c]) * row[r]; });
    }
  }
};

// Per-thread scratch of `values` acc_t, not value-initialized (every value is written before
// it is read) and 64-byte aligned by c10's allocator, so a tile's vectors never straddle two
// cache lines: from malloc's 16-byte alignment a 16x16 float backward took ~20% longer.
template <typename acc_t>
std::unique_ptr<acc_t, decltype(&c10::free_cpu)> aligned_scratch(int64_t values) {
  return {static_cast<acc_t*>(c10::alloc_cpu(values * sizeof(acc_t))), &c10::free_cpu};
}

template <template <typename, typename, int, int, int> class Kernel, typename scalar_t, int L, int kN = 0, int kM = 0>
void run_blocks(const Problem& p, const at::Tensor& K, const at::Tensor* grad, at::Tensor& out, at::Tensor& row_stats,
                at::Tensor& col_stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nm = p.n_rows * p.n_cols;
  const int64_t n_blocks = (p.batch + L - 1) / L;
  // Enough work per task (~64K element-steps) that thread start-up is amortized.
  const int64_t work_per_block = std::max<int64_t>(1, nm * L * p.n_iters);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / work_per_block);
  const scalar_t* k_ptr = K.data_ptr<scalar_t>();
  const scalar_t* g_ptr = grad ? grad->data_ptr<scalar_t>() : nullptr;
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  acc_t* rs_ptr = p.has_stats ? row_stats.data_ptr<acc_t>() : nullptr;
  acc_t* cs_ptr = p.has_stats ? col_stats.data_ptr<acc_t>() : nullptr;
  const CpuIsa isa = selected_isa();
  at::parallel_for(0, n_blocks, grain, [&](int64_t begin, int64_t end) {
    using BlockKernel = Kernel<scalar_t, acc_t, L, kN, kM>;
    const auto scratch = aligned_scratch<acc_t>(Scratch<acc_t, L>::size(p, BlockKernel::needs_tiles(p)));
    // A plain-rows block is one matrix, whose stats are single values a batch apart in the
    // tensors; at power-of-two batch sizes those accesses fall into a few cache sets and
    // miss (256x64x64 forward +20%). So kLanes such blocks at a time stage their stats in
    // lanes order, moved to or from the tensors as contiguous runs, like a lanes block's.
    const bool staged = L == 1 && p.has_stats;
    const int64_t row_len = p.n_iters * p.n_rows, col_len = p.n_iters * p.n_cols;
    const auto stage = aligned_scratch<acc_t>(staged ? kLanes * (row_len + col_len) : 0);
    acc_t* stage_rows = stage.get();
    acc_t* stage_cols = staged ? stage_rows + kLanes * row_len : nullptr;
    const int64_t group = staged ? kLanes : end - begin;
    acc_t* rows_base = staged ? stage_rows : rs_ptr;  // null without stats
    acc_t* cols_base = staged ? stage_cols : cs_ptr;
    for (int64_t g0 = begin; g0 < end; g0 += group) {
      const int64_t g1 = std::min(end, g0 + group);
      if (staged && !BlockKernel::kWritesStats) {
        load_stats<acc_t, kLanes>(rs_ptr + g0, stage_rows, g1 - g0, p.batch, row_len);
        load_stats<acc_t, kLanes>(cs_ptr + g0, stage_cols, g1 - g0, p.batch, col_len);
      }
      for (int64_t blk = g0; blk < g1; ++blk) {
        const int64_t first = blk * L;
        const int64_t stats_offset = staged ? blk - g0 : first;
        BlockArgs<scalar_t, acc_t> args{&p,
                                        k_ptr + first * nm,
                                        g_ptr ? g_ptr + first * nm : nullptr,
                                        out_ptr + first * nm,
                                        rows_base ? rows_base + stats_offset : nullptr,
                                        cols_base ? cols_base + stats_offset : nullptr,
                                        staged ? kLanes : p.batch,
                                        std::min<int64_t>(L, p.batch - first),
                                        scratch.get(),
                                        isa == CpuIsa::kAvx512};
        run_for_isa<BlockKernel>(isa, args);
      }
      if (staged && BlockKernel::kWritesStats) {
        store_stats<acc_t, kLanes>(stage_rows, rs_ptr + g0, g1 - g0, p.batch, row_len);
        store_stats<acc_t, kLanes>(stage_cols, cs_ptr + g0, g1 - g0, p.batch, col_len);
      }
    }
  });
}

template <template <typename, typename, int, int, int> class Kernel, typename scalar_t>
void run(const Problem& p, const at::Tensor& K, const at::Tensor* grad, at::Tensor& out, at::Tensor& row_stats,
         at::Tensor& col_stats) {
  if (p.n_rows * p.n_cols > kLanesMaxEntries) {
    run_blocks<Kernel, scalar_t, 1>(p, K, grad, out, row_stats, col_stats);
    return;
  }
  if constexpr (std::is_same_v<scalar_t, float>) {
    // Hyper-connection mixing (4x4), 8x8 and TFAM kernels (16x16).
    if (p.n_rows == 4 && p.n_cols == 4)
      return run_blocks<Kernel, scalar_t, kLanes, 4, 4>(p, K, grad, out, row_stats, col_stats);
    if (p.n_rows == 8 && p.n_cols == 8)
      return run_blocks<Kernel, scalar_t, kLanes, 8, 8>(p, K, grad, out, row_stats, col_stats);
    if (p.n_rows == 16 && p.n_cols == 16) {
      return run_blocks<Kernel, scalar_t, kLanes, 16, 16>(p, K, grad, out, row_stats, col_stats);
    }
  }
  run_blocks<Kernel, scalar_t, kLanes>(p, K, grad, out, row_stats, col_stats);
}

void check_matrices(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "sinkhorn_cpp: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 3, "sinkhorn_cpp: ", name, " must be (batch, N, M), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "sinkhorn_cpp: ", name, " must be contiguous");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "sinkhorn_cpp: ", name, " must be floating, got ", t.scalar_type());
}

Problem make_problem(const at::Tensor& K, int64_t n_iters, double eps, bool log_domain, double row_sum, double col_sum,
                     bool has_stats) {
  // The bound of sinkhorn() in sinkhorn_knopp/op.py; it also keeps the scratch sizes
  // (n_iters * (N + M) * 32 values per thread) far from overflowing.
  TORCH_CHECK(n_iters >= 1 && n_iters <= kMaxIters, "sinkhorn_cpp: n_iters must be in [1, ", kMaxIters, "], got ",
              n_iters);
  TORCH_CHECK(eps >= 0, "sinkhorn_cpp: eps must be >= 0, got ", eps);
  TORCH_CHECK(row_sum > 0 && col_sum > 0, "sinkhorn_cpp: row_sum and col_sum must be > 0");
  return Problem{K.size(0), K.size(1), K.size(2), n_iters, eps, row_sum, col_sum, log_domain, has_stats};
}

// save_stats=false returns empty stats (the backward then replays the forward itself).
std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_forward(const at::Tensor& K, int64_t n_iters, double eps,
                                                                bool log_domain, double row_sum, double col_sum,
                                                                bool save_stats) {
  check_matrices(K, "K");
  const Problem p = make_problem(K, n_iters, eps, log_domain, row_sum, col_sum, save_stats);
  at::Tensor out = at::empty(K.sizes(), K.options());
  auto stat_opts = K.options().dtype(accumulation_dtype(K.scalar_type()));
  const int64_t stat_batch = save_stats ? K.size(0) : 0;
  at::Tensor row_stats = at::empty({n_iters, p.n_rows, stat_batch}, stat_opts);
  at::Tensor col_stats = at::empty({n_iters, p.n_cols, stat_batch}, stat_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, K.scalar_type(), "sinkhorn_cpp",
                                  [&] { run<ForwardKernel, scalar_t>(p, K, nullptr, out, row_stats, col_stats); });
  return {out, row_stats, col_stats};
}

at::Tensor sinkhorn_backward(const at::Tensor& grad_P, const at::Tensor& K, const at::Tensor& row_stats,
                             const at::Tensor& col_stats, int64_t n_iters, double eps, bool log_domain, double row_sum,
                             double col_sum) {
  check_matrices(K, "K");
  check_matrices(grad_P, "grad_P");
  TORCH_CHECK(grad_P.sizes() == K.sizes() && grad_P.scalar_type() == K.scalar_type(),
              "sinkhorn_cpp_backward: grad_P must match K in shape and dtype");
  const bool has_stats = row_stats.numel() > 0;
  const Problem p = make_problem(K, n_iters, eps, log_domain, row_sum, col_sum, has_stats);
  const auto st = accumulation_dtype(K.scalar_type());
  const int64_t stat_batch = has_stats ? K.size(0) : 0;
  TORCH_CHECK(row_stats.scalar_type() == st && row_stats.is_contiguous() &&
                  row_stats.sizes() == at::IntArrayRef({n_iters, p.n_rows, stat_batch}),
              "sinkhorn_cpp_backward: row_stats must be contiguous (n_iters, N, batch or 0) of ", st);
  TORCH_CHECK(col_stats.scalar_type() == st && col_stats.is_contiguous() &&
                  col_stats.sizes() == at::IntArrayRef({n_iters, p.n_cols, stat_batch}),
              "sinkhorn_cpp_backward: col_stats must be contiguous (n_iters, M, batch or 0) of ", st);
  at::Tensor grad_K = at::empty(K.sizes(), K.options());
  at::Tensor rs = row_stats, cs = col_stats;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, K.scalar_type(), "sinkhorn_cpp_backward",
                                  [&] { run<BackwardKernel, scalar_t>(p, K, &grad_P, grad_K, rs, cs); });
  return grad_K;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(piumr_kernels, m) {
  m.def(
      "sinkhorn_cpp(Tensor K, int n_iters, float eps, bool log_domain, float row_sum, float col_sum,"
      " bool save_stats) -> (Tensor, Tensor, Tensor)");
  m.def(
      "sinkhorn_cpp_backward(Tensor grad_P, Tensor K, Tensor row_stats, Tensor col_stats, int n_iters,"
      " float eps, bool log_domain, float row_sum, float col_sum) -> Tensor");
}

TORCH_LIBRARY_IMPL(piumr_kernels, CPU, m) {
  m.impl("sinkhorn_cpp", &sinkhorn_forward);
  m.impl("sinkhorn_cpp_backward", &sinkhorn_backward);
}

}  // namespace piumr
