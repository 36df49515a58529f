// Fused soft clustering step: E-step (softmax over the cluster axis) and M-step (weighted sum of
// pixel values) of ClustSeg Eq. 10 / CMT-DeepLab Eq. 5-7, without materialising the (B, K, HW)
// logits and assignment unless the caller asks for them.
//
// Shape shorthand:
//   B: batch (attention heads folded in), K: clusters, HW: pixels, D: key channels,
//   Dv: value channels, T: pixels in one tile.
//
// Tensors (one device, one floating dtype):
//   q        (B, K, D)     cluster-centre queries
//   k        (B, HW, D)    pixel keys
//   v        (B, HW, Dv)   pixel values
//   bias     (B, K, HW)    optional additive logits (CMT-DeepLab Eq. 6, S)
//   logits   (B, K, HW)    L = scale * q k^T + bias
//   assign   (B, K, HW)    M = softmax over K of L (per pixel)
//   lse      (B, HW)       log-sum-exp of L over K (per pixel), saved for backward
//   update   (B, K, Dv)    U = M v
//
// The driver (soft_cluster.cpp) loops over tiles of T pixels. Contractions run as batched GEMMs of
// ATen on the tile (BLAS on CPU, cuBLAS on CUDA); the per-pixel softmax over K and its gradient run
// in the *_tile_* kernels below, whose per-element math lives in soft_cluster_utils.h. On the CPU
// the tiles are shared out among threads by one at::parallel_for (per-thread accumulators for the
// (B, K, *) sums); on CUDA they run in order. Live memory besides inputs and outputs is
// O(threads * B * K * T).
#pragma once

#include <torch/types.h>

#include <array>
#include <optional>
#include <tuple>

#include "macros.h"

namespace seg_methods {

// ---- tile kernels (all tensors contiguous; validated by the driver) ----
// In place: `tile` (B, K, T) holds logits on entry and probabilities on exit; `lse` (B, T) is
// written with the per-pixel log-sum-exp.
void soft_cluster_tile_softmax_cpu(at::Tensor& tile, at::Tensor& lse);
// In place: `tile` (B, K, T) holds logits on entry and exp(logit - lse) on exit.
void soft_cluster_tile_recompute_cpu(at::Tensor& tile, const at::Tensor& lse);
// In place: `grad` (B, K, T) holds dM on entry and dL on exit; `prob` (B, K, T) is M. When
// `extra` is defined, (B, K, T) gradient w.r.t. the logits coming from elsewhere, added to dL.
void soft_cluster_tile_softmax_backward_cpu(
    const at::Tensor& prob, at::Tensor& grad, const std::optional<at::Tensor>& extra);

#if defined(WITH_CUDA)
void soft_cluster_tile_softmax_cuda(at::Tensor& tile, at::Tensor& lse);
void soft_cluster_tile_recompute_cuda(at::Tensor& tile, const at::Tensor& lse);
void soft_cluster_tile_softmax_backward_cuda(
    const at::Tensor& prob, at::Tensor& grad, const std::optional<at::Tensor>& extra);
#endif

// ---- device-dispatching entry points, registered as torch.ops.seg_methods.* ----
// Returns (update, lse, logits, assign); logits / assign are undefined (None in Python) unless
// requested. tile_size <= 0 picks a size automatically.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_cluster_forward(
    const at::Tensor& q,
    const at::Tensor& k,
    const at::Tensor& v,
    const std::optional<at::Tensor>& bias,
    double scale,
    bool return_logits,
    bool return_assignment,
    int64_t tile_size);

// Returns (grad_q, grad_k, grad_v, grad_bias); an entry is undefined when its output_mask entry is
// false. Any of grad_update / grad_logits / grad_assign may be absent (zero gradient). `logits`
// and `assign` are the forward outputs when they were returned (they spare the recomputation);
// otherwise the logits are recomputed tile by tile from q, k and bias.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_cluster_backward(
    const std::optional<at::Tensor>& grad_update,
    const std::optional<at::Tensor>& grad_logits,
    const std::optional<at::Tensor>& grad_assign,
    const at::Tensor& q,
    const at::Tensor& k,
    const at::Tensor& v,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& lse,
    const std::optional<at::Tensor>& logits,
    const std::optional<at::Tensor>& assign,
    double scale,
    std::array<bool, 4> output_mask,
    int64_t tile_size);

// ---- inline dispatch of the tile kernels on the tensor's device ----
inline void soft_cluster_tile_softmax(at::Tensor& tile, at::Tensor& lse) {
  if (tile.is_cuda()) {
#if defined(WITH_CUDA)
    soft_cluster_tile_softmax_cuda(tile, lse);
    return;
#else
    SEG_METHODS_CUDA_NOT_BUILT("soft_cluster");
#endif
  }
  soft_cluster_tile_softmax_cpu(tile, lse);
}

inline void soft_cluster_tile_recompute(at::Tensor& tile, const at::Tensor& lse) {
  if (tile.is_cuda()) {
#if defined(WITH_CUDA)
    soft_cluster_tile_recompute_cuda(tile, lse);
    return;
#else
    SEG_METHODS_CUDA_NOT_BUILT("soft_cluster");
#endif
  }
  soft_cluster_tile_recompute_cpu(tile, lse);
}

inline void soft_cluster_tile_softmax_backward(
    const at::Tensor& prob, at::Tensor& grad, const std::optional<at::Tensor>& extra) {
  if (prob.is_cuda()) {
#if defined(WITH_CUDA)
    soft_cluster_tile_softmax_backward_cuda(prob, grad, extra);
    return;
#else
    SEG_METHODS_CUDA_NOT_BUILT("soft_cluster");
#endif
  }
  soft_cluster_tile_softmax_backward_cpu(prob, grad, extra);
}

}  // namespace seg_methods
