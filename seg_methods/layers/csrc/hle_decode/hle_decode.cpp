// Input validation, empty cases, device dispatch and registration of the HLE decoding kernel as
// torch.ops.seg_methods.hle_{kernel_rows,assign_pixels,select_seeds,seed_clustering} (see
// hle_decode.h). Forward only: decoding has no gradient (no autograd kernel is registered).
//
// hle_seed_clustering splits the greedy loop of hle_decoding.greedy_seed_clustering in two exact
// steps. Which seeds are kept depends only on Phi between candidates (a seed's kernel row is
// read at the candidates for the suppression), and a pixel's label depends only on the kept seeds
// in order, so: (1) greedy suppression over the K0 candidates alone (O(K * K0 * D)), (2) one pass
// over the pixels, each pixel scanning the K kept seeds in order (O(P * K * D), the embeddings
// read once instead of once per seed).
#include "hle_decode.h"

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>

#include "macros.h"

namespace seg_methods {

namespace {

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(
      t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "hle_decode: '", name,
      "' must be float32 or float64, got ", t.scalar_type(),
      " (the Python wrapper computes half precision in float32)");
}

void check_like(
    const at::Tensor& ref, const at::Tensor& t, const char* name, const char* ref_name) {
  TORCH_CHECK(
      t.device() == ref.device(), "hle_decode: '", name, "' is on ", t.device(), " but '",
      ref_name, "' is on ", ref.device());
  TORCH_CHECK(
      t.scalar_type() == ref.scalar_type(), "hle_decode: '", name, "' has dtype ",
      t.scalar_type(), " but '", ref_name, "' has ", ref.scalar_type());
}

// embeddings (P, D) float and positions (P, 2) of its dtype and device.
void check_pixels(const at::Tensor& embeddings, const at::Tensor& positions) {
  TORCH_CHECK(
      embeddings.dim() == 2, "hle_decode: embeddings must have shape (P, D), got ",
      embeddings.sizes());
  check_float(embeddings, "embeddings");
  check_like(embeddings, positions, "positions", "embeddings");
  TORCH_CHECK(
      positions.dim() == 2 && positions.size(0) == embeddings.size(0) && positions.size(1) == 2,
      "hle_decode: positions must have shape (P, 2) = (", embeddings.size(0), ", 2) to match "
      "embeddings (P, D) = ", embeddings.sizes(), ", got ", positions.sizes());
}

void check_per_pixel(const at::Tensor& embeddings, const at::Tensor& t, const char* name) {
  TORCH_CHECK(
      t.dim() == 1 && t.size(0) == embeddings.size(0), "hle_decode: '", name,
      "' must have shape (P,) = (", embeddings.size(0), ",) to match embeddings (P, D) = ",
      embeddings.sizes(), ", got ", t.sizes());
}

void check_mask(const at::Tensor& embeddings, const at::Tensor& pixel_mask) {
  TORCH_CHECK(
      pixel_mask.scalar_type() == at::kBool, "hle_decode: pixel_mask must be bool, got ",
      pixel_mask.scalar_type());
  TORCH_CHECK(
      pixel_mask.device() == embeddings.device(), "hle_decode: pixel_mask is on ",
      pixel_mask.device(), " but embeddings is on ", embeddings.device());
  check_per_pixel(embeddings, pixel_mask, "pixel_mask");
}

void check_seeds(
    const at::Tensor& embeddings, const at::Tensor& seed_embeddings,
    const at::Tensor& seed_positions, const at::Tensor& seed_sigmas) {
  check_like(embeddings, seed_embeddings, "seed_embeddings", "embeddings");
  check_like(embeddings, seed_positions, "seed_positions", "embeddings");
  check_like(embeddings, seed_sigmas, "seed_sigmas", "embeddings");
  TORCH_CHECK(
      seed_embeddings.dim() == 2 && seed_embeddings.size(1) == embeddings.size(1),
      "hle_decode: seed_embeddings must have shape (K, D) with D = ", embeddings.size(1),
      " as embeddings (P, D) = ", embeddings.sizes(), ", got ", seed_embeddings.sizes());
  const int64_t K = seed_embeddings.size(0);
  TORCH_CHECK(
      seed_positions.dim() == 2 && seed_positions.size(0) == K && seed_positions.size(1) == 2,
      "hle_decode: seed_positions must have shape (K, 2) = (", K, ", 2), got ",
      seed_positions.sizes());
  TORCH_CHECK(
      seed_sigmas.dim() == 1 && seed_sigmas.size(0) == K,
      "hle_decode: seed_sigmas must have shape (K,) = (", K, ",), got ", seed_sigmas.sizes());
}

void check_candidates(const at::Tensor& embeddings, const at::Tensor& candidates) {
  TORCH_CHECK(
      candidates.scalar_type() == at::kLong && candidates.dim() == 1,
      "hle_decode: candidates must be a 1-D int64 tensor (K0,), got ", candidates.scalar_type(),
      " ", candidates.sizes());
  TORCH_CHECK(
      candidates.device() == embeddings.device(), "hle_decode: candidates is on ",
      candidates.device(), " but embeddings is on ", embeddings.device());
  if (candidates.numel() > 0) {
    const auto range = at::aminmax(candidates);  // one device synchronisation on CUDA
    const int64_t lo = std::get<0>(range).item<int64_t>();
    const int64_t hi = std::get<1>(range).item<int64_t>();
    TORCH_CHECK(
        lo >= 0 && hi < embeddings.size(0), "hle_decode: candidates must be flat pixel indices "
        "in [0, P) = [0, ", embeddings.size(0), "), got values in [", lo, ", ", hi, "]");
  }
}

// 2 * spatial_sigma^2 as the reference computes it (a Python float).
double spatial_denominator(double spatial_sigma) { return 2.0 * (spatial_sigma * spatial_sigma); }

std::tuple<at::Tensor, at::Tensor> empty_assignment(const at::Tensor& embeddings) {
  const int64_t P = embeddings.size(0);
  return {
      at::full({P}, -1, embeddings.options().dtype(at::kLong)),
      at::zeros({P}, embeddings.options())};
}

// The assignment on validated inputs (positions contiguous).
std::tuple<at::Tensor, at::Tensor> assign_validated(
    const at::Tensor& seed_embeddings, const at::Tensor& seed_positions,
    const at::Tensor& seed_sigmas, const at::Tensor& embeddings, const at::Tensor& positions,
    const at::Tensor& pixel_mask, double spatial_sigma, double mask_threshold) {
  const int64_t P = embeddings.size(0), K = seed_embeddings.size(0);
  if (P == 0 || K == 0) {
    return empty_assignment(embeddings);
  }
  const at::Tensor se = seed_embeddings.contiguous();
  const at::Tensor sp = seed_positions.contiguous();
  const at::Tensor ss = seed_sigmas.contiguous();
  const at::Tensor mask = pixel_mask.contiguous();
  at::Tensor labels = at::empty({P}, embeddings.options().dtype(at::kLong));
  at::Tensor best = at::empty({P}, embeddings.options());
  const double den_s = spatial_denominator(spatial_sigma);
  if (embeddings.is_cuda()) {
#if defined(WITH_CUDA)
    hle_assign_pixels_cuda(
        se, sp, ss, embeddings, positions, mask, den_s, mask_threshold, labels, best);
#else
    SEG_METHODS_CUDA_NOT_BUILT("hle_assign_pixels");
#endif
  } else {
    hle_assign_pixels_cpu(se, sp, ss, embeddings, positions, mask, den_s, mask_threshold, labels,
                          best);
  }
  return {labels, best};
}

at::Tensor select_validated(
    const at::Tensor& candidates, const at::Tensor& embeddings, const at::Tensor& positions,
    const at::Tensor& sigmas, double spatial_sigma, double merge_threshold,
    int64_t max_instances) {
  const int64_t K0 = candidates.numel();
  const int64_t slots = std::min<int64_t>(K0, std::max<int64_t>(max_instances, 0));
  if (slots == 0) {
    return at::empty({0}, candidates.options());
  }
  const at::Tensor ce = embeddings.index_select(0, candidates).contiguous();  // (K0, D)
  const at::Tensor cp = positions.index_select(0, candidates).contiguous();   // (K0, 2)
  const at::Tensor cs = sigmas.index_select(0, candidates).contiguous();      // (K0,)
  at::Tensor kept = at::empty({slots}, candidates.options());
  const double den_s = spatial_denominator(spatial_sigma);
  int64_t count = 0;
  if (embeddings.is_cuda()) {
#if defined(WITH_CUDA)
    count = hle_select_seeds_cuda(ce, cp, cs, den_s, merge_threshold, kept);
#else
    SEG_METHODS_CUDA_NOT_BUILT("hle_select_seeds");
#endif
  } else {
    count = hle_select_seeds_cpu(ce, cp, cs, den_s, merge_threshold, kept);
  }
  return candidates.index_select(0, kept.narrow(0, 0, count));
}

}  // namespace

