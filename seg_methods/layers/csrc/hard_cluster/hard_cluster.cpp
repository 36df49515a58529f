// Input validation, device dispatch and registration of the hard (k-means) assignment ops as
// torch.ops.seg_methods.hard_cluster_{argmax,reduce,reduce_backward} (see hard_cluster.h).
#include "hard_cluster.h"

#include <c10/core/DeviceGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include "macros.h"

namespace seg_methods {

namespace {

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(
      t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "hard_cluster: '", name,
      "' must be float32 or float64, got ", t.scalar_type(),
      " (the Python wrapper upcasts half precision)");
}

void check_index(const at::Tensor& index, const at::Tensor& v) {
  TORCH_CHECK(
      index.scalar_type() == at::kLong, "hard_cluster: index must be int64, got ",
      index.scalar_type());
  TORCH_CHECK(
      index.device() == v.device(), "hard_cluster: index is on ", index.device(), " but v is on ",
      v.device());
  TORCH_CHECK(
      index.dim() == 2 && index.size(0) == v.size(0) && index.size(1) == v.size(1),
      "hard_cluster: index must have shape (B, HW) matching v (B, HW, Dv) = ", v.sizes(), ", got ",
      index.sizes());
}

}  // namespace

at::Tensor hard_cluster_argmax(const at::Tensor& logits_in) {
  TORCH_CHECK(
      logits_in.dim() == 3, "hard_cluster: logits must have shape (B, K, HW), got ",
      logits_in.sizes());
  check_float(logits_in, "logits");
  c10::OptionalDeviceGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const int64_t B = logits.size(0), K = logits.size(1), HW = logits.size(2);
  at::Tensor index = at::empty({B, HW}, logits.options().dtype(at::kLong));
  if (K == 0) {
    return index.fill_(-1);  // no cluster: every pixel is unassigned
  }
  if (index.numel() == 0) {
    return index;
  }
  if (logits.is_cuda()) {
#if defined(WITH_CUDA)
    hard_cluster_argmax_cuda(logits, index);
#else
    SEG_METHODS_CUDA_NOT_BUILT("hard_cluster_argmax");
#endif
  } else {
    hard_cluster_argmax_cpu(logits, index);
  }
  return index;
}

std::tuple<at::Tensor, at::Tensor> hard_cluster_reduce(
    const at::Tensor& index_in, const at::Tensor& v_in, int64_t num_clusters, bool mean) {
  TORCH_CHECK(v_in.dim() == 3, "hard_cluster: v must have shape (B, HW, Dv), got ", v_in.sizes());
  check_float(v_in, "v");
  check_index(index_in, v_in);
  TORCH_CHECK(num_clusters >= 0, "hard_cluster: num_clusters must be >= 0, got ", num_clusters);
  c10::OptionalDeviceGuard guard(v_in.device());
  const at::Tensor index = index_in.contiguous();
  const at::Tensor v = v_in.contiguous();
  const int64_t B = v.size(0), HW = v.size(1), Dv = v.size(2);
  at::Tensor counts = at::zeros({B, num_clusters}, v.options().dtype(at::kLong));
  at::Tensor update = at::zeros({B, num_clusters, Dv}, v.options());
  if (B * HW == 0) {
    return {update, counts};
  }
  if (v.is_cuda()) {
#if defined(WITH_CUDA)
    hard_cluster_reduce_cuda(index, v, mean, update, counts);
#else
    SEG_METHODS_CUDA_NOT_BUILT("hard_cluster_reduce");
#endif
  } else {
    hard_cluster_reduce_cpu(index, v, mean, update, counts);
  }
  return {update, counts};
}

at::Tensor hard_cluster_reduce_backward(
    const at::Tensor& grad_update_in,
    const at::Tensor& index_in,
    const at::Tensor& counts_in,
    bool mean) {
  TORCH_CHECK(
      grad_update_in.dim() == 3, "hard_cluster: grad_update must have shape (B, K, Dv), got ",
      grad_update_in.sizes());
  check_float(grad_update_in, "grad_update");
  const int64_t B = grad_update_in.size(0), K = grad_update_in.size(1);
  TORCH_CHECK(
      index_in.scalar_type() == at::kLong && index_in.dim() == 2 && index_in.size(0) == B,
      "hard_cluster: index must be an int64 tensor of shape (B, HW) with B = ", B, ", got ",
      index_in.scalar_type(), " ", index_in.sizes());
  TORCH_CHECK(
      counts_in.scalar_type() == at::kLong && counts_in.dim() == 2 && counts_in.size(0) == B &&
          counts_in.size(1) == K,
      "hard_cluster: counts must be an int64 tensor of shape (B, K) = (", B, ", ", K, "), got ",
      counts_in.scalar_type(), " ", counts_in.sizes());
  TORCH_CHECK(
      index_in.device() == grad_update_in.device() && counts_in.device() == grad_update_in.device(),
      "hard_cluster: grad_update, index and counts must be on one device");
  c10::OptionalDeviceGuard guard(grad_update_in.device());
  const at::Tensor grad_update = grad_update_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  const at::Tensor counts = counts_in.contiguous();
  at::Tensor grad_v = at::empty({B, index.size(1), grad_update.size(2)}, grad_update.options());
  if (grad_v.numel() == 0) {
    return grad_v;
  }
  if (grad_update.is_cuda()) {
#if defined(WITH_CUDA)
    hard_cluster_reduce_backward_cuda(grad_update, index, counts, mean, grad_v);
#else
    SEG_METHODS_CUDA_NOT_BUILT("hard_cluster_reduce_backward");
#endif
  } else {
    hard_cluster_reduce_backward_cpu(grad_update, index, counts, mean, grad_v);
  }
  return grad_v;
}

}  // namespace seg_methods

TORCH_LIBRARY_FRAGMENT(seg_methods, m) {
  m.def("hard_cluster_argmax(Tensor logits) -> Tensor", &seg_methods::hard_cluster_argmax);
  m.def(
      "hard_cluster_reduce(Tensor index, Tensor v, int num_clusters, bool mean) -> "
      "(Tensor update, Tensor counts)",
      &seg_methods::hard_cluster_reduce);
  m.def(
      "hard_cluster_reduce_backward(Tensor grad_update, Tensor index, Tensor counts, bool mean) "
      "-> Tensor",
      &seg_methods::hard_cluster_reduce_backward);
}
