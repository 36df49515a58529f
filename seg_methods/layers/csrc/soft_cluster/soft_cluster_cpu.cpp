// CPU kernels of the per-pixel softmax over the cluster axis on one (B, K, T) tile (see
// soft_cluster.h). Work is split with at::parallel_for over (batch, chunk of kChunk pixels); inside
// a chunk the loops run over clusters outside and pixels inside, so every inner loop reads one
// contiguous row segment of the tile. The math is soft_cluster_utils.h, shared with CUDA.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/types.h>

#include <algorithm>

#include "soft_cluster.h"
#include "soft_cluster_utils.h"

namespace seg_methods {

namespace {

using namespace soft_cluster;

constexpr int64_t kChunk = 64;  // pixels handled together by one task

// Enough elements per task to amortise the thread hand-off.
inline int64_t grain_in_chunks(int64_t K) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K * kChunk));
}

template <typename scalar_t>
void tile_softmax_kernel(scalar_t* tile, scalar_t* lse, int64_t B, int64_t K, int64_t T) {
  const int64_t chunks = (T + kChunk - 1) / kChunk;
  at::parallel_for(0, B * chunks, grain_in_chunks(K), [&](int64_t begin, int64_t end) {
    scalar_t run_max[kChunk];
    scalar_t run_sum[kChunk];
    for (int64_t c = begin; c < end; ++c) {
      const int64_t b = c / chunks;
      const int64_t t0 = (c % chunks) * kChunk;
      const int64_t n = std::min(kChunk, T - t0);
      scalar_t* base = tile + b * K * T + t0;
      for (int64_t i = 0; i < n; ++i) {
        run_max[i] = lowest_value<scalar_t>();
        run_sum[i] = scalar_t(0);
      }
      for (int64_t kk = 0; kk < K; ++kk) {
        const scalar_t* row = base + kk * T;
        for (int64_t i = 0; i < n; ++i) {
          run_max[i] = max_update(run_max[i], row[i]);
        }
      }
      for (int64_t kk = 0; kk < K; ++kk) {
        scalar_t* row = base + kk * T;
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t e = shifted_exp(row[i], run_max[i]);
          row[i] = e;
          run_sum[i] += e;
        }
      }
      scalar_t* lse_row = lse + b * T + t0;
      for (int64_t i = 0; i < n; ++i) {
        lse_row[i] = log_sum_exp(run_max[i], run_sum[i]);
        run_sum[i] = inverse_sum(run_sum[i]);
      }
      for (int64_t kk = 0; kk < K; ++kk) {
        scalar_t* row = base + kk * T;
        for (int64_t i = 0; i < n; ++i) {
          row[i] *= run_sum[i];
        }
      }
    }
  });
}

template <typename scalar_t>
void tile_recompute_kernel(scalar_t* tile, const scalar_t* lse, int64_t B, int64_t K, int64_t T) {
  const int64_t chunks = (T + kChunk - 1) / kChunk;
  at::parallel_for(0, B * chunks, grain_in_chunks(K), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t b = c / chunks;
      const int64_t t0 = (c % chunks) * kChunk;
      const int64_t n = std::min(kChunk, T - t0);
      scalar_t* base = tile + b * K * T + t0;
      const scalar_t* lse_row = lse + b * T + t0;
      for (int64_t kk = 0; kk < K; ++kk) {
        scalar_t* row = base + kk * T;
        for (int64_t i = 0; i < n; ++i) {
          row[i] = prob_from_lse(row[i], lse_row[i]);
        }
      }
    }
  });
}

template <typename scalar_t>
void tile_softmax_backward_kernel(
    const scalar_t* prob, scalar_t* grad, const scalar_t* extra, int64_t B, int64_t K, int64_t T) {
  const int64_t chunks = (T + kChunk - 1) / kChunk;
  at::parallel_for(0, B * chunks, grain_in_chunks(K), [&](int64_t begin, int64_t end) {
    scalar_t dot[kChunk];
    for (int64_t c = begin; c < end; ++c) {
      const int64_t b = c / chunks;
      const int64_t t0 = (c % chunks) * kChunk;
      const int64_t n = std::min(kChunk, T - t0);
      const int64_t offset = b * K * T + t0;
      for (int64_t i = 0; i < n; ++i) {
        dot[i] = scalar_t(0);
      }
      for (int64_t kk = 0; kk < K; ++kk) {
        const scalar_t* p = prob + offset + kk * T;
        const scalar_t* g = grad + offset + kk * T;
        for (int64_t i = 0; i < n; ++i) {
          dot[i] += p[i] * g[i];
        }
      }
      for (int64_t kk = 0; kk < K; ++kk) {
        const scalar_t* p = prob + offset + kk * T;
        scalar_t* g = grad + offset + kk * T;
        if (extra != nullptr) {
          const scalar_t* x = extra + offset + kk * T;
          for (int64_t i = 0; i < n; ++i) {
            g[i] = softmax_grad(p[i], g[i], dot[i]) + x[i];
          }
        } else {
          for (int64_t i = 0; i < n; ++i) {
            g[i] = softmax_grad(p[i], g[i], dot[i]);
          }
        }
      }
    }
  });
}

}  // namespace

void soft_cluster_tile_softmax_cpu(at::Tensor& tile, at::Tensor& lse) {
  const int64_t B = tile.size(0), K = tile.size(1), T = tile.size(2);
  if (B * T == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "soft_cluster_tile_softmax_cpu", [&] {
    tile_softmax_kernel<scalar_t>(tile.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), B, K, T);
  });
}

void soft_cluster_tile_recompute_cpu(at::Tensor& tile, const at::Tensor& lse) {
  const int64_t B = tile.size(0), K = tile.size(1), T = tile.size(2);
  if (tile.numel() == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "soft_cluster_tile_recompute_cpu", [&] {
    tile_recompute_kernel<scalar_t>(
        tile.data_ptr<scalar_t>(), lse.const_data_ptr<scalar_t>(), B, K, T);
  });
}

void soft_cluster_tile_softmax_backward_cpu(
    const at::Tensor& prob, at::Tensor& grad, const std::optional<at::Tensor>& extra) {
  const int64_t B = prob.size(0), K = prob.size(1), T = prob.size(2);
  if (prob.numel() == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(prob.scalar_type(), "soft_cluster_tile_softmax_backward_cpu", [&] {
    tile_softmax_backward_kernel<scalar_t>(
        prob.const_data_ptr<scalar_t>(),
        grad.data_ptr<scalar_t>(),
        extra.has_value() ? extra->const_data_ptr<scalar_t>() : nullptr,
        B,
        K,
        T);
  });
}

}  // namespace seg_methods
