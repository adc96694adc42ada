// Fused DCT filter bank on the CPU (SPEC §2): forward (energies + stable stats) and backward.
//
// Forward, one op call, two phases; with at least two images per thread both phases of an
// image run in one task (its filtering overlaps the other threads' reading of x), otherwise
// phase 1 runs over all tasks first:
//  1. Channel/time reduction, the only large read: s[b] = (1/T) sum_{c,t} x[b, c, t], over
//     tasks (b, band of rows) so a small batch still fills the threads. Each task adds whole
//     (c, t) planes element-wise into an L1-sized accumulator (vectorized along the plane,
//     eight planes per sweep; no horizontal reductions), prefetching the next sweep's planes
//     into L2 (the planes are streams too short for the hardware prefetcher): about the speed
//     of x.sum() over the same tensor. Any strides for B, C, T, H, W.
//  2. Per image b: the separable correlation on maps with rows padded by p zeros. First the k
//     1-D filters along H, R_u[h, w] = sum_i a_u[i] s[h + i - p, w] (k^2 multiply-adds per
//     pixel over all u), one long vectorized loop over the flat padded map (even for 7x7
//     maps); then along W, E_d[h, w] = sum_j a_v[j] R_u[h, w + j - p] for d = (u, v), row by
//     row straight into E (float32, float64; acc_t maps below that). For k = 3, 5, 7 all v of
//     a slot come from one read of R_u, folded by the basis' symmetry
//     a_v[k - 1 - j] = (-1)^v a_v[j]: the (k + 1) / 2 sums and (k - 1) / 2 differences of
//     mirrored taps, then (k + 1) / 2 or (k - 1) / 2 multiply-adds per filter (25 instead of
//     49 per pixel and slot at k = 7, and 7 loads instead of 49); the same loop sums each
//     E_d. E_d is written once; its variance is one more pass over the cached map, about the
//     mean (corrected two-pass). A filter asked for twice is computed once and copied.
// Backward, per image b: recompute R from the saved s, rebuild each E_d, form
// G_d = dE_d + dmean_d / HW + dvar_d * 2 (E_d - mean_d) / HW, correlate it with the reversed
// a_v into Q_u (the adjoint of the W pass), then g = the H-pass adjoint over the Q_u, and
// write the small (B, H, W) map g / T. The glue expands it over (C, T).
// Scratch is allocated once per thread; basis vectors are float64 cosines cast to acc_t.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "accumulation.h"
#include "cpu_dispatch.h"

