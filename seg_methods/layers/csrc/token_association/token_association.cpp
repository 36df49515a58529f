// Input validation, device dispatch and registration of RegProxy's local pixel-token association
// as torch.ops.seg_methods.token_association_{forward,backward} (see token_association.h).
#include "token_association.h"

#include <c10/core/DeviceGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include "macros.h"

namespace seg_methods {

namespace {

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(
      t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "token_association: '",
      name, "' must be float32 or float64, got ", t.scalar_type(),
      " (the Python wrapper upcasts half precision)");
}

void check_same(const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                const char* name) {
  TORCH_CHECK(
      t.device() == ref.device(), "token_association: '", name, "' is on ", t.device(), " but '",
      ref_name, "' is on ", ref.device());
  TORCH_CHECK(
      t.scalar_type() == ref.scalar_type(), "token_association: '", name, "' has dtype ",
      t.scalar_type(), " but '", ref_name, "' has ", ref.scalar_type());
}

void check_region(int64_t rh, int64_t rw) {
  TORCH_CHECK(
      rh >= 1 && rw >= 1, "token_association: region_res must be positive, got (", rh, ", ", rw,
      ")");
}

// tokens (B, C, h, w); returns nothing, raises on a bad shape.
void check_tokens(const at::Tensor& tokens) {
  TORCH_CHECK(
      tokens.dim() == 4, "token_association: token_logits must have shape (B, C, h, w), got ",
      tokens.sizes());
  check_float(tokens, "token_logits");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> token_association_forward(
    const at::Tensor& affinity_in, const at::Tensor& tokens_in, int64_t rh, int64_t rw,
    bool save_weights) {
  check_region(rh, rw);
  check_tokens(tokens_in);
  check_float(affinity_in, "affinity");
  check_same(tokens_in, "token_logits", affinity_in, "affinity");
  const int64_t B = tokens_in.size(0), C = tokens_in.size(1);
  const int64_t h = tokens_in.size(2), w = tokens_in.size(3);
  TORCH_CHECK(
      affinity_in.dim() == 4 && affinity_in.size(0) == B && affinity_in.size(1) == 9 * rh * rw &&
          affinity_in.size(2) == h && affinity_in.size(3) == w,
      "token_association: affinity must have shape (B, 9 * rh * rw, h, w) = (", B, ", ",
      9 * rh * rw, ", ", h, ", ", w, ") for token_logits (B, C, h, w) = ", tokens_in.sizes(),
      " and region_res (", rh, ", ", rw, "), got ", affinity_in.sizes());
  c10::OptionalDeviceGuard guard(tokens_in.device());
  const at::Tensor affinity = affinity_in.contiguous();
  const at::Tensor tokens = tokens_in.contiguous();
  const auto opts = tokens.options();
  at::Tensor output = at::empty({B, C, h * rh, w * rw}, opts);
  at::Tensor weights = save_weights ? at::empty({B, 9, h * rh, w * rw}, opts) : at::Tensor();
  if (B == 0 || h == 0 || w == 0) {
    return {output, weights};  // nothing to compute: the outputs are empty
  }
  if (C == 0 && !save_weights) {
    return {output, weights};
  }
  // With C == 0 and save_weights the kernels still fill the weights (C loops run zero times).
  if (tokens.is_cuda()) {
#if defined(WITH_CUDA)
    token_association_forward_cuda(affinity, tokens, rh, rw, output, weights);
#else
    SEG_METHODS_CUDA_NOT_BUILT("token_association_forward");
#endif
  } else {
    token_association_forward_cpu(affinity, tokens, rh, rw, output, weights);
  }
  return {output, weights};
}

std::tuple<at::Tensor, at::Tensor> token_association_backward(
    const at::Tensor& grad_output_in, const at::Tensor& weights_in, const at::Tensor& tokens_in,
    int64_t rh, int64_t rw, std::array<bool, 2> output_mask) {
  check_region(rh, rw);
  check_tokens(tokens_in);
  check_same(tokens_in, "token_logits", weights_in, "weights");
  check_same(tokens_in, "token_logits", grad_output_in, "grad_output");
  const int64_t B = tokens_in.size(0), C = tokens_in.size(1);
  const int64_t h = tokens_in.size(2), w = tokens_in.size(3);
  const int64_t H = h * rh, W = w * rw;
  TORCH_CHECK(
      weights_in.dim() == 4 && weights_in.size(0) == B && weights_in.size(1) == 9 &&
          weights_in.size(2) == H && weights_in.size(3) == W,
      "token_association: weights must have shape (B, 9, h * rh, w * rw) = (", B, ", 9, ", H,
      ", ", W, "), got ", weights_in.sizes());
  TORCH_CHECK(
      grad_output_in.dim() == 4 && grad_output_in.size(0) == B && grad_output_in.size(1) == C &&
          grad_output_in.size(2) == H && grad_output_in.size(3) == W,
      "token_association: grad_output must have shape (B, C, h * rh, w * rw) = (", B, ", ", C,
      ", ", H, ", ", W, "), got ", grad_output_in.sizes());
  c10::OptionalDeviceGuard guard(tokens_in.device());
  const auto opts = tokens_in.options();
  const bool empty = B == 0 || h == 0 || w == 0;
  at::Tensor grad_affinity, grad_tokens;
  if (output_mask[0]) {
    // With C == 0 the output does not depend on the affinity: its gradient is zero (the kernel
    // computes exactly that, sum over no class).
    grad_affinity = empty ? at::zeros({B, 9 * rh * rw, h, w}, opts)
                          : at::empty({B, 9 * rh * rw, h, w}, opts);
  }
  if (output_mask[1]) {
    grad_tokens = at::empty({B, C, h, w}, opts);
  }
  if (empty) {
    return {grad_affinity, grad_tokens};
  }
  const at::Tensor grad_output = grad_output_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  const at::Tensor tokens = tokens_in.contiguous();
  if (tokens.is_cuda()) {
#if defined(WITH_CUDA)
    if (output_mask[0]) {
      token_association_backward_affinity_cuda(grad_output, weights, tokens, rh, rw,
                                               grad_affinity);
    }
    if (output_mask[1] && C > 0) {
      token_association_backward_tokens_cuda(grad_output, weights, rh, rw, grad_tokens);
    }
#else
    SEG_METHODS_CUDA_NOT_BUILT("token_association_backward");
#endif
  } else {
    if (output_mask[0]) {
      token_association_backward_affinity_cpu(grad_output, weights, tokens, rh, rw,
                                              grad_affinity);
    }
    if (output_mask[1] && C > 0) {
      token_association_backward_tokens_cpu(grad_output, weights, rh, rw, grad_tokens);
    }
  }
  return {grad_affinity, grad_tokens};
}

}  // namespace seg_methods

TORCH_LIBRARY_FRAGMENT(seg_methods, m) {
  m.def(
      "token_association_forward(Tensor affinity, Tensor token_logits, int region_h, "
      "int region_w, bool save_weights) -> (Tensor output, Tensor weights)",
      &seg_methods::token_association_forward);
  m.def(
      "token_association_backward(Tensor grad_output, Tensor weights, Tensor token_logits, "
      "int region_h, int region_w, bool[2] output_mask) -> "
      "(Tensor grad_affinity, Tensor grad_tokens)",
      &seg_methods::token_association_backward);
}
