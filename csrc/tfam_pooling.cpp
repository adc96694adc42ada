// TFAM's two passes over the activation x (B, C, T, H, W) on the CPU (SPEC §5, memory floor).
//
// x is seen as B * C * T planes of H * W contiguous values.
// - tfam_statistics_cpp: one read of x -> frame mean and max over H, W (B, C, T), the
//   first argmax (int32, saved for backward) and the spatial map s = (1/T) sum_{c,t} x (B, H, W).
//   Backward writes dx = dmean / HW + ds / T + dmax at the argmax in one pass.
// - tfam_combine_cpp: out = x * (ts[b, t] + ss[b, h, w]) in one pass. Backward reads dout
//   and x once, writes dx and reduces dts = sum_{c,h,w} dout * x, dss = sum_{c,t} dout * x.
//
// Reductions over planes (s, dss) run on chunks of kPlanesPerChunk planes of one sample,
// each accumulating into its own partial map, then the partials are summed: no atomics, and
// the rounding does not depend on the thread count. Accumulation in at::opmath_type.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "accumulation.h"
#include "cpu_dispatch.h"

namespace piumr {
namespace {

constexpr int64_t kPlanesPerChunk = 16;
// Element-wise passes hand each thread at least this many values at a time.
constexpr int64_t kElementGrain = 1 << 15;

struct Layout {
  int64_t batch, planes_per_sample, frames, positions, chunks_per_sample;
};

Layout layout_of(const at::Tensor& x) {
  const int64_t planes = x.size(1) * x.size(2);
  return Layout{x.size(0), planes, x.size(2), x.size(3) * x.size(4), (planes + kPlanesPerChunk - 1) / kPlanesPerChunk};
}

template <typename scalar_t, typename acc_t>
struct StatisticsArgs {
  const scalar_t* x;  // first plane of the chunk
  acc_t* mean;        // per plane
  acc_t* max;         // per plane
  int32_t* argmax;    // per plane
  acc_t* partial;     // this chunk's (H * W) partial spatial sum
  acc_t inv_positions;
  int64_t planes, positions;
};

template <typename scalar_t, typename acc_t>
struct StatisticsKernel {
  static PIUMR_ALWAYS_INLINE void run(const StatisticsArgs<scalar_t, acc_t>& a) {
    const int64_t n = a.positions;
    acc_t* part = a.partial;
    for (int64_t k = 0; k < n; ++k) part[k] = 0;
    for (int64_t p = 0; p < a.planes; ++p) {
      const scalar_t* src = a.x + p * n;
      acc_t total = 0;
      acc_t peak = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(+ : total) reduction(max : peak)
      for (int64_t k = 0; k < n; ++k) {
        const acc_t v = static_cast<acc_t>(src[k]);
        total += v;
        peak = v > peak ? v : peak;
        part[k] += v;
      }
      // First position of the maximum (torch.max order); the plane is still in cache.
      int64_t where = 0;
      while (where < n - 1 && static_cast<acc_t>(src[where]) != peak) ++where;
      // A NaN is the maximum, as in torch.max (the comparison above skips it): only a
      // plane whose sum is NaN can hold one.
      if (total != total) {
        for (int64_t k = 0; k < n; ++k) {
          if (src[k] != src[k]) {
            peak = std::numeric_limits<acc_t>::quiet_NaN();
            where = k;
            break;
          }
        }
      }
      a.mean[p] = total * a.inv_positions;
      a.max[p] = peak;
      a.argmax[p] = static_cast<int32_t>(where);
    }
  }
};

template <typename scalar_t, typename acc_t>
struct CombineBackwardArgs {
  const scalar_t* grad;  // first plane of the chunk
  const scalar_t* x;
  const acc_t* temporal;  // (T,) of this sample
  const acc_t* spatial;   // (H * W,) of this sample
  scalar_t* grad_x;
  acc_t* plane_sum;  // per plane: sum_{h,w} dout * x
  acc_t* partial;    // this chunk's partial sum_{planes} dout * x
  int64_t first_plane, planes, frames, positions;
};

template <typename scalar_t, typename acc_t>
struct CombineBackwardKernel {
  static PIUMR_ALWAYS_INLINE void run(const CombineBackwardArgs<scalar_t, acc_t>& a) {
    const int64_t n = a.positions;
    acc_t* part = a.partial;
    const acc_t* ss = a.spatial;
    for (int64_t k = 0; k < n; ++k) part[k] = 0;
    for (int64_t p = 0; p < a.planes; ++p) {
      const scalar_t* g = a.grad + p * n;
      const scalar_t* x = a.x + p * n;
      scalar_t* dx = a.grad_x + p * n;
      const acc_t ts = a.temporal[(a.first_plane + p) % a.frames];
      acc_t total = 0;
#pragma omp simd reduction(+ : total)
      for (int64_t k = 0; k < n; ++k) {
        const acc_t gv = static_cast<acc_t>(g[k]);
        const acc_t product = gv * static_cast<acc_t>(x[k]);
        dx[k] = static_cast<scalar_t>(gv * (ts + ss[k]));
        total += product;
        part[k] += product;
      }
      a.plane_sum[p] = total;
    }
  }
};

template <typename scalar_t, typename acc_t>
struct StatisticsBackwardArgs {
  scalar_t* grad_x;           // one plane
  const acc_t* grad_spatial;  // (H * W,) of the plane's sample
  acc_t offset;               // dmean / HW
  acc_t inv_frames;           // 1 / T
  acc_t grad_peak;            // dmax, added at `argmax`
  int64_t argmax, positions;
};

template <typename scalar_t, typename acc_t>
struct CombineArgs {
  const scalar_t* x;  // one plane
  scalar_t* out;
  const acc_t* spatial;  // (H * W,) of the plane's sample
  acc_t temporal;        // ts[b, t]
  int64_t positions;
};

template <typename scalar_t, typename acc_t>
struct StatisticsBackwardKernel {
  static PIUMR_ALWAYS_INLINE void run(const StatisticsBackwardArgs<scalar_t, acc_t>& a) {
    const acc_t* gs = a.grad_spatial;
    scalar_t* out = a.grad_x;
#pragma omp simd
    for (int64_t k = 0; k < a.positions; ++k) out[k] = static_cast<scalar_t>(a.offset + a.inv_frames * gs[k]);
    out[a.argmax] = static_cast<scalar_t>(a.offset + a.inv_frames * gs[a.argmax] + a.grad_peak);
  }
};

template <typename scalar_t, typename acc_t>
struct CombineKernel {
  static PIUMR_ALWAYS_INLINE void run(const CombineArgs<scalar_t, acc_t>& a) {
    const acc_t* ss = a.spatial;
    const scalar_t* x = a.x;
#pragma omp simd
    for (int64_t k = 0; k < a.positions; ++k) {
      a.out[k] = static_cast<scalar_t>(static_cast<acc_t>(x[k]) * (a.temporal + ss[k]));
    }
  }
};

// out[b, k] = scale * sum_g partial[b, g, k]
template <typename acc_t>
void sum_partials(const acc_t* partial, acc_t* out, const Layout& l, acc_t scale) {
  at::parallel_for(0, l.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      acc_t* dst = out + b * l.positions;
      for (int64_t k = 0; k < l.positions; ++k) dst[k] = 0;
      for (int64_t g = 0; g < l.chunks_per_sample; ++g) {
        const acc_t* src = partial + (b * l.chunks_per_sample + g) * l.positions;
#pragma omp simd
        for (int64_t k = 0; k < l.positions; ++k) dst[k] += src[k];
      }
      for (int64_t k = 0; k < l.positions; ++k) dst[k] *= scale;
    }
  });
}