namespace piumr {
namespace {

// Elements of the accumulator one reduction task sweeps: 4096 floats = 16 KiB, in L1.
constexpr int64_t kReduceChunk = 4096;
// (c, t) planes one reduction sweep adds, and the elements per software-prefetch step.
constexpr int kPlanesPerSweep = 8;
constexpr int64_t kPrefetchBlock = 64;
// Elements past the last R_u map that the forward's W pass may read (kept zero).
constexpr int64_t kReadSlack = 64;

// The separable bank: the 1-D rows needed (`slots`) and, per output filter, its slot and v.
template <typename acc_t>
struct Bank {
  int64_t k, pad, n_filters, n_slots;
  std::vector<acc_t> basis;          // (k, k): basis[u * k + i] = c(u) cos(pi (2i+1) u / 2k)
  std::vector<acc_t> reversed;       // (k, k): reversed[v * k + j] = basis[v * k + k - 1 - j]
  std::vector<int64_t> slot_u;       // (n_slots): the u of each H-pass slot
  std::vector<int64_t> filter_slot;  // (n_filters): slot holding R_u for filter n
  std::vector<int64_t> filter_v;     // (n_filters)
  std::vector<int64_t> slot_filter;  // (n_slots, k): the first filter with that slot and v, or -1
  std::vector<int64_t> first_of;     // (n_filters): the first filter equal to filter n

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
    reversed.resize(k * k);
    for (int64_t v = 0; v < k; ++v)
      for (int64_t j = 0; j < k; ++j) reversed[v * k + j] = basis[v * k + k - 1 - j];
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
    slot_filter.assign(n_slots * k, -1);
    for (int64_t n = 0; n < n_filters; ++n) {
      int64_t& first = slot_filter[filter_slot[n] * k + filter_v[n]];
      if (first < 0) first = n;
      first_of.push_back(first);
    }
  }
};

template <typename scalar_t, typename acc_t>
struct ReduceArgs {
  const scalar_t* x;             // x[b] at row h0
  const int64_t* plane_offsets;  // (C * T) element offsets of each (c, t) plane
  int64_t n_planes, n_rows, width, stride_h, stride_w;
  acc_t scale;  // 1 / T
  acc_t* acc;   // n_rows * width accumulator (scratch)
  acc_t* out;   // s[b] at row h0, contiguous rows
};

// acc[e] += sum_j planes[j][e] for e in [begin, end).
template <typename scalar_t, typename acc_t>
PIUMR_ALWAYS_INLINE void add_planes(const scalar_t* const* planes, int64_t begin, int64_t end, acc_t* acc) {
#pragma omp simd
  for (int64_t e = begin; e < end; ++e) {
    acc_t sum = 0;
    for (int j = 0; j < kPlanesPerSweep; ++j) sum += static_cast<acc_t>(planes[j][e]);
    acc[e] += sum;
  }
}

template <typename scalar_t, typename acc_t>
struct ReduceKernel {
  static PIUMR_ALWAYS_INLINE void run(const ReduceArgs<scalar_t, acc_t>& a) {
    const bool flat = a.stride_w == 1 && (a.stride_h == a.width || a.n_rows == 1);
    const int64_t n = a.n_rows * a.width;
    acc_t* acc = a.acc;
    for (int64_t e = 0; e < n; ++e) acc[e] = 0;
    if (flat) {
      // kPlanesPerSweep planes per sweep (one accumulator load/store per kPlanesPerSweep plane
      // loads). The planes are short streams (a few KiB) that the hardware prefetcher barely
      // ramps up on, so each block also prefetches the same block of the next sweep's planes
      // into L2. Measured on one core: 8 planes with prefetch beat 8 or 16 without (from
      // 1.3-1.6x to 1.0-1.4x the time of x.sum() at 56x56 and 28x28 planes).
      constexpr int64_t kLineBytes = 64, kBlockBytes = kPrefetchBlock * sizeof(scalar_t);
      int64_t q = 0;
      for (; q + kPlanesPerSweep <= a.n_planes; q += kPlanesPerSweep) {
        const scalar_t* planes[kPlanesPerSweep];
        const char* next[kPlanesPerSweep];
        for (int j = 0; j < kPlanesPerSweep; ++j) {
          planes[j] = a.x + a.plane_offsets[q + j];
          const int64_t later = q + kPlanesPerSweep + j;
          next[j] = reinterpret_cast<const char*>(later < a.n_planes ? a.x + a.plane_offsets[later] : planes[j]);
        }
        int64_t e = 0;
        for (; e + kPrefetchBlock <= n; e += kPrefetchBlock) {
          for (int j = 0; j < kPlanesPerSweep; ++j)
            for (int64_t line = 0; line < kBlockBytes; line += kLineBytes)
              __builtin_prefetch(next[j] + e * static_cast<int64_t>(sizeof(scalar_t)) + line, 0, 2);
          add_planes<scalar_t, acc_t>(planes, e, e + kPrefetchBlock, acc);
        }
        add_planes<scalar_t, acc_t>(planes, e, n, acc);
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

// Image layout: every map is kept flat with rows of Wp = W + 2p (p = k // 2), value (h, w)
// at h * Wp + p + w, p zero columns each side. A 1-D correlation along W or H is then one
// long vectorized loop over the flat map (rows as short as W = 7 cost no per-row overhead):
// out[i] = sum_j taps[j] in[i + j * stride], stride 1 (along W) or Wp (along H). Along W the
// outputs at a row's last 2p positions mix two rows and are never read.
// `rows` > 1 repeats that over segments: segment r reads from in + r * in_row_stride and
// writes the contiguous rows out[r * length, (r + 1) * length) (the forward's W pass for
// k > 7 writes E_d row by row this way).
// With the tap count KS known at compile time (k = 3, 5, 7) each output vector sums its taps
// in registers; otherwise (KS = 0) one vectorized multiply-add sweep per tap.
template <int KS, bool kAccumulate, typename acc_t>
PIUMR_ALWAYS_INLINE void correlate(const acc_t* in, int64_t stride, const acc_t* taps, int64_t k, int64_t length,
                                   acc_t* out, int64_t rows = 1, int64_t in_row_stride = 0) {
  if constexpr (KS > 0) {
    // Local copies, loaded once: `out` could alias `taps` as far as the compiler knows, which
    // would reload and re-broadcast every tap in every iteration.
    acc_t t[KS];
    for (int j = 0; j < KS; ++j) t[j] = taps[j];
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t* in_r = in + r * in_row_stride;
      acc_t* out_r = out + r * length;
#pragma omp simd
      for (int64_t i = 0; i < length; ++i) {
        acc_t sum = 0;
        for (int j = 0; j < KS; ++j) sum += t[j] * in_r[i + j * stride];
        out_r[i] = kAccumulate ? out_r[i] + sum : sum;
      }
    }
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t* in_r = in + r * in_row_stride;
      acc_t* out_r = out + r * length;
      if (!kAccumulate) {
        for (int64_t i = 0; i < length; ++i) out_r[i] = 0;
      }
      for (int64_t j = 0; j < k; ++j) {
        const acc_t tap = taps[j];
        const acc_t* row = in_r + j * stride;
#pragma omp simd
        for (int64_t i = 0; i < length; ++i) out_r[i] += tap * row[i];
      }
    }
  }
}

// The sums of d and d^2 for d = in[i] - center, over two interleaved halves: a single
// accumulator each would make the loop wait on the add latency at every vector.
template <typename acc_t>
PIUMR_ALWAYS_INLINE std::pair<acc_t, acc_t> deviation_sums(const acc_t* in, int64_t length, acc_t center) {
  const int64_t half = length / 2;
  const acc_t* in1 = in + half;
  acc_t d0 = 0, d1 = 0, q0 = 0, q1 = 0;
#pragma omp simd reduction(+ : d0, d1, q0, q1)
  for (int64_t i = 0; i < half; ++i) {
    const acc_t a = in[i] - center, b = in1[i] - center;
    d0 += a;
    d1 += b;
    q0 += a * a;
    q1 += b * b;
  }
  if (length % 2) {
    const acc_t a = in[length - 1] - center;
    d0 += a;
    q0 += a * a;
  }
  return {d0 + d1, q0 + q1};
}

template <typename scalar_t, typename acc_t>
struct ImageArgs {
  const Bank<acc_t>* bank;
  int64_t height, width;
  const acc_t* s;  // s[b], (H, W)
  // forward
  scalar_t* E;  // E[b], (D, H, W)
  acc_t* mean;  // mean[b], (D)
  acc_t* var;   // var[b], (D)
  // backward
  const scalar_t* grad_E;   // (D, H, W)
  const acc_t* grad_mean;   // (D)
  const acc_t* grad_var;    // (D)
  const acc_t* saved_mean;  // (D)
  acc_t inv_frames;
  scalar_t* grad_map;  // (H, W)
  acc_t* scratch;      // image_scratch_size()
};

// Per-thread scratch: s padded on all sides, then R_u per slot, then either (forward)
// kReadSlack zeros and k + 1 acc_t maps of E_d (one slot's, and one for the v nobody asked
// for) or (backward) Q_u per slot with p zero rows above and below, one padded map of G, and
// two flat work maps.
template <typename acc_t>
int64_t image_scratch_size(const Bank<acc_t>& bank, int64_t height, int64_t width) {
  const int64_t wp = width + 2 * bank.pad, padded = (height + 2 * bank.pad) * wp, map = height * wp;
  return padded + bank.n_slots * map + std::max(bank.n_slots * padded + 3 * map, kReadSlack + (bank.k + 1) * map);
}

// Calls body(args, b, extra) for every image b over the threads; args already holds the bank,
// the map size and the thread's scratch, `extra` points to `extra_size` more scratch values
// (both allocated once per thread); body adds the pointers.
template <typename scalar_t, typename acc_t, typename Body>
void for_each_image(const Bank<acc_t>& bank, int64_t batch, int64_t height, int64_t width, int64_t extra_size,
                    Body&& body) {
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    const int64_t image_size = image_scratch_size(bank, height, width);
    std::vector<acc_t> scratch(image_size + extra_size);
    for (int64_t b = begin; b < end; ++b) {
      ImageArgs<scalar_t, acc_t> args{};
      args.bank = &bank;
      args.height = height;
      args.width = width;
      args.scratch = scratch.data();
      body(args, b, scratch.data() + image_size);
    }
  });
}

// s[b] into the padded layout (all pads zero), then R_u = the H pass of every slot.
template <int KS, typename acc_t>
PIUMR_ALWAYS_INLINE void filter_along_h(const Bank<acc_t>& bank, const acc_t* s, int64_t height, int64_t width,
                                        acc_t* s_padded, acc_t* r) {
  const int64_t k = bank.k, pad = bank.pad, wp = width + 2 * pad, map = height * wp;
  for (int64_t i = 0; i < (height + 2 * pad) * wp; ++i) s_padded[i] = 0;
  for (int64_t h = 0; h < height; ++h) {
    const acc_t* src = s + h * width;
    acc_t* dst = s_padded + (pad + h) * wp + pad;
    for (int64_t w = 0; w < width; ++w) dst[w] = src[w];
  }
  for (int64_t slot = 0; slot < bank.n_slots; ++slot) {
    correlate<KS, false>(s_padded, wp, bank.basis.data() + bank.slot_u[slot] * k, k, map, r + slot * map);
  }
}

// The W pass of one slot (k = KS > 0, see the top): E_(u,v) into maps[v] (H, W) and its
// sum into sums[v], for every v (kOnly < 0) or for v = kOnly alone, with the same
// arithmetic either way (the same values whichever filters are asked for). Row by row, one
// vector of outputs at a time (GCC/Clang vector extensions: one register per vector on
// every ISA build). A vector past a row's end reads into the next row (or the zero slack
// after the maps) and stores into the next row of the map, written after it; only its
// in-row lanes are summed, and at the map's end only they are stored.
template <int KS, int kOnly, typename acc_t>
PIUMR_ALWAYS_INLINE void filter_slot_along_w(const acc_t* r, int64_t wp, const acc_t* basis, int64_t height,
                                             int64_t width, acc_t* const* maps, acc_t* sums) {
  using Vec = typename Vec64<acc_t>::type;
  constexpr int64_t kVec = 64 / sizeof(acc_t);
  constexpr int kHalf = KS / 2;
  constexpr int kFirst = kOnly < 0 ? 0 : kOnly, kEnd = kOnly < 0 ? KS : kOnly + 1;
  acc_t taps[KS][kHalf + 1];  // a_v[j] for j <= kHalf
  for (int v = 0; v < KS; ++v)
    for (int j = 0; j <= kHalf; ++j) taps[v][j] = basis[v * KS + j];
  const int64_t hw = height * width;
  Vec tail_keep;  // 1 for the lanes of a row's partial last vector that are in the row
  for (int64_t l = 0; l < kVec; ++l) tail_keep[l] = l < width % kVec ? acc_t(1) : acc_t(0);
  Vec total[KS] = {};
  for (int64_t h = 0; h < height; ++h) {
    const acc_t* row = r + h * wp;
    for (int64_t w0 = 0; w0 < width; w0 += kVec) {
      Vec x[KS];
      for (int j = 0; j < KS; ++j) std::memcpy(&x[j], row + w0 + j, sizeof(Vec));
      // Mirrored taps: even v weight x[j] + x[KS-1-j] (and the centre), odd v the difference.
      Vec mirrored_sum[kHalf + 1], mirrored_diff[kHalf];
      for (int j = 0; j < kHalf; ++j) {
        mirrored_sum[j] = x[j] + x[KS - 1 - j];
        mirrored_diff[j] = x[j] - x[KS - 1 - j];
      }
      mirrored_sum[kHalf] = x[kHalf];
      Vec e[KS];
      for (int v = kFirst; v < kEnd; ++v) {
        Vec acc = {};
        if (v % 2 == 0) {
          for (int j = 0; j <= kHalf; ++j) acc += taps[v][j] * mirrored_sum[j];
        } else {
          for (int j = 0; j < kHalf; ++j) acc += taps[v][j] * mirrored_diff[j];
        }
        e[v] = acc;
      }
      const int64_t at = h * width + w0;
      if (w0 + kVec <= width) {
        for (int v = kFirst; v < kEnd; ++v) total[v] += e[v];
      } else {
        for (int v = kFirst; v < kEnd; ++v) total[v] += e[v] * tail_keep;
      }
      if (at + kVec <= hw) {
        for (int v = kFirst; v < kEnd; ++v) std::memcpy(maps[v] + at, &e[v], sizeof(Vec));
      } else {
        for (int v = kFirst; v < kEnd; ++v)
          for (int64_t l = 0; at + l < hw; ++l) maps[v][at + l] = e[v][l];
      }
    }
  }
  for (int v = kFirst; v < kEnd; ++v) {
    acc_t sum = 0;
    for (int64_t l = 0; l < kVec; ++l) sum += total[v][l];
    sums[v] = sum;
  }
}

// filter_slot_along_w for the one filter v (a run-time value).
template <int KS, typename acc_t>
PIUMR_ALWAYS_INLINE void filter_one_along_w(int64_t v, const acc_t* r, int64_t wp, const acc_t* basis, int64_t height,
                                            int64_t width, acc_t* const* maps, acc_t* sums) {
  [&]<int... V>(std::integer_sequence<int, V...>) PIUMR_ALWAYS_INLINE_LAMBDA {
    ((V == v ? filter_slot_along_w<KS, V>(r, wp, basis, height, width, maps, sums) : void()), ...);
  }(std::make_integer_sequence<int, KS>{});
}

template <typename scalar_t, typename acc_t, int KS>
struct ForwardImageKernel {
  static PIUMR_ALWAYS_INLINE void run(const ImageArgs<scalar_t, acc_t>& a) {
    constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;  // E_d computed straight into E
    const Bank<acc_t>& bank = *a.bank;
    const int64_t k = bank.k, pad = bank.pad, height = a.height, width = a.width;
    const int64_t wp = width + 2 * pad, map = height * wp, hw = height * width;
    acc_t* s_padded = a.scratch;
    acc_t* r = s_padded + (height + 2 * pad) * wp;
    acc_t* slack = r + bank.n_slots * map;
    acc_t* e_maps = slack + kReadSlack;  // k + 1 maps of hw
    std::fill(slack, e_maps, acc_t(0));
    filter_along_h<KS>(bank, a.s, height, width, s_padded, r);
    const acc_t inv_hw = acc_t(1) / static_cast<acc_t>(hw);
    // Filter n's map e (acc_t) and its sum: stats, and E_n when it was not written directly.
    // Corrected two-pass: the deviations from the first mean also sum to its rounding error
    // (large next to the spread when the mean is far from zero), which corrects both moments.
    const auto finish = [&](int64_t n, const acc_t* e, acc_t sum) PIUMR_ALWAYS_INLINE_LAMBDA {
      const acc_t first_mean = sum * inv_hw;
      const auto [dev, dev_sq] = deviation_sums(e, hw, first_mean);
      a.mean[n] = first_mean + dev * inv_hw;
      a.var[n] = (dev_sq - dev * dev * inv_hw) * inv_hw;
      if constexpr (!kDirect) {
        scalar_t* E_n = a.E + n * hw;
#pragma omp simd
        for (int64_t i = 0; i < hw; ++i) E_n[i] = static_cast<scalar_t>(e[i]);
      }
    };
    if constexpr (KS > 0) {
      for (int64_t slot = 0; slot < bank.n_slots; ++slot) {
        const int64_t* filters = bank.slot_filter.data() + slot * KS;
        const auto map_of = [&](int64_t v) PIUMR_ALWAYS_INLINE_LAMBDA {
          if constexpr (kDirect) {
            return a.E + filters[v] * hw;
          } else {
            return e_maps + v * hw;
          }
        };
        const int64_t asked = KS - std::count(filters, filters + KS, int64_t{-1});
        acc_t* maps[KS];
        for (int v = 0; v < KS; ++v) maps[v] = filters[v] < 0 ? e_maps + KS * hw : map_of(v);  // unused: scratch
        acc_t sums[KS];
        // All of the slot's filters cost about as much as KS / 2 of them alone.
        if (2 * asked >= KS) {
          filter_slot_along_w<KS, -1>(r + slot * map, wp, bank.basis.data(), height, width, maps, sums);
        } else {
          for (int v = 0; v < KS; ++v) {
            if (filters[v] >= 0) {
              filter_one_along_w<KS>(v, r + slot * map, wp, bank.basis.data(), height, width, maps, sums);
            }
          }
        }
        for (int v = 0; v < KS; ++v) {
          if (filters[v] >= 0) finish(filters[v], map_of(v), sums[v]);
        }
      }
    } else {
      for (int64_t n = 0; n < bank.n_filters; ++n) {
        if (bank.first_of[n] != n) continue;
        acc_t* e = nullptr;
        if constexpr (kDirect) {
          e = a.E + n * hw;
        } else {
          e = e_maps;
        }
        // Row by row: R_u's zero pad columns make every row self-contained.
        correlate<KS, false>(r + bank.filter_slot[n] * map, 1, bank.basis.data() + bank.filter_v[n] * k, k, width, e,
                             height, wp);
        finish(n, e, deviation_sums(e, hw, acc_t(0)).first);
      }
    }
    // A filter asked for again: a copy of its first occurrence.
    for (int64_t n = 0; n < bank.n_filters; ++n) {
      const int64_t first = bank.first_of[n];
      if (first == n) continue;
      std::copy(a.E + first * hw, a.E + (first + 1) * hw, a.E + n * hw);
      a.mean[n] = a.mean[first];
      a.var[n] = a.var[first];
    }
  }
};

template <typename scalar_t, typename acc_t, int KS>
struct BackwardImageKernel {
  static PIUMR_ALWAYS_INLINE void run(const ImageArgs<scalar_t, acc_t>& a) {
    const Bank<acc_t>& bank = *a.bank;
    const int64_t k = bank.k, pad = bank.pad, height = a.height, width = a.width;
    const int64_t wp = width + 2 * pad, map = height * wp, span = map - 2 * pad;
    const int64_t padded = (height + 2 * pad) * wp;
    acc_t* s_padded = a.scratch;
    acc_t* r = s_padded + padded;          // R_u per slot
    acc_t* q = r + bank.n_slots * map;     // Q_u per slot, p zero rows above and below
    acc_t* g = q + bank.n_slots * padded;  // G in the padded layout (pads zero)
    acc_t* e = g + map;
    acc_t* out = e + map;
    filter_along_h<KS>(bank, a.s, height, width, s_padded, r);
    for (int64_t i = 0; i < bank.n_slots * padded; ++i) q[i] = 0;
    for (int64_t i = 0; i < map; ++i) g[i] = 0;
    const acc_t inv_hw = acc_t(1) / static_cast<acc_t>(height * width);
    for (int64_t n = 0; n < bank.n_filters; ++n) {
      const int64_t v = bank.filter_v[n];
      const scalar_t* dE = a.grad_E + n * height * width;
      const acc_t from_mean = a.grad_mean[n] * inv_hw;
      const acc_t from_var = 2 * a.grad_var[n] * inv_hw;  // times (E - mean)
      const acc_t mean = a.saved_mean[n];
      if (from_var != 0) {
        correlate<KS, false>(r + bank.filter_slot[n] * map, 1, bank.basis.data() + v * k, k, span, e);
      }
      // G = dE + dmean / HW + dvar * 2 (E - mean) / HW at the map positions.
      for (int64_t h = 0; h < height; ++h) {
        const scalar_t* dE_row = dE + h * width;
        const acc_t* e_row = e + h * wp;
        acc_t* g_row = g + h * wp + pad;
        if (from_var != 0) {
#pragma omp simd
          for (int64_t w = 0; w < width; ++w) {
            g_row[w] = static_cast<acc_t>(dE_row[w]) + from_mean + from_var * (e_row[w] - mean);
          }
        } else {
#pragma omp simd
          for (int64_t w = 0; w < width; ++w) g_row[w] = static_cast<acc_t>(dE_row[w]) + from_mean;
        }
      }
      // Adjoint of the W pass: Q_u[h, x] += sum_j a_v[j] G[h, x - j + p] (the taps reversed).
      correlate<KS, true>(g, 1, bank.reversed.data() + v * k, k, span, q + bank.filter_slot[n] * padded + pad * wp);
    }
    // Adjoint of the H pass: g[y] = sum_u sum_i a_u[i] Q_u[y - i + p] (reversed taps over Q's
    // zero rows), then dx's map g / T.
    for (int64_t slot = 0; slot < bank.n_slots; ++slot) {
      const acc_t* taps = bank.reversed.data() + bank.slot_u[slot] * k;
      if (slot == 0) {
        correlate<KS, false>(q, wp, taps, k, span, out);
      } else {
        correlate<KS, true>(q + slot * padded, wp, taps, k, span, out);
      }
    }
    for (int64_t y = 0; y < height; ++y) {
      const acc_t* src = out + y * wp;
      scalar_t* dst = a.grad_map + y * width;
#pragma omp simd
      for (int64_t w = 0; w < width; ++w) dst[w] = static_cast<scalar_t>(src[w] * a.inv_frames);
    }
  }
};

// Calls f with the compile-time tap count for k = 3, 5, 7, else with 0 (run-time k).
template <typename F>
void with_tap_count(int64_t k, F&& f) {
  switch (k) {
    case 3:
      return f(std::integral_constant<int, 3>{});
    case 5:
      return f(std::integral_constant<int, 5>{});
    case 7:
      return f(std::integral_constant<int, 7>{});
    default:
      return f(std::integral_constant<int, 0>{});
  }
}

void check_bank(int64_t kernel_size, const std::vector<int64_t>& frequencies, const char* op) {
  TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1, op, ": kernel_size must be odd and >= 1, got ", kernel_size);
  TORCH_CHECK(!frequencies.empty(), op, ": frequencies must not be empty");
  for (int64_t d : frequencies) {
    TORCH_CHECK(d >= 0 && d < kernel_size * kernel_size, op, ": frequency index ", d, " outside [0, ",
                kernel_size * kernel_size, ")");
  }
}