at::Tensor hle_kernel_rows(
    const at::Tensor& seed_embeddings, const at::Tensor& seed_positions,
    const at::Tensor& seed_sigmas, const at::Tensor& embeddings, const at::Tensor& positions_in,
    double spatial_sigma) {
  check_pixels(embeddings, positions_in);
  check_seeds(embeddings, seed_embeddings, seed_positions, seed_sigmas);
  c10::OptionalDeviceGuard guard(embeddings.device());
  const int64_t P = embeddings.size(0), K = seed_embeddings.size(0);
  at::Tensor rows = at::empty({K, P}, embeddings.options());
  if (rows.numel() == 0) {
    return rows;
  }
  const at::Tensor se = seed_embeddings.contiguous();
  const at::Tensor sp = seed_positions.contiguous();
  const at::Tensor ss = seed_sigmas.contiguous();
  const at::Tensor positions = positions_in.contiguous();
  const double den_s = spatial_denominator(spatial_sigma);
  if (embeddings.is_cuda()) {
#if defined(WITH_CUDA)
    hle_kernel_rows_cuda(se, sp, ss, embeddings, positions, den_s, rows);
#else
    SEG_METHODS_CUDA_NOT_BUILT("hle_kernel_rows");
#endif
  } else {
    hle_kernel_rows_cpu(se, sp, ss, embeddings, positions, den_s, rows);
  }
  return rows;
}

