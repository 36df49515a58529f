// CUDA kernels of the hard (k-means) assignment (see hard_cluster.h). One thread per pixel for the
// argmax and the counts, one thread per (pixel, channel) for the scatter-add of the values (atomic,
// so float sums are not bitwise deterministic) and for the gather of the backward. The
// per-element decisions are hard_cluster_utils.h, shared with the CPU kernels. The stream comes
// from c10/cuda/CUDAStream.h: ATen/cuda/CUDAContext.h pulls in cuSPARSE/cuBLAS headers that a
// bare toolkit may lack.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/TensorUtils.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "hard_cluster.h"
#include "hard_cluster_utils.h"

namespace seg_methods {

namespace {

using namespace hard_cluster;

constexpr int kThreads = 256;

inline unsigned int num_blocks(int64_t n) {
  return static_cast<unsigned int>((n + kThreads - 1) / kThreads);
}

template <typename scalar_t>
__global__ void argmax_kernel(
    const scalar_t* __restrict__ logits, int64_t* __restrict__ index, int64_t B, int64_t K,
    int64_t HW) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
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
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
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
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= B * HW * Dv) {
    return;
  }
  const int64_t p = e / Dv;
  const int64_t d = e % Dv;
  const int64_t j = index[p];
  if (!is_assigned(j) || j >= K) {
    return;
  }
  const int64_t b = p / HW;
  gpuAtomicAdd(update + (b * K + j) * Dv + d, v[e]);
}

template <typename scalar_t>
__global__ void normalize_kernel(
    scalar_t* __restrict__ update, const int64_t* __restrict__ counts, int64_t BK, int64_t Dv) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
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
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= B * HW * Dv) {
    return;
  }
  const int64_t p = e / Dv;
  const int64_t d = e % Dv;
  const int64_t j = index[p];
  if (!is_assigned(j) || j >= K) {
    grad_v[e] = scalar_t(0);
    return;
  }
  const int64_t b = p / HW;
  grad_v[e] = grad_update[(b * K + j) * Dv + d] * update_weight<scalar_t>(counts[b * K + j], mean);
}

}  // namespace

at::Tensor hard_cluster_argmax_cuda(const at::Tensor& logits) {
  c10::cuda::CUDAGuard device_guard(logits.device());
  const int64_t B = logits.size(0), K = logits.size(1), HW = logits.size(2);
  at::Tensor index = at::empty({B, HW}, logits.options().dtype(at::kLong));
  if (K == 0) {
    return index.fill_(-1);
  }
  if (index.numel() == 0) {
    return index;
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "hard_cluster_argmax_cuda", [&] {
    argmax_kernel<scalar_t><<<num_blocks(B * HW), kThreads, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), index.data_ptr<int64_t>(), B, K, HW);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return index;
}

std::tuple<at::Tensor, at::Tensor> hard_cluster_reduce_cuda(
    const at::Tensor& index, const at::Tensor& v, int64_t num_clusters, bool mean) {
  at::checkAllSameGPU("hard_cluster_reduce_cuda", {{index, "index", 1}, {v, "v", 2}});
  c10::cuda::CUDAGuard device_guard(v.device());
  const int64_t B = v.size(0), HW = v.size(1), Dv = v.size(2), K = num_clusters;
  at::Tensor counts = at::zeros({B, K}, v.options().dtype(at::kLong));
  at::Tensor update = at::zeros({B, K, Dv}, v.options());
  if (B * HW == 0) {
    return {update, counts};
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  count_kernel<<<num_blocks(B * HW), kThreads, 0, stream>>>(
      index.const_data_ptr<int64_t>(), counts.data_ptr<int64_t>(), B, K, HW);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (update.numel() == 0) {
    return {update, counts};
  }
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "hard_cluster_reduce_cuda", [&] {
    scatter_kernel<scalar_t><<<num_blocks(B * HW * Dv), kThreads, 0, stream>>>(
        index.const_data_ptr<int64_t>(), v.const_data_ptr<scalar_t>(),
        update.data_ptr<scalar_t>(), B, K, HW, Dv);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (mean) {
      normalize_kernel<scalar_t><<<num_blocks(B * K * Dv), kThreads, 0, stream>>>(
          update.data_ptr<scalar_t>(), counts.const_data_ptr<int64_t>(), B * K, Dv);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {update, counts};
}

at::Tensor hard_cluster_reduce_backward_cuda(
    const at::Tensor& grad_update, const at::Tensor& index, const at::Tensor& counts, bool mean) {
  at::checkAllSameGPU(
      "hard_cluster_reduce_backward_cuda",
      {{grad_update, "grad_update", 1}, {index, "index", 2}, {counts, "counts", 3}});
  c10::cuda::CUDAGuard device_guard(grad_update.device());
  const int64_t B = grad_update.size(0), K = grad_update.size(1), Dv = grad_update.size(2);
  const int64_t HW = index.size(1);
  at::Tensor grad_v = at::empty({B, HW, Dv}, grad_update.options());
  if (grad_v.numel() == 0) {
    return grad_v;
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(grad_update.scalar_type(), "hard_cluster_reduce_backward_cuda", [&] {
    gather_kernel<scalar_t><<<num_blocks(B * HW * Dv), kThreads, 0, stream>>>(
        grad_update.const_data_ptr<scalar_t>(), index.const_data_ptr<int64_t>(),
        counts.const_data_ptr<int64_t>(), grad_v.data_ptr<scalar_t>(), B, K, HW, Dv, mean);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_v;
}

}  // namespace seg_methods