// Phase 1: s = (1/T) sum_{c,t} x, as (b, band of rows) tasks.
template <typename scalar_t>
class ChannelReduction {
 public:
  using acc_t = at::opmath_type<scalar_t>;

  ChannelReduction(const at::Tensor& x, at::Tensor& s)
      : x_(x), s_ptr_(s.data_ptr<acc_t>()), plane_offsets_(x.size(1) * x.size(2)) {
    const int64_t batch = x.size(0), frames = x.size(2), height = x.size(3), width = x.size(4);
    for (int64_t c = 0; c < x.size(1); ++c)
      for (int64_t t = 0; t < frames; ++t) plane_offsets_[c * frames + t] = c * x.stride(1) + t * x.stride(2);
    // Bands of at most kReduceChunk elements, and at least two tasks per thread when the
    // batch alone cannot fill the threads.
    const int64_t bands_wanted = (2 * at::get_num_threads() + batch - 1) / std::max<int64_t>(batch, 1);
    rows_per_band_ = std::max<int64_t>(1, std::min(kReduceChunk / width, (height + bands_wanted - 1) / bands_wanted));
    n_bands_ = (height + rows_per_band_ - 1) / rows_per_band_;
    scale_ = acc_t(1) / static_cast<acc_t>(frames);
  }