std::tuple<at::Tensor, at::Tensor> hle_assign_pixels(
    const at::Tensor& seed_embeddings, const at::Tensor& seed_positions,
    const at::Tensor& seed_sigmas, const at::Tensor& embeddings, const at::Tensor& positions,
    const at::Tensor& pixel_mask, double spatial_sigma, double mask_threshold) {
  check_pixels(embeddings, positions);
  check_seeds(embeddings, seed_embeddings, seed_positions, seed_sigmas);
  check_mask(embeddings, pixel_mask);
  c10::OptionalDeviceGuard guard(embeddings.device());
  return assign_validated(
      seed_embeddings, seed_positions, seed_sigmas, embeddings, positions.contiguous(), pixel_mask,
      spatial_sigma, mask_threshold);
}

at::Tensor hle_select_seeds(
    const at::Tensor& candidates, const at::Tensor& embeddings, const at::Tensor& positions,
    const at::Tensor& sigmas, double spatial_sigma, double merge_threshold,
    int64_t max_instances) {
  check_pixels(embeddings, positions);
  check_like(embeddings, sigmas, "sigmas", "embeddings");
  check_per_pixel(embeddings, sigmas, "sigmas");
  check_candidates(embeddings, candidates);
  c10::OptionalDeviceGuard guard(embeddings.device());
  return select_validated(
      candidates, embeddings, positions, sigmas, spatial_sigma, merge_threshold, max_instances);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hle_seed_clustering(
    const at::Tensor& candidates, const at::Tensor& embeddings, const at::Tensor& positions_in,
    const at::Tensor& sigmas, const at::Tensor& pixel_mask, double spatial_sigma,
    double mask_threshold, double merge_threshold, int64_t max_instances) {
  check_pixels(embeddings, positions_in);
  check_like(embeddings, sigmas, "sigmas", "embeddings");
  check_per_pixel(embeddings, sigmas, "sigmas");
  check_mask(embeddings, pixel_mask);
  check_candidates(embeddings, candidates);
  c10::OptionalDeviceGuard guard(embeddings.device());
  const at::Tensor positions = positions_in.contiguous();
  const at::Tensor seeds = select_validated(
      candidates, embeddings, positions, sigmas, spatial_sigma, merge_threshold, max_instances);
  auto [labels, best] = assign_validated(
      embeddings.index_select(0, seeds), positions.index_select(0, seeds),
      sigmas.index_select(0, seeds), embeddings, positions, pixel_mask, spatial_sigma,
      mask_threshold);
  return {labels, seeds, best};
}

}  // namespace seg_methods

TORCH_LIBRARY_FRAGMENT(seg_methods, m) {
  m.def(
      "hle_kernel_rows(Tensor seed_embeddings, Tensor seed_positions, Tensor seed_sigmas, "
      "Tensor embeddings, Tensor positions, float spatial_sigma) -> Tensor",
      &seg_methods::hle_kernel_rows);
  m.def(
      "hle_assign_pixels(Tensor seed_embeddings, Tensor seed_positions, Tensor seed_sigmas, "
      "Tensor embeddings, Tensor positions, Tensor pixel_mask, float spatial_sigma, "
      "float mask_threshold) -> (Tensor labels, Tensor best)",
      &seg_methods::hle_assign_pixels);
  m.def(
      "hle_select_seeds(Tensor candidates, Tensor embeddings, Tensor positions, Tensor sigmas, "
      "float spatial_sigma, float merge_threshold, int max_instances) -> Tensor",
      &seg_methods::hle_select_seeds);
  m.def(
      "hle_seed_clustering(Tensor candidates, Tensor embeddings, Tensor positions, Tensor sigmas, "
      "Tensor pixel_mask, float spatial_sigma, float mask_threshold, float merge_threshold, "
      "int max_instances) -> (Tensor labels, Tensor seeds, Tensor best)",
      &seg_methods::hle_seed_clustering);
}
