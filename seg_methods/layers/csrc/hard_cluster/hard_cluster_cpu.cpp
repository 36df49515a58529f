// CPU kernels of the hard (k-means) assignment (see hard_cluster.h), parallelised with
// at::parallel_for. The per-element decisions (argmax update, mean weight) are
// hard_cluster_utils.h, shared with CUDA.
//
// - argmax: tasks over (batch, chunk of kChunk pixels); the loop runs over clusters outside and
//   pixels inside, so each inner loop reads one contiguous segment of a logit row.
// - reduce: the counts are computed per batch first; then tasks over (batch, block of kCols value
//   channels) each scan all pixels of the batch and accumulate their value slice into the
//   assigned cluster in the accumulation type (double for float). Every task owns its output
//   slice, so no atomics or per-thread partial buffers are needed, and the result does not depend
//   on the number of threads.
// - backward: tasks over pixels; every pixel copies (scaled) the gradient row of its cluster.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/types.h>

#include <algorithm>
#include <vector>

#include "hard_cluster.h"
#include "hard_cluster_utils.h"

namespace seg_methods {

namespace {

using namespace hard_cluster;

constexpr int64_t kChunk = 256;  // pixels per argmax task
constexpr int64_t kCols = 64;    // value channels per reduce task

template <typename scalar_t>
void argmax_kernel(const scalar_t* logits, int64_t* index, int64_t B, int64_t K, int64_t HW) {
  const int64_t chunks = (HW + kChunk - 1) / kChunk;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, K * kChunk));
  at::parallel_for(0, B * chunks, grain, [&](int64_t begin, int64_t end) {
    scalar_t best[kChunk];
    int64_t arg[kChunk];
    for (int64_t c = begin; c < end; ++c) {
      const int64_t b = c / chunks;
      const int64_t t0 = (c % chunks) * kChunk;
      const int64_t n = std::min(kChunk, HW - t0);
      const scalar_t* base = logits + b * K * HW + t0;
      for (int64_t i = 0; i < n; ++i) {
        best[i] = base[i];
        arg[i] = 0;
      }
      for (int64_t kk = 1; kk < K; ++kk) {
        const scalar_t* row = base + kk * HW;
        for (int64_t i = 0; i < n; ++i) {
          const bool take = argmax_takes(row[i], best[i]);
          best[i] = take ? row[i] : best[i];
          arg[i] = take ? kk : arg[i];
        }
      }
      std::copy(arg, arg + n, index + b * HW + t0);
    }
  });
}

void count_kernel(const int64_t* index, int64_t* counts, int64_t B, int64_t K, int64_t HW) {
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, HW));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t* idx = index + b * HW;
      int64_t* cnt = counts + b * K;
      for (int64_t n = 0; n < HW; ++n) {
        const int64_t j = idx[n];
        if (is_assigned(j)) {
          TORCH_CHECK(
              j < K, "hard_cluster: cluster index ", j, " at batch ", b, ", pixel ", n,
              " is out of range for K = ", K);
          ++cnt[j];
        }
      }
    }
  });
}

template <typename scalar_t>
void reduce_kernel(
    const int64_t* index,
    const scalar_t* v,
    const int64_t* counts,
    scalar_t* update,
    int64_t B,
    int64_t K,
    int64_t HW,
    int64_t Dv,
    bool mean) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  const int64_t blocks = (Dv + kCols - 1) / kCols;
  // Small problems run inline: a parallel region costs more than they do.
  const int64_t task_work = std::max<int64_t>(1, HW * std::min(kCols, Dv));
  const int64_t grain = std::max<int64_t>(1, 32768 / task_work);
  at::parallel_for(0, B * blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks;
      const int64_t d0 = (task % blocks) * kCols;
      const int64_t w = std::min(kCols, Dv - d0);
      acc.assign(K * w, acc_t(0));
      const int64_t* idx = index + b * HW;
      const scalar_t* vb = v + b * HW * Dv + d0;
      for (int64_t n = 0; n < HW; ++n) {
        const int64_t j = idx[n];
        if (!is_assigned(j)) {
          continue;
        }
        const scalar_t* row = vb + n * Dv;
        acc_t* dst = acc.data() + j * w;
        for (int64_t d = 0; d < w; ++d) {
          dst[d] += static_cast<acc_t>(row[d]);
        }
      }
      for (int64_t kk = 0; kk < K; ++kk) {
        const acc_t weight = update_weight<acc_t>(counts[b * K + kk], mean);
        scalar_t* out = update + (b * K + kk) * Dv + d0;
        const acc_t* src = acc.data() + kk * w;
        for (int64_t d = 0; d < w; ++d) {
          out[d] = static_cast<scalar_t>(src[d] * weight);
        }
      }
    }
  });
}

template <typename scalar_t>
void reduce_backward_kernel(
    const scalar_t* grad_update,
    const int64_t* index,
    const int64_t* counts,
    scalar_t* grad_v,
    int64_t B,
    int64_t K,
    int64_t HW,
    int64_t Dv,
    bool mean) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, Dv));
  at::parallel_for(0, B * HW, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / HW;
      const int64_t j = index[p];
      scalar_t* out = grad_v + p * Dv;
      if (!is_assigned(j)) {
        std::fill(out, out + Dv, scalar_t(0));
        continue;
      }
      const scalar_t weight = update_weight<scalar_t>(counts[b * K + j], mean);
      const scalar_t* src = grad_update + (b * K + j) * Dv;
      for (int64_t d = 0; d < Dv; ++d) {
        out[d] = src[d] * weight;
      }
    }
  });
}

}  // namespace

void hard_cluster_argmax_cpu(const at::Tensor& logits, at::Tensor& index) {
  const int64_t B = logits.size(0), K = logits.size(1), HW = logits.size(2);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "hard_cluster_argmax_cpu", [&] {
    argmax_kernel<scalar_t>(
        logits.const_data_ptr<scalar_t>(), index.data_ptr<int64_t>(), B, K, HW);
  });
}

void hard_cluster_reduce_cpu(
    const at::Tensor& index, const at::Tensor& v, bool mean, at::Tensor& update,
    at::Tensor& counts) {
  const int64_t B = v.size(0), HW = v.size(1), Dv = v.size(2), K = counts.size(1);
  count_kernel(index.const_data_ptr<int64_t>(), counts.data_ptr<int64_t>(), B, K, HW);
  if (update.numel() == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "hard_cluster_reduce_cpu", [&] {
    reduce_kernel<scalar_t>(
        index.const_data_ptr<int64_t>(),
        v.const_data_ptr<scalar_t>(),
        counts.const_data_ptr<int64_t>(),
        update.data_ptr<scalar_t>(),
        B,
        K,
        HW,
        Dv,
        mean);
  });
}

void hard_cluster_reduce_backward_cpu(
    const at::Tensor& grad_update, const at::Tensor& index, const at::Tensor& counts, bool mean,
    at::Tensor& grad_v) {
  const int64_t B = grad_update.size(0), K = grad_update.size(1), Dv = grad_update.size(2);
  const int64_t HW = index.size(1);
  AT_DISPATCH_FLOATING_TYPES(grad_update.scalar_type(), "hard_cluster_reduce_backward_cpu", [&] {
    reduce_backward_kernel<scalar_t>(
        grad_update.const_data_ptr<scalar_t>(),
        index.const_data_ptr<int64_t>(),
        counts.const_data_ptr<int64_t>(),
        grad_v.data_ptr<scalar_t>(),
        B,
        K,
        HW,
        Dv,
        mean);
  });
}

}  // namespace seg_methods