  int64_t n_tasks() const { return x_.size(0) * n_bands_; }
  // One task per image: the image's filtering can follow its reduction in the same task.
  bool whole_images() const { return n_bands_ == 1; }
  int64_t accumulator_size() const { return std::min(x_.size(3), rows_per_band_) * x_.size(4); }

  // Task (b, band) into s; `acc` holds accumulator_size() values.
  void run(int64_t task, acc_t* acc) const {
    const int64_t height = x_.size(3), width = x_.size(4);
    const int64_t b = task / n_bands_, h0 = (task % n_bands_) * rows_per_band_;
    const ReduceArgs<scalar_t, acc_t> args{x_.data_ptr<scalar_t>() + b * x_.stride(0) + h0 * x_.stride(3),
                                           plane_offsets_.data(),
                                           static_cast<int64_t>(plane_offsets_.size()),
                                           std::min(rows_per_band_, height - h0),
                                           width,
                                           x_.stride(3),
                                           x_.stride(4),
                                           scale_,
                                           acc,
                                           s_ptr_ + (b * height + h0) * width};
    run_for_this_cpu<ReduceKernel<scalar_t, acc_t>>(args);
  }

  // Every task over the threads.
  void run_all() const {
    at::parallel_for(0, n_tasks(), 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(accumulator_size());
      for (int64_t task = begin; task < end; ++task) run(task, acc.data());
    });
  }

 private:
  const at::Tensor& x_;
  acc_t* s_ptr_;
  std::vector<int64_t> plane_offsets_;
  int64_t rows_per_band_, n_bands_;
  acc_t scale_;
};

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
  auto acc_opts = x.options().dtype(accumulation_dtype(x.scalar_type()));
  at::Tensor E = at::empty({batch, n_filters, height, width}, x.options());
  at::Tensor mean = at::empty({batch, n_filters}, acc_opts);
  at::Tensor var = at::empty({batch, n_filters}, acc_opts);
  at::Tensor s = at::empty({batch, height, width}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dct_filter_bank_cpp", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ChannelReduction<scalar_t> reduction(x, s);
    // With one reduction task per image, each image is filtered right after its reduction, in
    // the same task: its map is still in cache, and one thread's filtering (compute) overlaps
    // the other threads' reading of x (memory) instead of waiting for it at a barrier.
    const bool fused = reduction.whole_images();
    if (!fused) reduction.run_all();
    const Bank<acc_t> bank(kernel_size, freq);
    const acc_t* s_ptr = s.data_ptr<acc_t>();
    scalar_t* E_ptr = E.data_ptr<scalar_t>();
    acc_t* mean_ptr = mean.data_ptr<acc_t>();
    acc_t* var_ptr = var.data_ptr<acc_t>();
    const int64_t acc_size = fused ? reduction.accumulator_size() : 0;
    for_each_image<scalar_t>(bank, batch, height, width, acc_size,
                             [&](ImageArgs<scalar_t, acc_t>& args, int64_t b, acc_t* acc) {
                               if (fused) reduction.run(b, acc);
                               args.s = s_ptr + b * height * width;
                               args.E = E_ptr + b * n_filters * height * width;
                               args.mean = mean_ptr + b * n_filters;
                               args.var = var_ptr + b * n_filters;
                               with_tap_count(kernel_size, [&](auto taps) {
                                 run_for_this_cpu<ForwardImageKernel<scalar_t, acc_t, decltype(taps)::value>>(args);
                               });
                             });
  });
  return {E, mean, var, s};
}

