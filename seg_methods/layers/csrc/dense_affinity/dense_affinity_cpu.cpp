// CPU kernel of the "direct" backend of the dense affinity apply (see dense_affinity.h):
//     y[r, p] = residual[r, p] + sum_j a[j, r] * x[j, p]
// Work is split with at::parallel_for over chunks of kChunk pixels. Inside a chunk, the J x kChunk
// block of x stays in the L1/L2 cache while every output row r accumulates kChunk pixels in a
// local array, so the innermost loop runs over contiguous pixels (vectorised by the compiler). The
// per-element math is dense_affinity_utils.h, shared with CUDA.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/types.h>

#include <algorithm>

#include "dense_affinity.h"
#include "dense_affinity_utils.h"

namespace seg_methods {

namespace {

using namespace dense_affinity;

constexpr int64_t kChunk = 64;  // pixels handled together by one task

template <typename scalar_t>
void apply_direct_kernel(
    scalar_t* y,
    const scalar_t* a,
    const scalar_t* x,
    const scalar_t* residual,
    int64_t rows,
    int64_t J,
    int64_t P) {
  const int64_t chunks = (P + kChunk - 1) / kChunk;
  // About 2^16 multiply-adds per task at least, so that the thread hand-off is amortised.
  const int64_t work_per_chunk = std::max<int64_t>(1, rows * J * kChunk);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / work_per_chunk);
  at::parallel_for(0, chunks, grain, [&](int64_t begin, int64_t end) {
    scalar_t acc[kChunk];
    for (int64_t c = begin; c < end; ++c) {
      const int64_t p0 = c * kChunk;
      const int64_t n = std::min(kChunk, P - p0);
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t i = 0; i < n; ++i) {
          acc[i] = residual_init(residual, r * P + p0 + i);
        }
        for (int64_t j = 0; j < J; ++j) {
          const scalar_t a_jr = a[j * rows + r];
          const scalar_t* x_row = x + j * P + p0;
          for (int64_t i = 0; i < n; ++i) {
            acc[i] = multiply_add(acc[i], a_jr, x_row[i]);
          }
        }
        scalar_t* y_row = y + r * P + p0;
        for (int64_t i = 0; i < n; ++i) {
          y_row[i] = acc[i];
        }
      }
    }
  });
}

}  // namespace

void dense_affinity_apply_direct_cpu(
    at::Tensor& y,
    const at::Tensor& a,
    const at::Tensor& x,
    const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(
      y.is_contiguous() && a.is_contiguous() && x.is_contiguous() &&
          (!residual.has_value() || residual->is_contiguous()),
      "dense_affinity_apply_direct_cpu: expected contiguous tensors");
  const int64_t rows = y.size(0), P = y.size(1), J = a.size(0);
  TORCH_CHECK(
      a.size(1) == rows && x.size(0) == J && x.size(1) == P,
      "dense_affinity_apply_direct_cpu: shapes y ", y.sizes(), ", a ", a.sizes(), ", x ",
      x.sizes(), " do not fit y = a^T x");
  if (y.numel() == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "dense_affinity_apply_direct_cpu", [&] {
    apply_direct_kernel<scalar_t>(
        y.data_ptr<scalar_t>(),
        a.const_data_ptr<scalar_t>(),
        x.const_data_ptr<scalar_t>(),
        residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr,
        rows,
        J,
        P);
  });
}

}  // namespace seg_methods
