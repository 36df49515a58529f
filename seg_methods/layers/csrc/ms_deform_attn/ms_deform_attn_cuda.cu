// CUDA kernels of multi-scale deformable attention sampling. Shapes: see ms_deform_attn.h.
// Corner weights and per-point gradients come from ms_deform_attn_utils.h, shared with the CPU.
//
// - forward: one thread per output element (n, q, m, d); consecutive threads read consecutive
//   channels of a value row (coalesced) and accumulate over levels and points in a register.
// - backward: one thread per sampling point (n, q, m, l, p). It walks the D channels once, forming
//   the four dot products <grad_out, v_c> (for grad_attn and grad_loc, written without atomics
//   since the thread owns its point) and scattering attn * weight_c * grad_out into grad_value with
//   atomicAdd (several points may hit the same pixel).
// Both kernels use grid-stride loops; launches go through cuda_launch.cuh.
#include <ATen/Dispatch.h>
#include <ATen/TensorUtils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/types.h>

#include <ATen/cuda/Atomic.cuh>
#include <vector>

#include "cuda_launch.cuh"
#include "ms_deform_attn.h"
#include "ms_deform_attn_utils.h"

namespace seg_methods {

namespace {

using ms_deform_attn::bilinear_sample;
using ms_deform_attn::BilinearSample;
using ms_deform_attn::point_gradients;
using cuda_launch::grid_size;
using cuda_launch::grid_stride_blocks;
using cuda_launch::launch;
using cuda_launch::thread_index;

template <typename T>
__global__ void ms_deform_attn_forward_kernel(const T* __restrict__ value,
                                              const int64_t* __restrict__ shapes,
                                              const int64_t* __restrict__ starts,
                                              const T* __restrict__ loc, const T* __restrict__ attn,
                                              T* __restrict__ out,
                                              int64_t total,  // N * Lq * M * D
                                              int64_t S, int64_t M, int64_t D, int64_t Lq,
                                              int64_t L, int64_t P) {
  const int64_t row = M * D;
  for (int64_t idx = thread_index(); idx < total; idx += grid_size()) {
    const int64_t d = idx % D;
    const int64_t nqm = idx / D;  // ((n * Lq + q) * M + m)
    const int64_t m = nqm % M;
    const int64_t n = nqm / (M * Lq);
    const T* value_nmd = value + n * S * row + m * D + d;
    const int64_t point0 = nqm * L * P;
    BilinearSample<T> s;
    T acc = T(0);
    for (int64_t l = 0; l < L; ++l) {
      const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
      const T* value_l = value_nmd + starts[l] * row;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t pt = point0 + l * P + p;
        if (!bilinear_sample(loc[2 * pt], loc[2 * pt + 1], H, W, s)) {
          continue;
        }
        T sampled = T(0);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          if (s.valid[c]) {
            sampled += s.weight[c] * value_l[s.offset[c] * row];
          }
        }
        acc += attn[pt] * sampled;
      }
    }
    out[idx] = acc;
  }
}

template <typename T>
__global__ void ms_deform_attn_backward_kernel(
    const T* __restrict__ value, const int64_t* __restrict__ shapes,
    const int64_t* __restrict__ starts, const T* __restrict__ loc, const T* __restrict__ attn,
    const T* __restrict__ grad_out, T* __restrict__ grad_value, T* __restrict__ grad_loc,
    T* __restrict__ grad_attn,
    int64_t total,  // N * Lq * M * L * P
    int64_t S, int64_t M, int64_t D, int64_t Lq, int64_t L, int64_t P) {
  const int64_t row = M * D;
  for (int64_t pt = thread_index(); pt < total; pt += grid_size()) {
    const int64_t l = (pt / P) % L;
    const int64_t nqm = pt / (L * P);  // ((n * Lq + q) * M + m)
    const int64_t m = nqm % M;
    const int64_t n = nqm / (M * Lq);
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
    BilinearSample<T> s;
    if (!bilinear_sample(loc[2 * pt], loc[2 * pt + 1], H, W, s)) {
      grad_attn[pt] = T(0);
      grad_loc[2 * pt] = T(0);
      grad_loc[2 * pt + 1] = T(0);
      continue;
    }
    const T a = attn[pt];
    const int64_t base = (n * S + starts[l]) * row + m * D;
    const T* g = grad_out + nqm * D;
    T dots[4] = {T(0), T(0), T(0), T(0)};
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      if (!s.valid[c]) {
        continue;
      }
      const T* v = value + base + s.offset[c] * row;
      T* gv = grad_value + base + s.offset[c] * row;
      const T aw = a * s.weight[c];
      T dot = T(0);
      for (int64_t d = 0; d < D; ++d) {
        const T gd = g[d];
        dot += gd * v[d];
        gpuAtomicAdd(gv + d, aw * gd);
      }
      dots[c] = dot;
    }
    point_gradients(s, dots, a, H, W, &grad_attn[pt], &grad_loc[2 * pt], &grad_loc[2 * pt + 1]);
  }
}

