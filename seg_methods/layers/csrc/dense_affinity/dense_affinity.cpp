// Device-generic driver of the low-rank dense affinity apply (see dense_affinity.h) and its
// registration as torch.ops.seg_methods.dense_affinity_{forward,backward}.
//
// Per image b with n = counts[b] valid channels (views, no copies of the inputs):
//   forward   Ks     = scale * phi1 psi^T                      GEMM, reduction over HW   (C, n)
//             P      = psi + Ks^T phi0                         apply (Eq. 4)             (n, HW)
//   backward  dphi0  = Ks G                                    apply                     (C, HW)
//             dK     = scale * phi0 G^T                        GEMM, reduction over HW   (C, n)
//             dpsi   = G + dK^T phi1                           apply                     (n, HW)
//             dphi1  = dK psi                                  apply                     (C, HW)
// with G the incoming gradient of P. Padded channels (n..N-1) are zero in P and dpsi.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include <vector>

#include "dense_affinity.h"
#include "macros.h"

namespace seg_methods {

namespace {

constexpr int64_t kBackendGemm = 0;
constexpr int64_t kBackendDirect = 1;

void check_same(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(
      t.device() == ref.device(),
      "dense_affinity: '", name, "' is on ", t.device(), " but psi is on ", ref.device());
  TORCH_CHECK(
      t.scalar_type() == ref.scalar_type(),
      "dense_affinity: '", name, "' has dtype ", t.scalar_type(), " but psi has ",
      ref.scalar_type());
}

// Validates psi (B, N, HW), phi0 / phi1 (B, C, HW), counts and the backend; returns the per-image
// channel counts (N for every image when counts is absent).
std::vector<int64_t> check_inputs(
    const at::Tensor& psi,
    const at::Tensor& phi0,
    const at::Tensor& phi1,
    at::OptionalIntArrayRef counts,
    int64_t backend) {
  TORCH_CHECK(psi.dim() == 3, "dense_affinity: psi must have shape (B, N, HW), got ", psi.sizes());
  TORCH_CHECK(
      phi0.dim() == 3, "dense_affinity: phi0 must have shape (B, C, HW), got ", phi0.sizes());
  TORCH_CHECK(
      phi1.dim() == 3, "dense_affinity: phi1 must have shape (B, C, HW), got ", phi1.sizes());
  TORCH_CHECK(
      at::isFloatingType(psi.scalar_type()),
      "dense_affinity: expected floating point tensors, got ", psi.scalar_type());
  check_same(psi, phi0, "phi0");
  check_same(psi, phi1, "phi1");
  TORCH_CHECK(
      phi0.sizes() == phi1.sizes(),
      "dense_affinity: phi0 and phi1 must have the same shape (B, C, HW), got ", phi0.sizes(),
      " and ", phi1.sizes());
  TORCH_CHECK(
      phi0.size(0) == psi.size(0) && phi0.size(2) == psi.size(2),
      "dense_affinity: psi (B, N, HW) and phi0 / phi1 (B, C, HW) must share B and HW, got psi ",
      psi.sizes(), " and phi0 ", phi0.sizes());
  TORCH_CHECK(
      backend == kBackendGemm || backend == kBackendDirect,
      "dense_affinity: backend must be 0 (ATen GEMMs) or 1 (direct kernels), got ", backend);
  if (backend == kBackendDirect) {
    TORCH_CHECK(
        psi.scalar_type() == at::kFloat || psi.scalar_type() == at::kDouble,
        "dense_affinity: the direct kernels take float32 or float64, got ", psi.scalar_type(),
        " (the GEMM backend takes any floating dtype)");
  }
  const int64_t B = psi.size(0), N = psi.size(1);
  std::vector<int64_t> n_valid(B, N);
  if (counts.has_value()) {
    TORCH_CHECK(
        static_cast<int64_t>(counts->size()) == B,
        "dense_affinity: counts must have one entry per image (B = ", B, "), got ",
        counts->size());
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = (*counts)[b];
      TORCH_CHECK(
          n >= 0 && n <= N,
          "dense_affinity: counts[", b, "] = ", n, " is outside [0, N] with N = ", N,
          " (psi has shape ", psi.sizes(), ")");
      n_valid[b] = n;
    }
  }
  return n_valid;
}

// y (Rows, P) = residual + a^T x with a (J, Rows), x (J, P): the pixel-sized product of every
// step (dense_affinity_utils.h). `y` may be a row block of a larger contiguous tensor.
void apply(
    at::Tensor y,
    const at::Tensor& a,
    const at::Tensor& x,
    const std::optional<at::Tensor>& residual,
    int64_t backend) {
  if (y.numel() == 0) {
    return;
  }
  if (backend == kBackendDirect) {
    dense_affinity_apply_direct(y, a.contiguous(), x, residual);
    return;
  }
  if (residual.has_value()) {
    at::addmm_out(y, *residual, a.t(), x);  // residual fused: beta = 1
  } else {
    at::mm_out(y, a.t(), x);
  }
}

// scale * m1 m2^T for the two (C, n) reductions over the pixels.
at::Tensor reduce_pixels(const at::Tensor& m1, const at::Tensor& m2, double scale) {
  at::Tensor r = at::mm(m1, m2.t());
  if (scale != 1.0) {
    r.mul_(scale);
  }
  return r;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> dense_affinity_forward(
    const at::Tensor& psi_in,
    const at::Tensor& phi0_in,
    const at::Tensor& phi1_in,
    at::OptionalIntArrayRef counts,
    double scale,
    int64_t backend) {
  const std::vector<int64_t> n_valid = check_inputs(psi_in, phi0_in, phi1_in, counts, backend);
  c10::OptionalDeviceGuard guard(psi_in.device());
  const at::Tensor psi = psi_in.contiguous();
  const at::Tensor phi0 = phi0_in.contiguous();
  const at::Tensor phi1 = phi1_in.contiguous();
  const int64_t B = psi.size(0), N = psi.size(1), C = phi0.size(1);

  at::Tensor out = at::empty_like(psi);
  at::Tensor kernel = at::zeros({B, C, N}, psi.options());
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = n_valid[b];
    at::Tensor out_b = out.select(0, b);
    if (n < N) {
      out_b.narrow(0, n, N - n).zero_();  // padded channels
    }
    if (n == 0) {
      continue;
    }
    const at::Tensor psi_b = psi.select(0, b).narrow(0, 0, n);              // (n, HW)
    const at::Tensor ks = reduce_pixels(phi1.select(0, b), psi_b, scale);  // (C, n)
    kernel.select(0, b).narrow(1, 0, n).copy_(ks);
    apply(out_b.narrow(0, 0, n), ks, phi0.select(0, b), psi_b, backend);  // Eq. 4
  }
  return {out, kernel};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_affinity_backward(
    const at::Tensor& grad_out_in,
    const at::Tensor& psi_in,
    const at::Tensor& phi0_in,
    const at::Tensor& phi1_in,
    const at::Tensor& kernel_in,
    at::OptionalIntArrayRef counts,
    double scale,
    std::array<bool, 3> output_mask,
    int64_t backend) {
  const std::vector<int64_t> n_valid = check_inputs(psi_in, phi0_in, phi1_in, counts, backend);
  check_same(psi_in, grad_out_in, "grad_out");
  check_same(psi_in, kernel_in, "kernel");
  TORCH_CHECK(
      grad_out_in.sizes() == psi_in.sizes(),
      "dense_affinity: grad_out must have the shape of psi ", psi_in.sizes(), ", got ",
      grad_out_in.sizes());
  const int64_t B = psi_in.size(0), N = psi_in.size(1), C = phi0_in.size(1);
  TORCH_CHECK(
      kernel_in.dim() == 3 && kernel_in.size(0) == B && kernel_in.size(1) == C &&
          kernel_in.size(2) == N,
      "dense_affinity: kernel must have shape (B, C, N) = (", B, ", ", C, ", ", N, "), got ",
      kernel_in.sizes());
  c10::OptionalDeviceGuard guard(psi_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor psi = psi_in.contiguous();
  const at::Tensor phi0 = phi0_in.contiguous();
  const at::Tensor phi1 = phi1_in.contiguous();

  const bool need_psi = output_mask[0], need_phi0 = output_mask[1], need_phi1 = output_mask[2];
  at::Tensor grad_psi = need_psi ? at::empty_like(psi) : at::Tensor();
  at::Tensor grad_phi0 = need_phi0 ? at::empty_like(phi0) : at::Tensor();
  at::Tensor grad_phi1 = need_phi1 ? at::empty_like(phi1) : at::Tensor();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = n_valid[b];
    if (need_psi && n < N) {
      grad_psi.select(0, b).narrow(0, n, N - n).zero_();  // padded channels
    }
    if (n == 0) {  // no channel: P does not depend on phi0 / phi1
      if (need_phi0) {
        grad_phi0.select(0, b).zero_();
      }
      if (need_phi1) {
        grad_phi1.select(0, b).zero_();
      }
      continue;
    }
    const at::Tensor g = grad_out.select(0, b).narrow(0, 0, n);  // (n, HW)
    const at::Tensor psi_b = psi.select(0, b).narrow(0, 0, n);   // (n, HW)
    if (need_phi0) {
      const at::Tensor ks = kernel_in.select(0, b).narrow(1, 0, n);  // (C, n)
      apply(grad_phi0.select(0, b), ks.t(), g, std::nullopt, backend);
    }
    if (need_psi || need_phi1) {
      const at::Tensor dk = reduce_pixels(phi0.select(0, b), g, scale);  // (C, n)
      if (need_psi) {
        apply(grad_psi.select(0, b).narrow(0, 0, n), dk, phi1.select(0, b), g, backend);
      }
      if (need_phi1) {
        apply(grad_phi1.select(0, b), dk.t(), psi_b, std::nullopt, backend);
      }
    }
  }
  return {grad_psi, grad_phi0, grad_phi1};
}

}  // namespace seg_methods

TORCH_LIBRARY_FRAGMENT(seg_methods, m) {
  m.def(
      "dense_affinity_forward(Tensor psi, Tensor phi0, Tensor phi1, int[]? counts, float scale, "
      "int backend) -> (Tensor out, Tensor kernel)",
      &seg_methods::dense_affinity_forward);
  m.def(
      "dense_affinity_backward(Tensor grad_out, Tensor psi, Tensor phi0, Tensor phi1, "
      "Tensor kernel, int[]? counts, float scale, bool[3] output_mask, int backend) -> "
      "(Tensor grad_psi, Tensor grad_phi0, Tensor grad_phi1)",
      &seg_methods::dense_affinity_backward);
}
