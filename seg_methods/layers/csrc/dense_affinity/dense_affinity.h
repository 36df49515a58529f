// Low-rank dense affinity apply of "Unifying Training and Inference for Panoptic Segmentation"
// (Li, Qi, Torr, CVPR 2020), Sec. 3.4.2, Eq. 3-4:
//     P = Psi + phi0(Q) (phi1(Q)^T Psi)
// evaluated right to left, so the (HW x HW) affinity phi0(Q) phi1(Q)^T is never formed.
//
// Layout (channel-first, as detectron2 feature maps; the paper writes the transposes, with Psi of
// shape (HW, N) and phi(Q) of shape (HW, C)):
//   psi      (B, N, HW)   dynamic potential, N = Nmax channels (detections + stuff classes)
//   phi0     (B, C, HW)   phi0(Q), pixel embeddings (1x1 conv + activation, applied by the caller)
//   phi1     (B, C, HW)   phi1(Q)
//   counts   [B] ints     optional: image b has counts[b] <= N valid channels; channels
//                         n >= counts[b] are padding: never read, zero in the output and in the
//                         gradient of psi
//   out      (B, N, HW)   P[b, n] = psi[b, n] + sum_c Ks[b, c, n] phi0[b, c]   (n < counts[b])
//   kernel   (B, C, N)    Ks = scale * phi1 psi^T (the paper's phi1(Q)^T Psi, transposed), saved
//                         for backward; zero in the padded columns
//
// Memory: besides the inputs, the forward allocates the output and the (B, C, N) kernel; the
// backward allocates the requested gradients and two (C, N) matrices. Nothing of size HW x HW or
// (HW, N) beyond the outputs themselves exists, so tiling over the pixels would not lower the peak
// (the outputs must exist in full); the driver therefore runs whole-image products.
//
// Two backends for the pixel-sized products ("apply", see dense_affinity_utils.h):
//   0 (gemm)    ATen GEMMs (MKL on CPU, cuBLAS on CUDA), the residual fused as addmm's beta = 1.
//   1 (direct)  the hand-written CPU / CUDA kernels of this folder. Measured 2.0-2.8x slower than
//               the GEMMs on the CPU (benchmarks/dense_affinity.py) with the same memory; kept for
//               comparison, not the default. The CUDA kernel compiles but was not run (no GPU).
// The two (C, N) reductions over the pixels always run as ATen GEMMs.
#pragma once

#include <torch/types.h>

#include <array>
#include <optional>
#include <tuple>

#include "macros.h"

namespace seg_methods {

// y (Rows, P) = residual (Rows, P) + a^T x, a (J, Rows), x (J, P); all contiguous, one dtype
// (float32 or float64), one device; `residual` may be absent (then 0).
void dense_affinity_apply_direct_cpu(
    at::Tensor& y,
    const at::Tensor& a,
    const at::Tensor& x,
    const std::optional<at::Tensor>& residual);

#if defined(WITH_CUDA)
void dense_affinity_apply_direct_cuda(
    at::Tensor& y,
    const at::Tensor& a,
    const at::Tensor& x,
    const std::optional<at::Tensor>& residual);
#endif

inline void dense_affinity_apply_direct(
    at::Tensor& y,
    const at::Tensor& a,
    const at::Tensor& x,
    const std::optional<at::Tensor>& residual) {
  if (y.is_cuda()) {
#if defined(WITH_CUDA)
    dense_affinity_apply_direct_cuda(y, a, x, residual);
    return;
#else
    SEG_METHODS_CUDA_NOT_BUILT("dense_affinity");
#endif
  }
  dense_affinity_apply_direct_cpu(y, a, x, residual);
}

// ---- device-dispatching entry points, registered as torch.ops.seg_methods.* ----
// Returns (out, kernel). backend: 0 = ATen GEMMs, 1 = direct kernels.
std::tuple<at::Tensor, at::Tensor> dense_affinity_forward(
    const at::Tensor& psi,
    const at::Tensor& phi0,
    const at::Tensor& phi1,
    at::OptionalIntArrayRef counts,
    double scale,
    int64_t backend);

// Returns (grad_psi, grad_phi0, grad_phi1); an entry is undefined when its output_mask entry is
// false. `kernel` is the forward's second output.
std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_affinity_backward(
    const at::Tensor& grad_out,
    const at::Tensor& psi,
    const at::Tensor& phi0,
    const at::Tensor& phi1,
    const at::Tensor& kernel,
    at::OptionalIntArrayRef counts,
    double scale,
    std::array<bool, 3> output_mask,
    int64_t backend);

}  // namespace seg_methods
