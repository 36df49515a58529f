// HLE decoding kernel (Hierarchical Lovász Embeddings, Sec. 3.5): the instance kernel Phi of seeds
// against pixels (Eq. 7-8, see hle_decode_utils.h), thresholding, per-pixel argmax over seeds and
// greedy seed suppression. Forward only: decoding has no gradient.
//
// Shape shorthand:
//   P: pixels, D: embedding dimension, K0: candidate seeds, K: seeds.
//
// Tensors (one device, one floating dtype float32 / float64 unless stated):
//   embeddings       (P, D)   pixel embeddings (any strides; the model's (D, H, W) map viewed as
//                             reshape(D, -1).t() is read in place)
//   positions        (P, 2)   pixel positions rho (row, column) in the training unit
//   sigmas           (P,)     predicted instance variances sigma
//   pixel_mask       (P,)     bool, pixels that may join an instance (thing pixels)
//   candidates       (K0,)    int64 flat pixel indices of the candidate seeds, by decreasing score
//   seed_embeddings  (K, D), seed_positions (K, 2), seed_sigmas (K,)   the seeds' values
//   rows             (K, P)   Phi(seed k, pixel p)
//   labels           (P,)     int64 in [-1, K): the seed of each pixel, -1 for none
//   best             (P,)     the winning Phi of each pixel, 0 where labels == -1
//   seeds            (K,)     int64 flat pixel indices of the kept seeds, in order
//
// The device-dispatching entry points (hle_decode.cpp) validate the inputs, handle the empty cases
// and are registered as torch.ops.seg_methods.*; the *_cpu / *_cuda kernels assume validated
// inputs with P >= 1 and K >= 1 (K0 >= 1 for the seed selection) and fill the given outputs.
#pragma once

#include <torch/types.h>

#include <tuple>

#include "macros.h"

namespace seg_methods {

// ---- kernels. Seeds and positions contiguous; embeddings read through their strides. ----
// rows (K, P) = Phi of every seed against every pixel. den_s = 2 * spatial_sigma^2.
void hle_kernel_rows_cpu(
    const at::Tensor& seed_embeddings, const at::Tensor& seed_positions,
    const at::Tensor& seed_sigmas, const at::Tensor& embeddings, const at::Tensor& positions,
    double den_s, at::Tensor& rows);
// Thresholded per-pixel argmax of Phi over the seeds, in seed order. labels / best (P,) are
// written in full.
void hle_assign_pixels_cpu(
    const at::Tensor& seed_embeddings, const at::Tensor& seed_positions,
    const at::Tensor& seed_sigmas, const at::Tensor& embeddings, const at::Tensor& positions,
    const at::Tensor& pixel_mask, double den_s, double mask_threshold, at::Tensor& labels,
    at::Tensor& best);
// Greedy seed suppression over the candidates' own values (K0, D), (K0, 2), (K0,): `kept`
// (min(K0, max_instances),) int64 receives the kept positions in the candidate list; returns
// their number.
int64_t hle_select_seeds_cpu(
    const at::Tensor& cand_embeddings, const at::Tensor& cand_positions,
    const at::Tensor& cand_sigmas, double den_s, double merge_threshold, at::Tensor& kept);

#if defined(WITH_CUDA)
void hle_kernel_rows_cuda(
    const at::Tensor& seed_embeddings, const at::Tensor& seed_positions,
    const at::Tensor& seed_sigmas, const at::Tensor& embeddings, const at::Tensor& positions,
    double den_s, at::Tensor& rows);
void hle_assign_pixels_cuda(
    const at::Tensor& seed_embeddings, const at::Tensor& seed_positions,
    const at::Tensor& seed_sigmas, const at::Tensor& embeddings, const at::Tensor& positions,
    const at::Tensor& pixel_mask, double den_s, double mask_threshold, at::Tensor& labels,
    at::Tensor& best);
int64_t hle_select_seeds_cuda(
    const at::Tensor& cand_embeddings, const at::Tensor& cand_positions,
    const at::Tensor& cand_sigmas, double den_s, double merge_threshold, at::Tensor& kept);
#endif

// ---- device-dispatching entry points (hle_decode.cpp), registered as torch.ops.seg_methods.* --
// (K, P) Phi of every seed against every pixel (hle_decoding.seed_kernel_row for K seeds).
at::Tensor hle_kernel_rows(
    const at::Tensor& seed_embeddings, const at::Tensor& seed_positions,
    const at::Tensor& seed_sigmas, const at::Tensor& embeddings, const at::Tensor& positions,
    double spatial_sigma);

// (labels, best): hle_decoding.assign_pixels_to_seeds (which returns labels only).
std::tuple<at::Tensor, at::Tensor> hle_assign_pixels(
    const at::Tensor& seed_embeddings, const at::Tensor& seed_positions,
    const at::Tensor& seed_sigmas, const at::Tensor& embeddings, const at::Tensor& positions,
    const at::Tensor& pixel_mask, double spatial_sigma, double mask_threshold);

// (K,) int64 flat pixel indices of the seeds kept by the greedy suppression over the candidates.
at::Tensor hle_select_seeds(
    const at::Tensor& candidates, const at::Tensor& embeddings, const at::Tensor& positions,
    const at::Tensor& sigmas, double spatial_sigma, double merge_threshold, int64_t max_instances);

// (labels, seeds, best): hle_decoding.greedy_seed_clustering, one for one (seed selection, then
// the thresholded per-pixel argmax over the kept seeds).
std::tuple<at::Tensor, at::Tensor, at::Tensor> hle_seed_clustering(
    const at::Tensor& candidates, const at::Tensor& embeddings, const at::Tensor& positions,
    const at::Tensor& sigmas, const at::Tensor& pixel_mask, double spatial_sigma,
    double mask_threshold, double merge_threshold, int64_t max_instances);

}  // namespace seg_methods
