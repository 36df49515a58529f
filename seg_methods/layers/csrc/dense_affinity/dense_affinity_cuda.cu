// CUDA kernel of the "direct" backend of the dense affinity apply (see dense_affinity.h):
//     y[r, p] = residual[r, p] + sum_j a[j, r] * x[j, p]
// One thread per output element in a grid-stride loop; consecutive threads take consecutive pixels
// of one row, so the reads of x, residual and the writes of y are coalesced and a[j, r] is the same
// for the whole warp (a broadcast). The math is dense_affinity_utils.h, shared with the CPU kernel;
// launches go through cuda_launch.cuh. Not measured on a GPU (none here): the GEMM backend, which
// runs cuBLAS, is the default.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/TensorUtils.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda_launch.cuh"
#include "dense_affinity.h"
#include "dense_affinity_utils.h"

namespace seg_methods {

namespace {

using namespace dense_affinity;
using cuda_launch::grid_size;
using cuda_launch::grid_stride_blocks;
using cuda_launch::launch;
using cuda_launch::thread_index;

template <typename scalar_t>
__global__ void apply_direct_kernel(
    scalar_t* __restrict__ y,
    const scalar_t* __restrict__ a,
    const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ residual,
    int64_t rows,
    int64_t J,
    int64_t P) {
  const int64_t total = rows * P;
  for (int64_t idx = thread_index(); idx < total; idx += grid_size()) {
    const int64_t r = idx / P;
    const int64_t p = idx - r * P;
    scalar_t acc = residual_init(residual, idx);
    for (int64_t j = 0; j < J; ++j) {
      acc = multiply_add(acc, a[j * rows + r], x[j * P + p]);
    }
    y[idx] = acc;
  }
}

}  // namespace

void dense_affinity_apply_direct_cuda(
    at::Tensor& y,
    const at::Tensor& a,
    const at::Tensor& x,
    const std::optional<at::Tensor>& residual) {
  at::checkAllSameGPU(
      "dense_affinity_apply_direct_cuda", {{y, "y", 1}, {a, "a", 2}, {x, "x", 3}});
  if (residual.has_value()) {
    at::checkAllSameGPU(
        "dense_affinity_apply_direct_cuda", {{y, "y", 1}, {*residual, "residual", 4}});
  }
  TORCH_CHECK(
      y.is_contiguous() && a.is_contiguous() && x.is_contiguous() &&
          (!residual.has_value() || residual->is_contiguous()),
      "dense_affinity_apply_direct_cuda: expected contiguous tensors");
  c10::cuda::CUDAGuard device_guard(y.device());
  const int64_t rows = y.size(0), P = y.size(1), J = a.size(0);
  TORCH_CHECK(
      a.size(1) == rows && x.size(0) == J && x.size(1) == P,
      "dense_affinity_apply_direct_cuda: shapes y ", y.sizes(), ", a ", a.sizes(), ", x ",
      x.sizes(), " do not fit y = a^T x");
  if (y.numel() == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "dense_affinity_apply_direct_cuda", [&] {
    launch(apply_direct_kernel<scalar_t>, grid_stride_blocks(rows * P), y.data_ptr<scalar_t>(),
           a.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
           residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr, rows, J, P);
  });
}

}  // namespace seg_methods