at::Tensor dct_backward(const at::Tensor& grad_E, const at::Tensor& grad_mean, const at::Tensor& grad_var,
                        const at::Tensor& s, const at::Tensor& mean, int64_t kernel_size, at::IntArrayRef frequencies,
                        int64_t frames) {
  const char* op = "dct_filter_bank_cpp_backward";
  const std::vector<int64_t> freq(frequencies.begin(), frequencies.end());
  check_bank(kernel_size, freq, op);
  TORCH_CHECK(frames >= 1, op, ": frames must be >= 1, got ", frames);
  TORCH_CHECK(s.dim() == 3 && s.is_contiguous(), op, ": s must be contiguous (B, H, W)");
  const int64_t batch = s.size(0), height = s.size(1), width = s.size(2);
  const int64_t n_filters = static_cast<int64_t>(freq.size());
  const auto acc = accumulation_dtype(grad_E.scalar_type());
  TORCH_CHECK(grad_E.is_contiguous() && grad_E.sizes() == at::IntArrayRef({batch, n_filters, height, width}), op,
              ": grad_E must be contiguous (B, D, H, W)");
  for (const at::Tensor* t : {&grad_mean, &grad_var, &mean}) {
    TORCH_CHECK(t->is_contiguous() && t->sizes() == at::IntArrayRef({batch, n_filters}) && t->scalar_type() == acc, op,
                ": grad_mean, grad_var and mean must be contiguous (B, D) of ", acc);
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
    for_each_image<scalar_t>(bank, batch, height, width, 0, [&](ImageArgs<scalar_t, acc_t>& args, int64_t b, acc_t*) {
      args.s = s_ptr + b * height * width;
      args.grad_E = gE + b * n_filters * height * width;
      args.grad_mean = gm + b * n_filters;
      args.grad_var = gv + b * n_filters;
      args.saved_mean = mu + b * n_filters;
      args.inv_frames = acc_t(1) / static_cast<acc_t>(frames);
      args.grad_map = out + b * height * width;
      with_tap_count(kernel_size, [&](auto taps) {
        run_for_this_cpu<BackwardImageKernel<scalar_t, acc_t, decltype(taps)::value>>(args);
      });
    });
  });
  return grad_map;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(piumr_kernels, m) {
  m.def("dct_filter_bank_cpp(Tensor x, int kernel_size, int[] frequencies) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "dct_filter_bank_cpp_backward(Tensor grad_E, Tensor grad_mean, Tensor grad_var, Tensor s, Tensor mean,"
      " int kernel_size, int[] frequencies, int frames) -> Tensor");
}

TORCH_LIBRARY_IMPL(piumr_kernels, CPU, m) {
  m.impl("dct_filter_bank_cpp", &dct_forward);
  m.impl("dct_filter_bank_cpp_backward", &dct_backward);
}

}  // namespace piumr
