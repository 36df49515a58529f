// Hard (k-means) pixel-cluster assignment and update, the "K-Means cross-attention" of
// kMaX-DeepLab (ClustSeg Table 4c): each pixel goes to the cluster of largest logit (argmax over
// the cluster axis, no gradient), then every cluster sums (or averages) the values of its pixels.
//
// Shape shorthand: B batch, K clusters, HW pixels, Dv value channels.
//
// Tensors (one device):
//   logits  (B, K, HW)   float or double
//   index   (B, HW)      int64, cluster of each pixel in [0, K); negative = unassigned
//   v       (B, HW, Dv)  float or double
//   update  (B, K, Dv)   sum_n [index_n = k] v_n, divided by max(count_k, 1) for the mean
//   counts  (B, K)       int64, number of pixels assigned to each cluster
//
// Public entry points (torch.ops.seg_methods.*) validate inputs, allocate the outputs, handle the
// empty cases (no pixel, no cluster) and dispatch on the device; the *_cpu / *_cuda functions
// assume validated, contiguous inputs with at least one pixel and fill the given outputs.
#pragma once

#include <torch/types.h>

#include <tuple>

#include "macros.h"

namespace seg_methods {

// Kernels (K >= 1 for the argmax). `index` (B, HW) is written in full; `update` (B, K, Dv) and
// `counts` (B, K) arrive zero-filled; `grad_v` (B, HW, Dv) is written in full.
void hard_cluster_argmax_cpu(const at::Tensor& logits, at::Tensor& index);
void hard_cluster_reduce_cpu(
    const at::Tensor& index, const at::Tensor& v, bool mean, at::Tensor& update,
    at::Tensor& counts);
void hard_cluster_reduce_backward_cpu(
    const at::Tensor& grad_update, const at::Tensor& index, const at::Tensor& counts, bool mean,
    at::Tensor& grad_v);

#if defined(WITH_CUDA)
void hard_cluster_argmax_cuda(const at::Tensor& logits, at::Tensor& index);
void hard_cluster_reduce_cuda(
    const at::Tensor& index, const at::Tensor& v, bool mean, at::Tensor& update,
    at::Tensor& counts);
void hard_cluster_reduce_backward_cuda(
    const at::Tensor& grad_update, const at::Tensor& index, const at::Tensor& counts, bool mean,
    at::Tensor& grad_v);
#endif

// Device-dispatching entry points (defined in hard_cluster.cpp).
// (B, K, HW) logits -> (B, HW) int64 argmax over K; all -1 when K == 0.
at::Tensor hard_cluster_argmax(const at::Tensor& logits);
// (index (B, HW), v (B, HW, Dv)) -> (update (B, K, Dv), counts (B, K) int64).
std::tuple<at::Tensor, at::Tensor> hard_cluster_reduce(
    const at::Tensor& index, const at::Tensor& v, int64_t num_clusters, bool mean);
// grad_update (B, K, Dv) -> grad_v (B, HW, Dv): grad_v[b, n] = w * grad_update[b, index[b, n]].
at::Tensor hard_cluster_reduce_backward(
    const at::Tensor& grad_update, const at::Tensor& index, const at::Tensor& counts, bool mean);

}  // namespace seg_methods