// Runs `body(b, first_plane, planes)` for every chunk of kPlanesPerChunk planes, in parallel.
template <typename Body>
void for_each_chunk(const Layout& l, const Body& body) {
  at::parallel_for(0, l.batch * l.chunks_per_sample, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / l.chunks_per_sample;
      const int64_t first = (task % l.chunks_per_sample) * kPlanesPerChunk;
      body(b, task, first, std::min(kPlanesPerChunk, l.planes_per_sample - first));
    }
  });
}

// Runs `body(plane, b)` for every plane, in parallel.
template <typename Body>
void for_each_plane(const Layout& l, const Body& body) {
  const int64_t grain = std::max<int64_t>(1, kElementGrain / std::max<int64_t>(1, l.positions));
  at::parallel_for(0, l.batch * l.planes_per_sample, grain, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) body(plane, plane / l.planes_per_sample);
  });
}

void check_video(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 5, op, ": ", name, " must be (B, C, T, H, W), got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": ", name, " must be floating, got ", x.scalar_type());
  TORCH_CHECK(x.size(3) * x.size(4) <= std::numeric_limits<int32_t>::max(), op, ": H * W must fit in int32");
}

void check_small(const at::Tensor& t, const char* op, const char* name, at::IntArrayRef sizes, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.sizes() == sizes && t.scalar_type() == dtype, op, ": ",
              name, " must be a contiguous CPU tensor of shape ", sizes, " and dtype ", dtype, ", got ", t.sizes(), " ",
              t.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> statistics_forward(const at::Tensor& x) {
  const char* op = "tfam_statistics_cpp";
  check_video(x, op, "x");
  const Layout l = layout_of(x);
  const auto acc_opts = x.options().dtype(accumulation_dtype(x.scalar_type()));
  at::Tensor mean = at::empty({x.size(0), x.size(1), x.size(2)}, acc_opts);
  at::Tensor max = at::empty_like(mean);
  at::Tensor argmax = at::empty_like(mean, mean.options().dtype(at::kInt));
  at::Tensor spatial = at::empty({x.size(0), x.size(3), x.size(4)}, acc_opts);
  at::Tensor partial = at::empty({l.batch, l.chunks_per_sample, l.positions}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tfam_pooling_cpp", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x_ptr = x.data_ptr<scalar_t>();
    acc_t* mean_ptr = mean.data_ptr<acc_t>();
    acc_t* max_ptr = max.data_ptr<acc_t>();
    int32_t* arg_ptr = argmax.data_ptr<int32_t>();
    acc_t* part_ptr = partial.data_ptr<acc_t>();
    const acc_t inv_positions = acc_t(1) / static_cast<acc_t>(l.positions);
    for_each_chunk(l, [&](int64_t b, int64_t task, int64_t first, int64_t planes) {
      const int64_t plane = b * l.planes_per_sample + first;
      StatisticsArgs<scalar_t, acc_t> args{
          x_ptr + plane * l.positions,   mean_ptr + plane, max_ptr + plane, arg_ptr + plane,
          part_ptr + task * l.positions, inv_positions,    planes,          l.positions};
      run_for_this_cpu<StatisticsKernel<scalar_t, acc_t>>(args);
    });
    sum_partials<acc_t>(part_ptr, spatial.data_ptr<acc_t>(), l, acc_t(1) / static_cast<acc_t>(l.frames));
  });
  return {mean, max, spatial, argmax};
}

