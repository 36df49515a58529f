// CPU kernels of multi-scale deformable attention sampling. Shapes: see ms_deform_attn.h.
//
// Layout of the work:
// - forward: parallel over (n, query); for each head, level and point the corner weights are
//   computed once (ms_deform_attn_utils.h) and applied to the D contiguous channels of the four
//   corner rows of `value`, accumulating straight into the output row.
// - backward: parallel over (n, head). grad_value[n, :, m, :] is written only by the task owning
//   (n, m), so the scatter-add needs neither atomics nor per-thread copies. Each point computes the
//   four dot products <grad_out, v_c> and the four grad_value updates in one pass over D.
// The channel loops use __restrict__ pointers and independent lane accumulators so that they
// vectorize without -ffast-math (a plain float reduction would not, as it needs reassociation).
// On x86-64 they are compiled for the baseline ISA and for AVX2+FMA, chosen at run time.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/types.h>

#include <algorithm>
#include <vector>

#include "ms_deform_attn.h"
#include "ms_deform_attn_utils.h"

// Hot loops are compiled twice on x86-64 with GCC/Clang: for the baseline ISA and for AVX2+FMA,
// picked at run time. Helpers are force-inlined so each copy gets the caller's instruction set.
// Define MSDA_X86_MULTIVERSION=0 to build the baseline path only.
#ifndef MSDA_X86_MULTIVERSION
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define MSDA_X86_MULTIVERSION 1
#else
#define MSDA_X86_MULTIVERSION 0
#endif
#endif

#if defined(__GNUC__) || defined(__clang__)
#define MSDA_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define MSDA_ALWAYS_INLINE inline
#endif

namespace seg_methods {

namespace {

using ms_deform_attn::bilinear_sample;
using ms_deform_attn::BilinearSample;
using ms_deform_attn::point_gradients;

// Independent partial sums per lane let the compiler vectorize dot products exactly.
constexpr int kLanes = 8;

// out[d] += w0 * v0[d] + w1 * v1[d] + w2 * v2[d] + w3 * v3[d]
template <typename T>
MSDA_ALWAYS_INLINE void axpy4(int64_t D, T* __restrict__ out, const T* __restrict__ v0,
                              const T* __restrict__ v1, const T* __restrict__ v2,
                              const T* __restrict__ v3, T w0, T w1, T w2, T w3) {
  for (int64_t d = 0; d < D; ++d) {
    out[d] += w0 * v0[d] + w1 * v1[d] + w2 * v2[d] + w3 * v3[d];
  }
}

// out[d] += w * v[d]
template <typename T>
MSDA_ALWAYS_INLINE void axpy1(int64_t D, T* __restrict__ out, const T* __restrict__ v, T w) {
  for (int64_t d = 0; d < D; ++d) {
    out[d] += w * v[d];
  }
}

// One pass over D for a point whose four corners are inside the map:
//   dots[c] = <g, v_c>,   gv_c[d] += a_c * g[d]
template <typename T>
MSDA_ALWAYS_INLINE void dot_axpy4(int64_t D, const T* __restrict__ g, const T* __restrict__ v0,
                                  const T* __restrict__ v1, const T* __restrict__ v2,
                                  const T* __restrict__ v3, T* __restrict__ gv0,
                                  T* __restrict__ gv1, T* __restrict__ gv2, T* __restrict__ gv3,
                                  T a0, T a1, T a2, T a3, T dots[4]) {
  T s0[kLanes], s1[kLanes], s2[kLanes], s3[kLanes];
  for (int k = 0; k < kLanes; ++k) {
    s0[k] = s1[k] = s2[k] = s3[k] = T(0);
  }
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const T gd = g[d + k];
      s0[k] += gd * v0[d + k];
      s1[k] += gd * v1[d + k];
      s2[k] += gd * v2[d + k];
      s3[k] += gd * v3[d + k];
      gv0[d + k] += a0 * gd;
      gv1[d + k] += a1 * gd;
      gv2[d + k] += a2 * gd;
      gv3[d + k] += a3 * gd;
    }
  }
  T t0 = T(0), t1 = T(0), t2 = T(0), t3 = T(0);
  for (; d < D; ++d) {
    const T gd = g[d];
    t0 += gd * v0[d];
    t1 += gd * v1[d];
    t2 += gd * v2[d];
    t3 += gd * v3[d];
    gv0[d] += a0 * gd;
    gv1[d] += a1 * gd;
    gv2[d] += a2 * gd;
    gv3[d] += a3 * gd;
  }
  for (int k = 0; k < kLanes; ++k) {
    t0 += s0[k];
    t1 += s1[k];
    t2 += s2[k];
    t3 += s3[k];
  }
  dots[0] = t0;
  dots[1] = t1;
  dots[2] = t2;
  dots[3] = t3;
}

