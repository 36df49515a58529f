// CUDA kernels of the per-pixel softmax over the cluster axis on one (B, K, T) tile (see
// soft_cluster.h). One thread handles one pixel and loops over the K clusters; consecutive threads
// read consecutive pixels of a cluster row, so the accesses are coalesced. The math is
// soft_cluster_utils.h, shared with the CPU kernels; launches go through cuda_launch.cuh.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/TensorUtils.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda_launch.cuh"
#include "soft_cluster.h"
#include "soft_cluster_utils.h"

namespace seg_methods {

namespace {

using namespace soft_cluster;
using cuda_launch::blocks_for;
using cuda_launch::launch;
using cuda_launch::thread_index;

// Offset of element (b, 0, t) in a (B, K, T) tile, for the pixel idx = b * T + t.
__device__ __forceinline__ int64_t pixel_offset(int64_t idx, int64_t K, int64_t T) {
  return (idx / T) * K * T + idx % T;
}

template <typename scalar_t>
__global__ void tile_softmax_kernel(
    scalar_t* __restrict__ tile, scalar_t* __restrict__ lse, int64_t B, int64_t K, int64_t T) {
  const int64_t idx = thread_index();
  if (idx >= B * T) {
    return;
  }
  scalar_t* base = tile + pixel_offset(idx, K, T);
  scalar_t run_max = lowest_value<scalar_t>();
  for (int64_t kk = 0; kk < K; ++kk) {
    run_max = max_update(run_max, base[kk * T]);
  }
  scalar_t run_sum = scalar_t(0);
  for (int64_t kk = 0; kk < K; ++kk) {
    const scalar_t e = shifted_exp(base[kk * T], run_max);
    base[kk * T] = e;
    run_sum += e;
  }
  lse[idx] = log_sum_exp(run_max, run_sum);
  const scalar_t inv = inverse_sum(run_sum);
  for (int64_t kk = 0; kk < K; ++kk) {
    base[kk * T] *= inv;
  }
}

template <typename scalar_t>
__global__ void tile_recompute_kernel(
    scalar_t* __restrict__ tile,
    const scalar_t* __restrict__ lse,
    int64_t B,
    int64_t K,
    int64_t T) {
  const int64_t idx = thread_index();
  if (idx >= B * T) {
    return;
  }
  scalar_t* base = tile + pixel_offset(idx, K, T);
  const scalar_t pixel_lse = lse[idx];
  for (int64_t kk = 0; kk < K; ++kk) {
    base[kk * T] = prob_from_lse(base[kk * T], pixel_lse);
  }
}

template <typename scalar_t>
__global__ void tile_softmax_backward_kernel(
    const scalar_t* __restrict__ prob,
    scalar_t* __restrict__ grad,
    const scalar_t* __restrict__ extra,
    int64_t B,
    int64_t K,
    int64_t T) {
  const int64_t idx = thread_index();
  if (idx >= B * T) {
    return;
  }
  const int64_t offset = pixel_offset(idx, K, T);
  scalar_t dot = scalar_t(0);
  for (int64_t kk = 0; kk < K; ++kk) {
    dot += prob[offset + kk * T] * grad[offset + kk * T];
  }
  for (int64_t kk = 0; kk < K; ++kk) {
    const int64_t i = offset + kk * T;
    scalar_t g = softmax_grad(prob[i], grad[i], dot);
    if (extra != nullptr) {
      g += extra[i];
    }
    grad[i] = g;
  }
}

}  // namespace

void soft_cluster_tile_softmax_cuda(at::Tensor& tile, at::Tensor& lse) {
  at::checkAllSameGPU("soft_cluster_tile_softmax_cuda", {{tile, "tile", 1}, {lse, "lse", 2}});
  c10::cuda::CUDAGuard device_guard(tile.device());
  const int64_t B = tile.size(0), K = tile.size(1), T = tile.size(2);
  if (B * T == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "soft_cluster_tile_softmax_cuda", [&] {
    launch(tile_softmax_kernel<scalar_t>, blocks_for(B * T), tile.data_ptr<scalar_t>(),
           lse.data_ptr<scalar_t>(), B, K, T);
  });
}

void soft_cluster_tile_recompute_cuda(at::Tensor& tile, const at::Tensor& lse) {
  at::checkAllSameGPU("soft_cluster_tile_recompute_cuda", {{tile, "tile", 1}, {lse, "lse", 2}});
  c10::cuda::CUDAGuard device_guard(tile.device());
  const int64_t B = tile.size(0), K = tile.size(1), T = tile.size(2);
  if (tile.numel() == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "soft_cluster_tile_recompute_cuda", [&] {
    launch(tile_recompute_kernel<scalar_t>, blocks_for(B * T), tile.data_ptr<scalar_t>(),
           lse.const_data_ptr<scalar_t>(), B, K, T);
  });
}

void soft_cluster_tile_softmax_backward_cuda(
    const at::Tensor& prob, at::Tensor& grad, const std::optional<at::Tensor>& extra) {
  at::checkAllSameGPU(
      "soft_cluster_tile_softmax_backward_cuda", {{prob, "prob", 1}, {grad, "grad", 2}});
  if (extra.has_value()) {
    at::checkAllSameGPU(
        "soft_cluster_tile_softmax_backward_cuda", {{prob, "prob", 1}, {*extra, "extra", 3}});
  }
  c10::cuda::CUDAGuard device_guard(prob.device());
  const int64_t B = prob.size(0), K = prob.size(1), T = prob.size(2);
  if (prob.numel() == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(prob.scalar_type(), "soft_cluster_tile_softmax_backward_cuda", [&] {
    launch(tile_softmax_backward_kernel<scalar_t>, blocks_for(B * T),
           prob.const_data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
           extra.has_value() ? extra->const_data_ptr<scalar_t>() : nullptr, B, K, T);
  });
}

}  // namespace seg_methods