at::Tensor statistics_backward(const at::Tensor& grad_mean, const at::Tensor& grad_max, const at::Tensor& grad_spatial,
                               const at::Tensor& argmax, const at::Tensor& x) {
  const char* op = "tfam_statistics_cpp_backward";
  check_video(x, op, "x");
  const Layout l = layout_of(x);
  const auto acc = accumulation_dtype(x.scalar_type());
  const std::vector<int64_t> frame_shape{x.size(0), x.size(1), x.size(2)};
  check_small(grad_mean, op, "grad_mean", frame_shape, acc);
  check_small(grad_max, op, "grad_max", frame_shape, acc);
  check_small(argmax, op, "argmax", frame_shape, at::kInt);
  check_small(grad_spatial, op, "grad_spatial", {x.size(0), x.size(3), x.size(4)}, acc);
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tfam_pooling_cpp", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* gm = grad_mean.data_ptr<acc_t>();
    const acc_t* gx = grad_max.data_ptr<acc_t>();
    const acc_t* gs = grad_spatial.data_ptr<acc_t>();
    const int32_t* arg = argmax.data_ptr<int32_t>();
    scalar_t* out = grad_x.data_ptr<scalar_t>();
    const acc_t inv_positions = acc_t(1) / static_cast<acc_t>(l.positions);
    const acc_t inv_frames = acc_t(1) / static_cast<acc_t>(l.frames);
    for_each_plane(l, [&](int64_t plane, int64_t b) {
      StatisticsBackwardArgs<scalar_t, acc_t> args{out + plane * l.positions,
                                                   gs + b * l.positions,
                                                   gm[plane] * inv_positions,
                                                   inv_frames,
                                                   gx[plane],
                                                   arg[plane],
                                                   l.positions};
      run_for_this_cpu<StatisticsBackwardKernel<scalar_t, acc_t>>(args);
    });
  });
  return grad_x;
}

