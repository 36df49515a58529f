// Per-element math of the soft clustering step (ClustSeg Eq. 10 E-step, CMT-DeepLab Eq. 4/6),
// written once and compiled into both the CPU kernels (soft_cluster_cpu.cpp) and the CUDA kernels
// (soft_cluster_cuda.cu).
//
// The assignment of a pixel n is a softmax over the K cluster logits of that pixel:
//     M[k, n] = exp(L[k, n] - lse[n]),   lse[n] = log(sum_k exp(L[k, n]))
// computed in the numerically stable order "maximum, shifted exponentials and their sum,
// normalisation" (three passes over the K logits of a pixel, one exp per element):
//     m[n] = max_k L[k, n];  e[k, n] = exp(L[k, n] - m[n]);  s[n] = sum_k e[k, n];
//     M[k, n] = e[k, n] / s[n];  lse[n] = m[n] + log(s[n]).
// Backward of the softmax over K (per pixel), with dM the gradient w.r.t. M:
//     dL[k, n] = M[k, n] * (dM[k, n] - sum_k' M[k', n] * dM[k', n]).
// A pixel whose logits are all -inf gets NaN probabilities, as torch.softmax does.
#pragma once

#include <math.h>

#include "macros.h"

namespace seg_methods {
namespace soft_cluster {

HOST_DEVICE_INLINE float exp_value(float x) { return expf(x); }
HOST_DEVICE_INLINE double exp_value(double x) { return exp(x); }
HOST_DEVICE_INLINE float log_value(float x) { return logf(x); }
HOST_DEVICE_INLINE double log_value(double x) { return log(x); }

// The most negative value the running maximum starts from (-inf, so that K = 0 gives lse = -inf).
template <typename T>
HOST_DEVICE_INLINE T lowest_value() {
  return -static_cast<T>(INFINITY);
}

// Pass 1: running maximum over the cluster axis. A NaN logit makes the maximum NaN, so the
// pixel's probabilities become NaN, matching torch.softmax.
template <typename T>
HOST_DEVICE_INLINE T max_update(T running_max, T x) {
  return (x > running_max || x != x) ? x : running_max;
}

// Pass 2: exponential of a logit shifted by the pixel's maximum (the caller sums these).
template <typename T>
HOST_DEVICE_INLINE T shifted_exp(T x, T pixel_max) {
  return exp_value(x - pixel_max);
}

// Pass 3 helpers: reciprocal of the per-pixel normaliser and the log-sum-exp kept for backward.
template <typename T>
HOST_DEVICE_INLINE T inverse_sum(T sum) {
  return static_cast<T>(1) / sum;
}

template <typename T>
HOST_DEVICE_INLINE T log_sum_exp(T pixel_max, T sum) {
  return pixel_max + log_value(sum);
}

// Backward recomputation of a probability from its logit and the saved log-sum-exp.
template <typename T>
HOST_DEVICE_INLINE T prob_from_lse(T x, T lse) {
  return exp_value(x - lse);
}

// Softmax gradient of one element: p * (dp - dot), dot = sum_k p_k * dp_k of the same pixel.
template <typename T>
HOST_DEVICE_INLINE T softmax_grad(T p, T dp, T dot) {
  return p * (dp - dot);
}

}  // namespace soft_cluster
}  // namespace seg_methods
