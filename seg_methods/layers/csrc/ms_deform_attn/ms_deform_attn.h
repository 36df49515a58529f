// Multi-scale deformable attention sampling (Deformable DETR Eq. 3; Mask2Former pixel decoder).
//
// Shape shorthand:
//   N: batch, S: sum_l H_l * W_l (levels flattened row-major, concatenated), M: heads,
//   D: channels per head, Lq: queries, L: levels, P: sampling points per level and head.
//
// Tensors (all contiguous, on one device; float tensors share one dtype):
//   value               (N, S, M, D)
//   spatial_shapes      (L, 2)  int64, rows (H_l, W_l)
//   level_start_index   (L,)    int64, exclusive cumulative sum of H_l * W_l
//   sampling_locations  (N, Lq, M, L, P, 2)  normalized (x, y); outside [0, 1] reads zeros
//   attention_weights   (N, Lq, M, L, P)
//   output              (N, Lq, M * D)
//
// Public entry points (registered as torch.ops.seg_methods.*) validate their inputs and
// dispatch on the device of `value`; the *_cpu / *_cuda functions assume validated inputs.
#pragma once

#include <torch/types.h>

#include <vector>

namespace seg_methods {

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights);

// Returns {grad_value (N, S, M, D), grad_sampling_locations (N, Lq, M, L, P, 2),
// grad_attention_weights (N, Lq, M, L, P)}.
std::vector<at::Tensor> ms_deform_attn_backward_cpu(const at::Tensor& value,
                                                    const at::Tensor& spatial_shapes,
                                                    const at::Tensor& level_start_index,
                                                    const at::Tensor& sampling_locations,
                                                    const at::Tensor& attention_weights,
                                                    const at::Tensor& grad_output);

#if defined(WITH_CUDA)
at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights);

std::vector<at::Tensor> ms_deform_attn_backward_cuda(const at::Tensor& value,
                                                     const at::Tensor& spatial_shapes,
                                                     const at::Tensor& level_start_index,
                                                     const at::Tensor& sampling_locations,
                                                     const at::Tensor& attention_weights,
                                                     const at::Tensor& grad_output);
#endif

// Device-dispatching entry points (defined in ms_deform_attn.cpp).
at::Tensor ms_deform_attn_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index,
                                  const at::Tensor& sampling_locations,
                                  const at::Tensor& attention_weights);

std::vector<at::Tensor> ms_deform_attn_backward(const at::Tensor& value,
                                                const at::Tensor& spatial_shapes,
                                                const at::Tensor& level_start_index,
                                                const at::Tensor& sampling_locations,
                                                const at::Tensor& attention_weights,
                                                const at::Tensor& grad_output);

}  // namespace seg_methods