// Single-corner version for points on the border of the map: returns <g, v>, gv[d] += a * g[d].
template <typename T>
MSDA_ALWAYS_INLINE T dot_axpy1(int64_t D, const T* __restrict__ g, const T* __restrict__ v,
                               T* __restrict__ gv, T a) {
  T s[kLanes];
  for (int k = 0; k < kLanes; ++k) {
    s[k] = T(0);
  }
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const T gd = g[d + k];
      s[k] += gd * v[d + k];
      gv[d + k] += a * gd;
    }
  }
  T t = T(0);
  for (; d < D; ++d) {
    t += g[d] * v[d];
    gv[d] += a * g[d];
  }
  for (int k = 0; k < kLanes; ++k) {
    t += s[k];
  }
  return t;
}

struct Sizes {
  int64_t N, S, M, D, Lq, L, P;
};

Sizes get_sizes(const at::Tensor& value, const at::Tensor& sampling_locations) {
  Sizes z;
  z.N = value.size(0);
  z.S = value.size(1);
  z.M = value.size(2);
  z.D = value.size(3);
  z.Lq = sampling_locations.size(1);
  z.L = sampling_locations.size(3);
  z.P = sampling_locations.size(4);
  return z;
}

template <typename T>
struct Args {
  const T* value;         // (N, S, M, D)
  const int64_t* shapes;  // (L, 2)
  const int64_t* starts;  // (L,)
  const T* loc;           // (N, Lq, M, L, P, 2)
  const T* attn;          // (N, Lq, M, L, P)
  const T* grad_out;      // (N, Lq, M, D), backward only
  T* out;                 // (N, Lq, M, D), forward only
  T* grad_value;          // (N, S, M, D), backward only
  T* grad_loc;            // (N, Lq, M, L, P, 2), backward only
  T* grad_attn;           // (N, Lq, M, L, P), backward only
  Sizes z;
};

// Forward for the (n, query) items [begin, end).
template <typename T>
MSDA_ALWAYS_INLINE void forward_range(const Args<T>& A, int64_t begin, int64_t end) {
  const Sizes& z = A.z;
  const int64_t row = z.M * z.D;  // stride between consecutive pixels of `value`
  BilinearSample<T> s;
  for (int64_t nq = begin; nq < end; ++nq) {
    const int64_t n = nq / z.Lq;
    const T* value_n = A.value + n * z.S * row;
    for (int64_t m = 0; m < z.M; ++m) {
      T* o = A.out + (nq * z.M + m) * z.D;
      std::fill(o, o + z.D, T(0));
      const T* value_nm = value_n + m * z.D;
      const int64_t point0 = (nq * z.M + m) * z.L * z.P;
      for (int64_t l = 0; l < z.L; ++l) {
        const int64_t H = A.shapes[2 * l], W = A.shapes[2 * l + 1];
        const T* value_l = value_nm + A.starts[l] * row;
        for (int64_t p = 0; p < z.P; ++p) {
          const int64_t pt = point0 + l * z.P + p;
          if (!bilinear_sample(A.loc[2 * pt], A.loc[2 * pt + 1], H, W, s)) {
            continue;
          }
          const T a = A.attn[pt];
          if (s.all_valid) {
            axpy4(z.D, o, value_l + s.offset[0] * row, value_l + s.offset[1] * row,
                  value_l + s.offset[2] * row, value_l + s.offset[3] * row, a * s.weight[0],
                  a * s.weight[1], a * s.weight[2], a * s.weight[3]);
          } else {
            for (int c = 0; c < 4; ++c) {
              if (s.valid[c]) {
                axpy1(z.D, o, value_l + s.offset[c] * row, a * s.weight[c]);
              }
            }
          }
        }
      }
    }
  }
}

