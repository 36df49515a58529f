// Per-element math of the low-rank dense affinity apply (Unifying Training and Inference for
// Panoptic Segmentation, Sec. 3.4.2, Eq. 3-4), written once and compiled into both the CPU kernel
// (dense_affinity_cpu.cpp) and the CUDA kernel (dense_affinity_cuda.cu) of the "direct" backend.
//
// Every product of the op, forward and backward, is one "apply" of a small matrix to pixels:
//     Y[r, p] = R[r, p] + sum_j A[j, r] * X[j, p]       (R optional, then 0)
// with A (J, Rows) tiny (J, Rows in {C, N}) and X (J, P), Y (Rows, P), R (Rows, P) large:
//     forward        P      = Psi + Ks^T phi0          A = Ks (C, N),    X = phi0, R = Psi
//     backward       dPsi   = G + dK^T phi1            A = dK (C, N),    X = phi1, R = G
//                    dphi0  = Ks G                     A = Ks^T (N, C),  X = G
//                    dphi1  = dK Psi                   A = dK^T (N, C),  X = Psi
// (Ks = scale * phi1 Psi^T and dK = scale * phi0 G^T, both (C, N), are computed by ATen GEMMs.)
// The accumulation over j runs in the order j = 0, 1, ..., J - 1 in both kernels.
#pragma once

#include "macros.h"

namespace seg_methods {
namespace dense_affinity {

// Initial value of one output element: the residual term when there is one (forward: Psi,
// backward of Psi: the incoming gradient), else 0.
template <typename T>
HOST_DEVICE_INLINE T residual_init(const T* residual, int64_t offset) {
  return residual != nullptr ? residual[offset] : T(0);
}

// One term of the contraction over j: acc + A[j, r] * X[j, p].
template <typename T>
HOST_DEVICE_INLINE T multiply_add(T acc, T a, T x) {
  return acc + a * x;
}

}  // namespace dense_affinity
}  // namespace seg_methods
