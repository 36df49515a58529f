// Per-element math of the HLE decoding kernel (Hierarchical Lovász Embeddings, Sec. 3.5), written
// once and compiled into both the CPU kernels (hle_decode_cpu.cpp) and the CUDA kernels
// (hle_decode_cuda.cu).
//
// The instance kernel of a seed i against a pixel k (Eq. 7-8 with the seed as the mean, Sec. 3.5):
//     Phi(e_i, e_k) = exp(a),
//     a = -d_cos(e_i, e_k) / (2 sigma_i^2) - |rho_i - rho_k|^2 / (2 sigma_spatial^2),
//     d_cos(e_i, e_k) = 1 - e_i^T e_k.
// The operations run in the order of the PyTorch reference (hle_decoding.seed_kernel_row):
// d_cos = 1 - dot; d_pos = dy^2 + dx^2; a = (-d_cos) / den_i - d_pos / den_s; Phi = exp(a), with
// den_i = 2 * (sigma_i * sigma_i) in the tensor dtype and den_s = 2 * spatial_sigma^2 computed in
// double and rounded to the tensor dtype (as PyTorch does with a Python scalar).
//
// A pixel joins seed i when pixel_mask && Phi > mask_threshold && Phi > best (its best Phi so
// far, 0 at the start), in seed order, so ties keep the earlier seed and NaN never joins. A later
// candidate seed j is suppressed (merged into i) unless Phi(e_i, e_j) <= merge_threshold (NaN
// suppresses, as `active &= row <= merge_threshold` does).
//
// Exponential filter: exp is monotone, so a pixel can only join when a > cut, with
//     cut = max(exponent_cut(mask_threshold), a of the pixel's current best),
// where exponent_cut(t) <= log(t) by a safety margin (exp(a) <= t for every a <= cut); the CPU
// kernel computes exp only for the (few) exponents that pass, the decision itself is unchanged.
#pragma once

#include <math.h>

#include "macros.h"

namespace seg_methods {
namespace hle_decode {

HOST_DEVICE_INLINE float exp_value(float x) { return expf(x); }
HOST_DEVICE_INLINE double exp_value(double x) { return exp(x); }

// den_i = 2 sigma_i^2 of a seed's predicted variance (Eq. 7), in the tensor dtype.
template <typename T>
HOST_DEVICE_INLINE T kernel_denominator(T sigma) {
  return static_cast<T>(2) * (sigma * sigma);
}

// Exponent a of Phi (Eq. 8) from the embedding dot product e_i^T e_k and the position offsets.
template <typename T>
HOST_DEVICE_INLINE T kernel_exponent(T dot, T dy, T dx, T den_i, T den_s) {
  const T d_cos = static_cast<T>(1) - dot;
  const T d_pos = dy * dy + dx * dx;
  return -d_cos / den_i - d_pos / den_s;
}

// Phi from its exponent.
template <typename T>
HOST_DEVICE_INLINE T kernel_value(T exponent) {
  return exp_value(exponent);
}

// Whether a pixel whose current best is `best` joins the seed of kernel value `phi`.
template <typename T>
HOST_DEVICE_INLINE bool pixel_joins(T phi, T best, T mask_threshold) {
  return phi > mask_threshold && phi > best;
}

// Whether seed i suppresses (merges) a later candidate j of kernel value phi = Phi(e_i, e_j).
template <typename T>
HOST_DEVICE_INLINE bool seed_suppresses(T phi, T merge_threshold) {
  return !(phi <= merge_threshold);
}

// A cut below log(mask_threshold): exp(a) <= mask_threshold for every a <= cut. -inf when
// mask_threshold <= 0 (every positive Phi passes the threshold) or the threshold underflows.
HOST_DEVICE_INLINE double exponent_cut(double mask_threshold) {
  if (!(mask_threshold > 0.0)) {
    return -static_cast<double>(INFINITY);
  }
  const double l = log(mask_threshold);
  return l - (1e-4 + 1e-5 * fabs(l));
}

// Whether exponent a may make a pixel join (its exponential must then be tested exactly).
template <typename T>
HOST_DEVICE_INLINE bool passes_cut(T exponent, T cut) {
  return exponent > cut;
}

// Upper bound (up to a safety margin) of the exponent a of a seed against every pixel of a group
// ("chunk") of pixels, from a bound on the dot product and the distance to the group's bounding
// box:
//   dot_max:    an upper bound of the exact e_i^T e_k over the group's pixels k,
//   norm_prod:  |e_i| max_k |e_k| (the float32 rounding error of a D-term dot product is below
//               D * 6e-8 of it, under the 1e-4 margin for D up to about 1600),
//   dist2:      the squared distance of rho_i to the bounding box of the group's positions.
// Both terms are widened by margins that cover the float rounding of the per-pixel computation,
// so the group can be skipped when the bound is <= the smallest cut of its pixels.
HOST_DEVICE_INLINE double exponent_upper_bound(
    double dot_max, double norm_prod, double dist2, double den_i, double den_s) {
  const double d_cos = 1.0 - (dot_max + 1e-4 * (norm_prod + 1.0));
  const double bound = -d_cos / den_i - (dist2 * (1.0 - 1e-5)) / den_s;
  return bound + 1e-5 * (fabs(bound) + 1.0);
}

// Squared distance from coordinate x to the interval [lo, hi] (0 inside).
HOST_DEVICE_INLINE double interval_gap2(double x, double lo, double hi) {
  const double g = x < lo ? lo - x : (x > hi ? x - hi : 0.0);
  return g * g;
}

// Upper bound of e_i^T e_k over the pixels of a group with the embedding decomposition
// e_k = a_k c + r_k (c: the group's unit centre, r_k orthogonal to c, |r_k| <= r_max,
// a_k in [a_min, a_max]), for a seed with s_c = e_i^T c and |e_i - s_c c| = s_perp:
//   e_i^T e_k = a_k s_c + r_k^T (e_i - s_c c) <= max(a_min s_c, a_max s_c) + r_max s_perp.
HOST_DEVICE_INLINE double dot_upper_bound(
    double s_c, double s_perp, double a_min, double a_max, double r_max) {
  const double along = a_min * s_c > a_max * s_c ? a_min * s_c : a_max * s_c;
  return along + r_max * s_perp;
}

}  // namespace hle_decode
}  // namespace seg_methods