// Backward for the (n, head) items [begin, end).
template <typename T>
MSDA_ALWAYS_INLINE void backward_range(const Args<T>& A, int64_t begin, int64_t end) {
  const Sizes& z = A.z;
  const int64_t row = z.M * z.D;
  BilinearSample<T> s;
  T dots[4];
  for (int64_t nm = begin; nm < end; ++nm) {
    const int64_t n = nm / z.M, m = nm % z.M;
    const T* value_nm = A.value + n * z.S * row + m * z.D;
    T* grad_value_nm = A.grad_value + n * z.S * row + m * z.D;
    for (int64_t q = 0; q < z.Lq; ++q) {
      const int64_t nqm = (n * z.Lq + q) * z.M + m;
      const T* g = A.grad_out + nqm * z.D;
      const int64_t point0 = nqm * z.L * z.P;
      for (int64_t l = 0; l < z.L; ++l) {
        const int64_t H = A.shapes[2 * l], W = A.shapes[2 * l + 1];
        const T* value_l = value_nm + A.starts[l] * row;
        T* grad_value_l = grad_value_nm + A.starts[l] * row;
        for (int64_t p = 0; p < z.P; ++p) {
          const int64_t pt = point0 + l * z.P + p;
          // grad_loc and grad_attn were zero-initialized: points fully outside keep 0.
          if (!bilinear_sample(A.loc[2 * pt], A.loc[2 * pt + 1], H, W, s)) {
            continue;
          }
          const T a = A.attn[pt];
          if (s.all_valid) {
            dot_axpy4(z.D, g, value_l + s.offset[0] * row, value_l + s.offset[1] * row,
                      value_l + s.offset[2] * row, value_l + s.offset[3] * row,
                      grad_value_l + s.offset[0] * row, grad_value_l + s.offset[1] * row,
                      grad_value_l + s.offset[2] * row, grad_value_l + s.offset[3] * row,
                      a * s.weight[0], a * s.weight[1], a * s.weight[2], a * s.weight[3], dots);
          } else {
            for (int c = 0; c < 4; ++c) {
              dots[c] = s.valid[c] ? dot_axpy1(z.D, g, value_l + s.offset[c] * row,
                                               grad_value_l + s.offset[c] * row, a * s.weight[c])
                                   : T(0);
            }
          }
          point_gradients(s, dots, a, H, W, &A.grad_attn[pt], &A.grad_loc[2 * pt],
                          &A.grad_loc[2 * pt + 1]);
        }
      }
    }
  }
}

// The range loops as types, so that one template compiles each of them per instruction set.
struct ForwardRange {
  template <typename T>
  static MSDA_ALWAYS_INLINE void run(const Args<T>& A, int64_t begin, int64_t end) {
    forward_range(A, begin, end);
  }
};
struct BackwardRange {
  template <typename T>
  static MSDA_ALWAYS_INLINE void run(const Args<T>& A, int64_t begin, int64_t end) {
    backward_range(A, begin, end);
  }
};

// Baseline instruction set (SSE2 on x86-64, whatever the build targets elsewhere).
template <typename Range, typename T>
void range_default(const Args<T>& A, int64_t begin, int64_t end) {
  Range::run(A, begin, end);
}