void check_same_gpu(const char* name, std::initializer_list<at::Tensor> tensors) {
  std::vector<at::TensorArg> args;
  int pos = 1;
  for (const at::Tensor& t : tensors) {
    args.emplace_back(t, "input", pos++);
  }
  at::checkAllSameGPU(name, args);
}

}  // namespace

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  check_same_gpu("ms_deform_attn_forward_cuda",
                 {value, spatial_shapes, level_start_index, sampling_locations, attention_weights});
  c10::cuda::CUDAGuard device_guard(value.device());
  const int64_t N = value.size(0), S = value.size(1), M = value.size(2), D = value.size(3);
  const int64_t Lq = sampling_locations.size(1), L = sampling_locations.size(3),
                P = sampling_locations.size(4);
  at::Tensor output = at::empty({N, Lq, M * D}, value.options());
  const int64_t total = output.numel();
  if (total == 0) {
    return output;
  }
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    launch(ms_deform_attn_forward_kernel<scalar_t>, grid_stride_blocks(total),
           value.const_data_ptr<scalar_t>(), spatial_shapes.const_data_ptr<int64_t>(),
           level_start_index.const_data_ptr<int64_t>(),
           sampling_locations.const_data_ptr<scalar_t>(),
           attention_weights.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), total,
           S, M, D, Lq, L, P);
  });
  return output;
}

std::vector<at::Tensor> ms_deform_attn_backward_cuda(const at::Tensor& value,
                                                     const at::Tensor& spatial_shapes,
                                                     const at::Tensor& level_start_index,
                                                     const at::Tensor& sampling_locations,
                                                     const at::Tensor& attention_weights,
                                                     const at::Tensor& grad_output) {
  check_same_gpu("ms_deform_attn_backward_cuda",
                 {value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                  grad_output});
  c10::cuda::CUDAGuard device_guard(value.device());
  const int64_t S = value.size(1), M = value.size(2), D = value.size(3);
  const int64_t Lq = sampling_locations.size(1), L = sampling_locations.size(3),
                P = sampling_locations.size(4);
  // grad_value is accumulated with atomics and must start at zero; every point's grad_loc and
  // grad_attn entry is written by its thread.
  at::Tensor grad_value = at::zeros_like(value);
  at::Tensor grad_loc = at::empty_like(sampling_locations);
  at::Tensor grad_attn = at::empty_like(attention_weights);
  const int64_t total = grad_attn.numel();
  if (total == 0) {
    return {grad_value, grad_loc, grad_attn};
  }
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
    launch(ms_deform_attn_backward_kernel<scalar_t>, grid_stride_blocks(total),
           value.const_data_ptr<scalar_t>(), spatial_shapes.const_data_ptr<int64_t>(),
           level_start_index.const_data_ptr<int64_t>(),
           sampling_locations.const_data_ptr<scalar_t>(),
           attention_weights.const_data_ptr<scalar_t>(), grad_output.const_data_ptr<scalar_t>(),
           grad_value.mutable_data_ptr<scalar_t>(), grad_loc.mutable_data_ptr<scalar_t>(),
           grad_attn.mutable_data_ptr<scalar_t>(), total, S, M, D, Lq, L, P);
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace seg_methods
