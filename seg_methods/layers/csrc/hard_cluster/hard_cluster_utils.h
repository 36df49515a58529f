// Per-element math of the hard (k-means) pixel-cluster assignment (kMaX-DeepLab's k-means
// cross-attention, ClustSeg Table 4c baseline; ClustSeg Sec. 3.1: M = one-hot(argmax_K(M_hat))),
// shared by the CPU kernels (hard_cluster_cpu.cpp) and the CUDA kernels (hard_cluster_cuda.cu).
#pragma once

#include <stdint.h>

#include "macros.h"

namespace seg_methods {
namespace hard_cluster {

// Whether logit x (of a later cluster) replaces the running best of the argmax over clusters.
// Ties keep the earlier cluster and the first NaN wins, exactly as torch.argmax.
template <typename T>
HOST_DEVICE_INLINE bool argmax_takes(T x, T best) {
  return x > best || (x != x && best == best);
}

// Divisor of the "mean" update: the cluster's pixel count, at least 1 (empty clusters get 0).
HOST_DEVICE_INLINE int64_t count_divisor(int64_t count) {
  return count > 1 ? count : 1;
}

// Weight of a pixel's value in its cluster's update: 1 for "sum", 1 / max(count, 1) for "mean".
// The same factor scales the gradient flowing back to the value.
template <typename T>
HOST_DEVICE_INLINE T update_weight(int64_t count, bool mean) {
  return mean ? static_cast<T>(1) / static_cast<T>(count_divisor(count)) : static_cast<T>(1);
}

// Whether a stored cluster index refers to a cluster; negative indices mark unassigned pixels
// (K = 0, or pixels the caller excludes), which contribute nothing.
HOST_DEVICE_INLINE bool is_assigned(int64_t index) {
  return index >= 0;
}

}  // namespace hard_cluster
}  // namespace seg_methods