void check_scales(const at::Tensor& x, const at::Tensor& ts, const at::Tensor& ss, const char* op) {
  const auto acc = accumulation_dtype(x.scalar_type());
  check_small(ts, op, "temporal_scale", {x.size(0), x.size(2)}, acc);
  check_small(ss, op, "spatial_scale", {x.size(0), x.size(3), x.size(4)}, acc);
}

at::Tensor combine_forward(const at::Tensor& x, const at::Tensor& temporal_scale, const at::Tensor& spatial_scale) {
  const char* op = "tfam_combine_cpp";
  check_video(x, op, "x");
  check_scales(x, temporal_scale, spatial_scale, op);
  const Layout l = layout_of(x);
  at::Tensor out = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tfam_pooling_cpp", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x_ptr = x.data_ptr<scalar_t>();
    const acc_t* ts = temporal_scale.data_ptr<acc_t>();
    const acc_t* ss = spatial_scale.data_ptr<acc_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    for_each_plane(l, [&](int64_t plane, int64_t b) {
      const acc_t temporal = ts[b * l.frames + plane % l.frames];
      CombineArgs<scalar_t, acc_t> args{x_ptr + plane * l.positions, out_ptr + plane * l.positions,
                                        ss + b * l.positions, temporal, l.positions};
      run_for_this_cpu<CombineKernel<scalar_t, acc_t>>(args);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> combine_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                                const at::Tensor& temporal_scale,
                                                                const at::Tensor& spatial_scale) {
  const char* op = "tfam_combine_cpp_backward";
  check_video(x, op, "x");
  check_video(grad_out, op, "grad_out");
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type(), op,
              ": grad_out must match x in shape and dtype");
  check_scales(x, temporal_scale, spatial_scale, op);
  const Layout l = layout_of(x);
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor plane_sum = at::empty({x.size(0), x.size(1), x.size(2)}, temporal_scale.options());
  at::Tensor partial = at::empty({l.batch, l.chunks_per_sample, l.positions}, spatial_scale.options());
  at::Tensor grad_spatial = at::empty_like(spatial_scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tfam_pooling_cpp", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g_ptr = grad_out.data_ptr<scalar_t>();
    const scalar_t* x_ptr = x.data_ptr<scalar_t>();
    const acc_t* ts = temporal_scale.data_ptr<acc_t>();
    const acc_t* ss = spatial_scale.data_ptr<acc_t>();
    scalar_t* dx_ptr = grad_x.data_ptr<scalar_t>();
    acc_t* sum_ptr = plane_sum.data_ptr<acc_t>();
    acc_t* part_ptr = partial.data_ptr<acc_t>();
    for_each_chunk(l, [&](int64_t b, int64_t task, int64_t first, int64_t planes) {
      const int64_t offset = (b * l.planes_per_sample + first) * l.positions;
      CombineBackwardArgs<scalar_t, acc_t> args{g_ptr + offset,
                                                x_ptr + offset,
                                                ts + b * l.frames,
                                                ss + b * l.positions,
                                                dx_ptr + offset,
                                                sum_ptr + b * l.planes_per_sample + first,
                                                part_ptr + task * l.positions,
                                                first,
                                                planes,
                                                l.frames,
                                                l.positions};
      run_for_this_cpu<CombineBackwardKernel<scalar_t, acc_t>>(args);
    });
    sum_partials<acc_t>(part_ptr, grad_spatial.data_ptr<acc_t>(), l, acc_t(1));
  });
  // (B, C, T) -> (B, T): a reduction over the small per-plane sums.
  return {grad_x, plane_sum.sum(1), grad_spatial};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(piumr_kernels, m) {
  m.def("tfam_statistics_cpp(Tensor x) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "tfam_statistics_cpp_backward(Tensor grad_mean, Tensor grad_max, Tensor grad_spatial, Tensor argmax,"
      " Tensor x) -> Tensor");
  m.def("tfam_combine_cpp(Tensor x, Tensor temporal_scale, Tensor spatial_scale) -> Tensor");
  m.def(
      "tfam_combine_cpp_backward(Tensor grad_out, Tensor x, Tensor temporal_scale, Tensor spatial_scale)"
      " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(piumr_kernels, CPU, m) {
  m.impl("tfam_statistics_cpp", &statistics_forward);
  m.impl("tfam_statistics_cpp_backward", &statistics_backward);
  m.impl("tfam_combine_cpp", &combine_forward);
  m.impl("tfam_combine_cpp_backward", &combine_backward);
}

}  // namespace piumr