#if MSDA_X86_MULTIVERSION
// The same loops compiled for AVX2 + FMA (8 floats per instruction instead of 4), chosen at run
// time when the CPU supports them, so the default build flags stay portable.
template <typename Range, typename T>
__attribute__((target("avx2,fma"))) void range_avx2(const Args<T>& A, int64_t begin,
                                                    int64_t end) {
  Range::run(A, begin, end);
}

bool cpu_has_avx2_fma() {
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return supported;
}
#endif

// Range::run over the items [0, total) with at::parallel_for, in the AVX2 + FMA build when the
// CPU has it.
template <typename Range, typename T>
void parallel_for_isa(const Args<T>& A, int64_t total, int64_t grain) {
#if MSDA_X86_MULTIVERSION
  const bool avx2 = cpu_has_avx2_fma();
#endif
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
#if MSDA_X86_MULTIVERSION
    if (avx2) {
      range_avx2<Range>(A, begin, end);
      return;
    }
#endif
    range_default<Range>(A, begin, end);
  });
}

template <typename T>
void forward_kernel(const Args<T>& A) {
  const Sizes& z = A.z;
  const int64_t work_per_query = std::max<int64_t>(1, z.M * z.L * z.P * z.D);
  const int64_t grain = std::max<int64_t>(1, 32768 / work_per_query);
  parallel_for_isa<ForwardRange>(A, z.N * z.Lq, grain);
}

template <typename T>
void backward_kernel(const Args<T>& A) {
  // (n, head) tasks are coarse; parallelize whenever there are at least two.
  parallel_for_isa<BackwardRange>(A, A.z.N * A.z.M, 1);
}

// Args with the inputs and sizes shared by the forward and the backward; outputs left null.
template <typename T>
Args<T> input_args(const at::Tensor& value, const at::Tensor& spatial_shapes,
                   const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                   const at::Tensor& attention_weights) {
  Args<T> A{};
  A.value = value.const_data_ptr<T>();
  A.shapes = spatial_shapes.const_data_ptr<int64_t>();
  A.starts = level_start_index.const_data_ptr<int64_t>();
  A.loc = sampling_locations.const_data_ptr<T>();
  A.attn = attention_weights.const_data_ptr<T>();
  A.z = get_sizes(value, sampling_locations);
  return A;
}

}  // namespace

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  const Sizes z = get_sizes(value, sampling_locations);
  at::Tensor output = at::empty({z.N, z.Lq, z.M * z.D}, value.options());
  if (output.numel() == 0) {
    return output;
  }
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    Args<scalar_t> A = input_args<scalar_t>(value, spatial_shapes, level_start_index,
                                            sampling_locations, attention_weights);
    A.out = output.mutable_data_ptr<scalar_t>();
    forward_kernel(A);
  });
  return output;
}

std::vector<at::Tensor> ms_deform_attn_backward_cpu(const at::Tensor& value,
                                                    const at::Tensor& spatial_shapes,
                                                    const at::Tensor& level_start_index,
                                                    const at::Tensor& sampling_locations,
                                                    const at::Tensor& attention_weights,
                                                    const at::Tensor& grad_output) {
  const Sizes z = get_sizes(value, sampling_locations);
  at::Tensor grad_value = at::zeros_like(value);
  at::Tensor grad_loc = at::zeros_like(sampling_locations);
  at::Tensor grad_attn = at::zeros_like(attention_weights);
  if (grad_attn.numel() == 0 || z.D == 0) {
    return {grad_value, grad_loc, grad_attn};
  }
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    Args<scalar_t> A = input_args<scalar_t>(value, spatial_shapes, level_start_index,
                                            sampling_locations, attention_weights);
    A.grad_out = grad_output.const_data_ptr<scalar_t>();
    A.grad_value = grad_value.mutable_data_ptr<scalar_t>();
    A.grad_loc = grad_loc.mutable_data_ptr<scalar_t>();
    A.grad_attn = grad_attn.mutable_data_ptr<scalar_t>();
    backward_kernel(A);
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace seg_methods
