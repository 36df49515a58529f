// Input validation, device dispatch and registration of
//   torch.ops.seg_methods.ms_deform_attn_forward / ms_deform_attn_backward.
// Shapes: see ms_deform_attn.h.
#include "ms_deform_attn.h"

#include <torch/library.h>
#include <torch/types.h>

#include "macros.h"

namespace seg_methods {

namespace {

void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                  const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                  const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (N, S, M, D), got shape ",
              value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got shape ",
              sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 5,
              "ms_deform_attn: attention_weights must be (N, Lq, M, L, P), got shape ",
              attention_weights.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be (L, 2) with rows (H, W), got shape ",
              spatial_shapes.sizes());
  const int64_t L = spatial_shapes.size(0);
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == L,
              "ms_deform_attn: level_start_index must be (L,) with L = ", L, ", got shape ",
              level_start_index.sizes());
  TORCH_CHECK(
      spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
      "ms_deform_attn: spatial_shapes and level_start_index must be int64, got ",
      spatial_shapes.scalar_type(), " and ", level_start_index.scalar_type());

  const int64_t N = value.size(0), M = value.size(2);
  TORCH_CHECK(sampling_locations.size(0) == N && sampling_locations.size(2) == M &&
                  sampling_locations.size(3) == L,
              "ms_deform_attn: sampling_locations ", sampling_locations.sizes(),
              " does not match (N, Lq, M, L, P, 2) with N = ", N, ", M = ", M, ", L = ", L,
              " (from value ", value.sizes(), " and spatial_shapes ", spatial_shapes.sizes(), ")");
  TORCH_CHECK(
      attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
      "ms_deform_attn: attention_weights ", attention_weights.sizes(),
      " must equal sampling_locations.shape[:5] = ", sampling_locations.sizes().slice(0, 5));

  TORCH_CHECK(at::isFloatingType(value.scalar_type()),
              "ms_deform_attn: value must be a floating-point tensor, got ", value.scalar_type());
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type() &&
                  attention_weights.scalar_type() == value.scalar_type(),
              "ms_deform_attn: value, sampling_locations and attention_weights must share one "
              "dtype, got ",
              value.scalar_type(), ", ", sampling_locations.scalar_type(), ", ",
              attention_weights.scalar_type());

  const at::Device device = value.device();
  TORCH_CHECK(spatial_shapes.device() == device && level_start_index.device() == device &&
                  sampling_locations.device() == device && attention_weights.device() == device,
              "ms_deform_attn: all tensors must be on the device of value (", device, "), got ",
              spatial_shapes.device(), ", ", level_start_index.device(), ", ",
              sampling_locations.device(), ", ", attention_weights.device());
  TORCH_CHECK(value.is_contiguous() && spatial_shapes.is_contiguous() &&
                  level_start_index.is_contiguous() && sampling_locations.is_contiguous() &&
                  attention_weights.is_contiguous(),
              "ms_deform_attn: all inputs must be contiguous");

  // The level table is tiny; on CUDA reading it costs one small device-to-host copy.
  const at::Tensor shapes = spatial_shapes.cpu();
  const at::Tensor starts = level_start_index.cpu();
  const int64_t* hw = shapes.const_data_ptr<int64_t>();
  const int64_t* st = starts.const_data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(hw[2 * l] > 0 && hw[2 * l + 1] > 0, "ms_deform_attn: level ", l,
                " has non-positive size (H, W) = (", hw[2 * l], ", ", hw[2 * l + 1], ")");
    TORCH_CHECK(st[l] == total, "ms_deform_attn: level_start_index[", l, "] = ", st[l],
                " but the levels before it hold ", total, " pixels");
    total += hw[2 * l] * hw[2 * l + 1];
  }
  TORCH_CHECK(value.size(1) == total, "ms_deform_attn: value has S = ", value.size(1),
              " pixels but spatial_shapes sum to ", total);
}

}  // namespace

at::Tensor ms_deform_attn_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index,
                                  const at::Tensor& sampling_locations,
                                  const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  if (value.is_cuda()) {
#if defined(WITH_CUDA)
    return ms_deform_attn_forward_cuda(value, spatial_shapes, level_start_index, sampling_locations,
                                       attention_weights);
#else
    SEG_METHODS_CUDA_NOT_BUILT("ms_deform_attn_forward");
#endif
  }
  TORCH_CHECK(value.is_cpu(), "ms_deform_attn_forward: unsupported device ", value.device());
  return ms_deform_attn_forward_cpu(value, spatial_shapes, level_start_index, sampling_locations,
                                    attention_weights);
}

std::vector<at::Tensor> ms_deform_attn_backward(const at::Tensor& value,
                                                const at::Tensor& spatial_shapes,
                                                const at::Tensor& level_start_index,
                                                const at::Tensor& sampling_locations,
                                                const at::Tensor& attention_weights,
                                                const at::Tensor& grad_output) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const int64_t N = value.size(0), M = value.size(2), D = value.size(3);
  const int64_t Lq = sampling_locations.size(1);
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == N && grad_output.size(1) == Lq &&
                  grad_output.size(2) == M * D,
              "ms_deform_attn_backward: grad_output must be (N, Lq, M * D) = (", N, ", ", Lq, ", ",
              M * D, "), got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type() &&
                  grad_output.device() == value.device() && grad_output.is_contiguous(),
              "ms_deform_attn_backward: grad_output must be contiguous, with the dtype and device "
              "of value");
  if (value.is_cuda()) {
#if defined(WITH_CUDA)
    return ms_deform_attn_backward_cuda(value, spatial_shapes, level_start_index,
                                        sampling_locations, attention_weights, grad_output);
#else
    SEG_METHODS_CUDA_NOT_BUILT("ms_deform_attn_backward");
#endif
  }
  TORCH_CHECK(value.is_cpu(), "ms_deform_attn_backward: unsupported device ", value.device());
  return ms_deform_attn_backward_cpu(value, spatial_shapes, level_start_index, sampling_locations,
                                     attention_weights, grad_output);
}

}  // namespace seg_methods

TORCH_LIBRARY_FRAGMENT(seg_methods, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor",
      &seg_methods::ms_deform_attn_forward);
  m.def(
      "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output) -> Tensor[]",
      &seg_methods::ms_deform_attn_backward);
}
