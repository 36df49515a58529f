// Per-element math of RegProxy's local pixel-token association ("Semantic Segmentation by Early
// Region Proxy", Zhang et al., CVPR 2022: Y'[u, v] = sum_{s in N_p} y(s) q_s(p), Fig. 4b),
// written once and compiled into both the CPU kernels (token_association_cpu.cpp) and the CUDA
// kernels (token_association_cuda.cu).
//
// A pixel (py, px) of region token (ty, tx) mixes the class logits of the 3x3 neighbourhood of
// tokens around (ty, tx). Neighbour n in 0..8 is in 3x3 raster order, as F.unfold(kernel_size=3,
// padding=1) enumerates it:
//     n = (dy + 1) * 3 + (dx + 1),   dy = n / 3 - 1,   dx = n % 3 - 1,
// and it is valid when the token (ty + dy, tx + dx) lies inside the h x w grid. The 9 affinity
// logits of the pixel are masked to -inf at invalid neighbours BEFORE the softmax over the 9
// (the official ProxyHead.forward_affinity; a 1-row or 1-column grid masks both sides):
//     w_n = exp(a_n - m) / sum_{valid k} exp(a_k - m),   m = max_{valid k} a_k,
// and w_n = 0 at invalid neighbours. Backward of the softmax, with g_n = dL/dw_n:
//     dL/da_n = w_n * (g_n - sum_k w_k g_k)    (0 at invalid neighbours, since w_n = 0 there).
// NaN logits propagate, and a pixel whose valid logits are all -inf gets NaN weights, as
// torch.softmax does (the official head gives the same).
#pragma once

#include <math.h>
#include <stdint.h>

#include "macros.h"

namespace seg_methods {
namespace token_association {

constexpr int kNeighbours = 9;  // the 3x3 token neighbourhood

HOST_DEVICE_INLINE float exp_value(float x) { return expf(x); }
HOST_DEVICE_INLINE double exp_value(double x) { return exp(x); }

// Row / column offset of neighbour n (3x3 raster order, as F.unfold).
HOST_DEVICE_INLINE int neighbour_dy(int n) { return n / 3 - 1; }
HOST_DEVICE_INLINE int neighbour_dx(int n) { return n % 3 - 1; }

// Neighbour index of the offset (dy, dx), dy, dx in {-1, 0, 1}.
HOST_DEVICE_INLINE int neighbour_index(int dy, int dx) { return (dy + 1) * 3 + (dx + 1); }

// Whether token row (or column) `i + d` lies in [0, size).
HOST_DEVICE_INLINE bool inside(int64_t i, int d, int64_t size) {
  return i + d >= 0 && i + d < size;
}

// Whether neighbour n of token (ty, tx) lies inside the h x w token grid.
HOST_DEVICE_INLINE bool neighbour_valid(int n, int64_t ty, int64_t tx, int64_t h, int64_t w) {
  return inside(ty, neighbour_dy(n), h) && inside(tx, neighbour_dx(n), w);
}

// Channel of the affinity logits (B, 9 * rh * rw, h, w) holding neighbour n of sub-pixel
// (py, px): the official 1x1 conv output reshaped to (B, 9, rh, rw, h, w).
HOST_DEVICE_INLINE int64_t affinity_channel(int n, int64_t py, int64_t px, int64_t rh,
                                            int64_t rw) {
  return (static_cast<int64_t>(n) * rh + py) * rw + px;
}

// The 9 logits of one pixel, -inf at the invalid neighbours. `a` points at neighbour 0 of the
// pixel's (ty, tx) position; consecutive neighbours are `n_stride` elements apart.
template <typename T>
HOST_DEVICE_INLINE void load_masked_logits(const T* a, int64_t n_stride, int64_t ty, int64_t tx,
                                           int64_t h, int64_t w, T logits[kNeighbours]) {
  for (int n = 0; n < kNeighbours; ++n) {
    logits[n] = neighbour_valid(n, ty, tx, h, w) ? a[n * n_stride] : -static_cast<T>(INFINITY);
  }
}

// Softmax over the 9 (masked) logits of one pixel, in the stable order "maximum, shifted
// exponentials and their sum, normalisation". A NaN logit makes the maximum NaN, hence every
// weight NaN (as torch.softmax); -inf logits give weight 0 unless all 9 are -inf (NaN).
template <typename T>
HOST_DEVICE_INLINE void masked_softmax(const T logits[kNeighbours], T weights[kNeighbours]) {
  T m = -static_cast<T>(INFINITY);
  for (int n = 0; n < kNeighbours; ++n) {
    const T x = logits[n];
    m = (x > m || x != x) ? x : m;
  }
  T sum = T(0);
  for (int n = 0; n < kNeighbours; ++n) {
    weights[n] = exp_value(logits[n] - m);
    sum += weights[n];
  }
  const T inv = T(1) / sum;
  for (int n = 0; n < kNeighbours; ++n) {
    weights[n] *= inv;
  }
}

// Softmax backward of one pixel: grad_logits[n] = w[n] * (g[n] - sum_k w[k] g[k]).
template <typename T>
HOST_DEVICE_INLINE void masked_softmax_backward(const T weights[kNeighbours],
                                                const T grad_weights[kNeighbours],
                                                T grad_logits[kNeighbours]) {
  T dot = T(0);
  for (int n = 0; n < kNeighbours; ++n) {
    dot += weights[n] * grad_weights[n];
  }
  for (int n = 0; n < kNeighbours; ++n) {
    grad_logits[n] = weights[n] * (grad_weights[n] - dot);
  }
}

}  // namespace token_association
}  // namespace seg_methods
