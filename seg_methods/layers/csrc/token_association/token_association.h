// Local pixel-token association of RegProxy ("Semantic Segmentation by Early Region Proxy",
// Zhang et al., CVPR 2022: Y'[u, v] = sum_{s in N_p} y(s) q_s(p), Fig. 4b; official ProxyHead
// in YiF-Zhang/RegionProxy): every pixel of a region token's rh x rw patch is a softmax-weighted
// sum of the class logits of the 3x3 neighbourhood of tokens, with out-of-grid neighbours
// excluded before the softmax.
//
// Shape shorthand:
//   B: batch, C: classes, h x w: token grid, rh x rw: pixels per token (region_res),
//   H = h * rh, W = w * rw: output resolution, n in 0..8: neighbour in 3x3 raster order
//   (n = (dy + 1) * 3 + (dx + 1), as F.unfold gives them).
//
// Tensors (one device, float32 or float64, contiguous):
//   affinity   (B, 9 * rh * rw, h, w)  logits, channel n * rh * rw + py * rw + px (the official
//                                      1x1 conv output, viewed as (B, 9, rh, rw, h, w))
//   tokens     (B, C, h, w)            class logits of the region tokens
//   weights    (B, 9, H, W)            softmax over n of the masked affinity, per output pixel
//                                      (pixel layout: row ty * rh + py, column tx * rw + px)
//   output     (B, C, H, W)            output[b, c, y, x] = sum_n weights[b, n, y, x] *
//                                          tokens[b, c, y / rh + dy_n, x / rw + dx_n]
//
// Backward uses the weights saved by the forward (same number of elements as the affinity, so
// keeping them instead of the affinity costs no memory, and the affinity logits are never needed
// again); nothing is recomputed. grad_affinity has the affinity's layout; grad_tokens is written
// as a gather (one output element per token, no atomics, deterministic on both devices).
//
// Public entry points (torch.ops.seg_methods.*) validate the inputs, allocate the outputs, handle
// empty shapes and dispatch on the device; the *_cpu / *_cuda kernels assume validated,
// contiguous, non-empty inputs and write their outputs in full.
#pragma once

#include <torch/types.h>

#include <array>
#include <tuple>

#include "macros.h"

namespace seg_methods {

// ---- kernels (B, C, h, w >= 1; `weights` may be undefined in the forward: not stored) ----
void token_association_forward_cpu(
    const at::Tensor& affinity, const at::Tensor& tokens, int64_t rh, int64_t rw,
    at::Tensor& output, at::Tensor& weights);
// dL/d affinity (B, 9 * rh * rw, h, w) from grad_output (B, C, H, W), weights and tokens.
void token_association_backward_affinity_cpu(
    const at::Tensor& grad_output, const at::Tensor& weights, const at::Tensor& tokens,
    int64_t rh, int64_t rw, at::Tensor& grad_affinity);
// dL/d tokens (B, C, h, w) from grad_output (B, C, H, W) and weights.
void token_association_backward_tokens_cpu(
    const at::Tensor& grad_output, const at::Tensor& weights, int64_t rh, int64_t rw,
    at::Tensor& grad_tokens);

#if defined(WITH_CUDA)
void token_association_forward_cuda(
    const at::Tensor& affinity, const at::Tensor& tokens, int64_t rh, int64_t rw,
    at::Tensor& output, at::Tensor& weights);
void token_association_backward_affinity_cuda(
    const at::Tensor& grad_output, const at::Tensor& weights, const at::Tensor& tokens,
    int64_t rh, int64_t rw, at::Tensor& grad_affinity);
void token_association_backward_tokens_cuda(
    const at::Tensor& grad_output, const at::Tensor& weights, int64_t rh, int64_t rw,
    at::Tensor& grad_tokens);
#endif

// ---- device-dispatching entry points, registered as torch.ops.seg_methods.* ----
// Returns (output (B, C, H, W), weights (B, 9, H, W)); weights is undefined (None in Python)
// unless save_weights (needed by the backward only).
std::tuple<at::Tensor, at::Tensor> token_association_forward(
    const at::Tensor& affinity, const at::Tensor& tokens, int64_t region_h, int64_t region_w,
    bool save_weights);

// Returns (grad_affinity, grad_tokens); an entry is undefined when its output_mask entry is false.
std::tuple<at::Tensor, at::Tensor> token_association_backward(
    const at::Tensor& grad_output, const at::Tensor& weights, const at::Tensor& tokens,
    int64_t region_h, int64_t region_w, std::array<bool, 2> output_mask);

}  // namespace seg_methods
