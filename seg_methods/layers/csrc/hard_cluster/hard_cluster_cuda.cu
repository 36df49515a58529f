// CUDA kernels of the hard (k-means) assignment (see hard_cluster.h). One thread per pixel for the
// argmax and the counts, one thread per (pixel, channel) for the scatter-add of the values (atomic,
// so float sums are not bitwise deterministic) and for the gather of the backward. The
// per-element decisions are hard_cluster_utils.h, shared with the CPU kernels; launches go through
// cuda_launch.cuh.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/TensorUtils.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda_launch.cuh"
#include "hard_cluster.h"
#include "hard_cluster_utils.h"

namespace seg_methods {

namespace {

using namespace hard_cluster;
using cuda_launch::blocks_for;
using cuda_launch::launch;
using cuda_launch::thread_index;

// Row b * K + j of the (B, K, Dv) cluster tensors for element e of a (B, HW, Dv) pixel tensor,
// where j = index[b, n] is the cluster of its pixel; -1 when that pixel is unassigned or j is out
// of range (count_kernel has asserted on the latter).
__device__ __forceinline__ int64_t cluster_row(
    const int64_t* __restrict__ index, int64_t e, int64_t K, int64_t HW, int64_t Dv) {
  const int64_t p = e / Dv;  // pixel b * HW + n
  const int64_t j = index[p];
  if (!is_assigned(j) || j >= K) {
    return -1;
  }
  return (p / HW) * K + j;
}

template <typename scalar_t>
__global__ void argmax_kernel(
    const scalar_t* __restrict__ logits, int64_t* __restrict__ index, int64_t B, int64_t K,
    int64_t HW) {
  const int64_t p = thread_index();
  if (p >= B * HW) {
    return;
  }
  const int64_t b = p / HW;
  const int64_t n = p % HW;
  const scalar_t* base = logits + b * K * HW + n;
  scalar_t best = base[0];
  int64_t arg = 0;
  for (int64_t kk = 1; kk < K; ++kk) {
    const scalar_t x = base[kk * HW];
    if (argmax_takes(x, best)) {
      best = x;
      arg = kk;
    }
  }
  index[p] = arg;
}

__global__ void count_kernel(
    const int64_t* __restrict__ index, int64_t* __restrict__ counts, int64_t B, int64_t K,
    int64_t HW) {
  const int64_t p = thread_index();
  if (p >= B * HW) {
    return;
  }
  const int64_t j = index[p];
  if (!is_assigned(j)) {
    return;
  }
  CUDA_KERNEL_ASSERT(j < K);
  const int64_t b = p / HW;
  atomicAdd(reinterpret_cast<unsigned long long*>(counts + b * K + j), 1ULL);
}

template <typename scalar_t>
__global__ void scatter_kernel(
    const int64_t* __restrict__ index,
    const scalar_t* __restrict__ v,
    scalar_t* __restrict__ update,
    int64_t B, int64_t K, int64_t HW, int64_t Dv) {
  const int64_t e = thread_index();
  if (e >= B * HW * Dv) {
    return;
  }
  const int64_t row = cluster_row(index, e, K, HW, Dv);
  if (row >= 0) {
    gpuAtomicAdd(update + row * Dv + e % Dv, v[e]);
  }
}

template <typename scalar_t>
__global__ void normalize_kernel(
    scalar_t* __restrict__ update, const int64_t* __restrict__ counts, int64_t BK, int64_t Dv) {
  const int64_t e = thread_index();
  if (e >= BK * Dv) {
    return;
  }
  update[e] *= update_weight<scalar_t>(counts[e / Dv], /*mean=*/true);
}

template <typename scalar_t>
__global__ void gather_kernel(
    const scalar_t* __restrict__ grad_update, const int64_t* __restrict__ index,
    const int64_t* __restrict__ counts, scalar_t* __restrict__ grad_v, int64_t B, int64_t K,
    int64_t HW, int64_t Dv, bool mean) {
  const int64_t e = thread_index();
  if (e >= B * HW * Dv) {
    return;
  }
  const int64_t row = cluster_row(index, e, K, HW, Dv);
  grad_v[e] = row < 0 ? scalar_t(0)
                      : grad_update[row * Dv + e % Dv] * update_weight<scalar_t>(counts[row], mean);
}

}  // namespace

void hard_cluster_argmax_cuda(const at::Tensor& logits, at::Tensor& index) {
  at::checkAllSameGPU("hard_cluster_argmax_cuda", {{logits, "logits", 1}, {index, "index", 2}});
  c10::cuda::CUDAGuard device_guard(logits.device());
  const int64_t B = logits.size(0), K = logits.size(1), HW = logits.size(2);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "hard_cluster_argmax_cuda", [&] {
    launch(argmax_kernel<scalar_t>, blocks_for(B * HW), logits.const_data_ptr<scalar_t>(),
           index.data_ptr<int64_t>(), B, K, HW);
  });
}

void hard_cluster_reduce_cuda(
    const at::Tensor& index, const at::Tensor& v, bool mean, at::Tensor& update,
    at::Tensor& counts) {
  at::checkAllSameGPU("hard_cluster_reduce_cuda", {{index, "index", 1}, {v, "v", 2}});
  c10::cuda::CUDAGuard device_guard(v.device());
  const int64_t B = v.size(0), HW = v.size(1), Dv = v.size(2), K = counts.size(1);
  launch(count_kernel, blocks_for(B * HW), index.const_data_ptr<int64_t>(),
         counts.data_ptr<int64_t>(), B, K, HW);
  if (update.numel() == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "hard_cluster_reduce_cuda", [&] {
    launch(scatter_kernel<scalar_t>, blocks_for(B * HW * Dv), index.const_data_ptr<int64_t>(),
           v.const_data_ptr<scalar_t>(), update.data_ptr<scalar_t>(), B, K, HW, Dv);
    if (mean) {
      launch(normalize_kernel<scalar_t>, blocks_for(B * K * Dv), update.data_ptr<scalar_t>(),
             counts.const_data_ptr<int64_t>(), B * K, Dv);
    }
  });
}

void hard_cluster_reduce_backward_cuda(
    const at::Tensor& grad_update, const at::Tensor& index, const at::Tensor& counts, bool mean,
    at::Tensor& grad_v) {
  at::checkAllSameGPU(
      "hard_cluster_reduce_backward_cuda",
      {{grad_update, "grad_update", 1}, {index, "index", 2}, {counts, "counts", 3}});
  c10::cuda::CUDAGuard device_guard(grad_update.device());
  const int64_t B = grad_update.size(0), K = grad_update.size(1), Dv = grad_update.size(2);
  const int64_t HW = index.size(1);
  AT_DISPATCH_FLOATING_TYPES(grad_update.scalar_type(), "hard_cluster_reduce_backward_cuda", [&] {
    launch(gather_kernel<scalar_t>, blocks_for(B * HW * Dv), grad_update.const_data_ptr<scalar_t>(),
           index.const_data_ptr<int64_t>(), counts.const_data_ptr<int64_t>(),
           grad_v.data_ptr<scalar_t>(), B, K, HW, Dv, mean);
  });
}

}  // namespace seg_methods
