// CUDA kernels of the HLE decoding (see hle_decode.h). The per-element math is hle_decode_utils.h,
// shared with the CPU kernels; launches go through cuda_launch.cuh.
//
// - rows: one thread per (seed, pixel), consecutive threads on consecutive pixels.
// - assign: one thread per pixel, scanning the K seeds in order (the seeds' values are read by
//   every thread of a warp at once: broadcast loads). Embeddings with D <= kRegisterDim are kept
//   in registers; larger D re-reads the pixel's embedding (cached) for every seed. exp is computed
//   only for exponents that pass the exponential filter.
// - select: one block of threads runs the greedy suppression: the candidates are visited in
//   order (a uniform loop: every thread reads the same `active` flag after the barrier), and the
//   threads share out the later candidates of each kept seed. At most min(K0, max_instances)
//   barriers; the number of kept seeds is copied back to the host (one synchronisation).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/TensorUtils.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda_launch.cuh"
#include "hle_decode.h"
#include "hle_decode_utils.h"

namespace seg_methods {

namespace {

using namespace hle_decode;
using cuda_launch::blocks_for;
using cuda_launch::kThreadsPerBlock;
using cuda_launch::launch;
using cuda_launch::thread_index;

constexpr int kRegisterDim = 16;  // embedding dimensions held in registers (Cityscapes: d = 12)

template <typename scalar_t>
__global__ void rows_kernel(
    const scalar_t* __restrict__ se, const scalar_t* __restrict__ sp,
    const scalar_t* __restrict__ ss, int64_t K, const scalar_t* __restrict__ emb,
    int64_t stride_p, int64_t stride_d, const scalar_t* __restrict__ pos, int64_t P, int64_t D,
    scalar_t den_s, scalar_t* __restrict__ rows) {
  const int64_t e = thread_index();
  if (e >= K * P) {
    return;
  }
  const int64_t k = e / P;
  const int64_t p = e % P;
  scalar_t dot = scalar_t(0);
  for (int64_t d = 0; d < D; ++d) {
    dot += emb[p * stride_p + d * stride_d] * se[k * D + d];
  }
  const scalar_t a = kernel_exponent(
      dot, pos[2 * p] - sp[2 * k], pos[2 * p + 1] - sp[2 * k + 1], kernel_denominator(ss[k]),
      den_s);
  rows[e] = kernel_value(a);
}

// Dot product of seed row s with the pixel's embedding: from registers (kCached) or memory.
template <typename scalar_t, bool kCached>
__device__ __forceinline__ scalar_t pixel_dot(
    const scalar_t* reg, const scalar_t* __restrict__ emb_p, int64_t stride_d,
    const scalar_t* __restrict__ s, int64_t D) {
  scalar_t dot = scalar_t(0);
  if (kCached) {
#pragma unroll
    for (int d = 0; d < kRegisterDim; ++d) {
      if (d < D) {
        dot += reg[d] * s[d];
      }
    }
  } else {
    for (int64_t d = 0; d < D; ++d) {
      dot += emb_p[d * stride_d] * s[d];
    }
  }
  return dot;
}

template <typename scalar_t, bool kCached>
__global__ void assign_kernel(
    const scalar_t* __restrict__ se, const scalar_t* __restrict__ sp,
    const scalar_t* __restrict__ ss, int64_t K, const scalar_t* __restrict__ emb,
    int64_t stride_p, int64_t stride_d, const scalar_t* __restrict__ pos,
    const bool* __restrict__ mask, int64_t P, int64_t D, scalar_t den_s, scalar_t thr,
    scalar_t cut0, int64_t* __restrict__ labels, scalar_t* __restrict__ best) {
  const int64_t p = thread_index();
  if (p >= P) {
    return;
  }
  int64_t lab = -1;
  scalar_t bst = scalar_t(0);
  if (mask[p]) {
    const scalar_t* emb_p = emb + p * stride_p;
    scalar_t reg[kCached ? kRegisterDim : 1];
    if (kCached) {
#pragma unroll
      for (int d = 0; d < kRegisterDim; ++d) {
        reg[d] = d < D ? emb_p[d * stride_d] : scalar_t(0);
      }
    }
    const scalar_t py = pos[2 * p], px = pos[2 * p + 1];
    scalar_t cut = cut0;
    for (int64_t k = 0; k < K; ++k) {
      const scalar_t dot = pixel_dot<scalar_t, kCached>(reg, emb_p, stride_d, se + k * D, D);
      const scalar_t a = kernel_exponent(
          dot, py - sp[2 * k], px - sp[2 * k + 1], kernel_denominator(ss[k]), den_s);
      if (passes_cut(a, cut)) {
        const scalar_t phi = kernel_value(a);
        if (pixel_joins(phi, bst, thr)) {
          bst = phi;
          lab = k;
          cut = a;
        }
      }
    }
  }
  labels[p] = lab;
  best[p] = bst;
}

template <typename scalar_t>
__global__ void select_kernel(
    const scalar_t* __restrict__ ce, const scalar_t* __restrict__ cp,
    const scalar_t* __restrict__ cs, int64_t K0, int64_t D, scalar_t den_s, scalar_t merge,
    scalar_t merge_cut, int64_t slots, unsigned char* __restrict__ active,
    int64_t* __restrict__ kept, int64_t* __restrict__ count_out) {
  __shared__ int64_t count;
  if (threadIdx.x == 0) {
    count = 0;
  }
  __syncthreads();
  for (int64_t c = 0; c < K0; ++c) {
    // Uniform: `count` and active[c] were last written before the barrier ending the previous
    // kept seed's iteration.
    if (count >= slots) {
      break;
    }
    if (!active[c]) {
      continue;
    }
    const scalar_t* s = ce + c * D;
    const scalar_t den_i = kernel_denominator(cs[c]);
    const scalar_t sy = cp[2 * c], sx = cp[2 * c + 1];
    for (int64_t j = c + 1 + threadIdx.x; j < K0; j += blockDim.x) {
      if (!active[j]) {
        continue;
      }
      scalar_t dot = scalar_t(0);
      for (int64_t d = 0; d < D; ++d) {
        dot += ce[j * D + d] * s[d];
      }
      const scalar_t a = kernel_exponent(dot, cp[2 * j] - sy, cp[2 * j + 1] - sx, den_i, den_s);
      if ((passes_cut(a, merge_cut) || a != a) && seed_suppresses(kernel_value(a), merge)) {
        active[j] = 0;
      }
    }
    __syncthreads();  // every thread has read count and active[c]
    if (threadIdx.x == 0) {
      kept[count] = c;
      active[c] = 0;
      count += 1;
    }
    __syncthreads();  // the suppressions and the new count are visible to the whole block
  }
  if (threadIdx.x == 0) {
    *count_out = count;
  }
}

}  // namespace

void hle_kernel_rows_cuda(
    const at::Tensor& seed_embeddings, const at::Tensor& seed_positions,
    const at::Tensor& seed_sigmas, const at::Tensor& embeddings, const at::Tensor& positions,
    double den_s, at::Tensor& rows) {
  at::checkAllSameGPU(
      "hle_kernel_rows_cuda",
      {{seed_embeddings, "seed_embeddings", 1}, {seed_positions, "seed_positions", 2},
       {seed_sigmas, "seed_sigmas", 3}, {embeddings, "embeddings", 4}, {positions, "positions", 5},
       {rows, "rows", 6}});
  c10::cuda::CUDAGuard device_guard(embeddings.device());
  const int64_t K = seed_embeddings.size(0), P = embeddings.size(0), D = embeddings.size(1);
  if (rows.numel() == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(embeddings.scalar_type(), "hle_kernel_rows_cuda", [&] {
    launch(rows_kernel<scalar_t>, blocks_for(K * P), seed_embeddings.const_data_ptr<scalar_t>(),
           seed_positions.const_data_ptr<scalar_t>(), seed_sigmas.const_data_ptr<scalar_t>(), K,
           embeddings.const_data_ptr<scalar_t>(), embeddings.stride(0), embeddings.stride(1),
           positions.const_data_ptr<scalar_t>(), P, D, static_cast<scalar_t>(den_s),
           rows.data_ptr<scalar_t>());
  });
}

void hle_assign_pixels_cuda(
    const at::Tensor& seed_embeddings, const at::Tensor& seed_positions,
    const at::Tensor& seed_sigmas, const at::Tensor& embeddings, const at::Tensor& positions,
    const at::Tensor& pixel_mask, double den_s, double mask_threshold, at::Tensor& labels,
    at::Tensor& best) {
  at::checkAllSameGPU(
      "hle_assign_pixels_cuda",
      {{seed_embeddings, "seed_embeddings", 1}, {seed_positions, "seed_positions", 2},
       {seed_sigmas, "seed_sigmas", 3}, {embeddings, "embeddings", 4}, {positions, "positions", 5},
       {pixel_mask, "pixel_mask", 6}, {labels, "labels", 7}, {best, "best", 8}});
  c10::cuda::CUDAGuard device_guard(embeddings.device());
  const int64_t K = seed_embeddings.size(0), P = embeddings.size(0), D = embeddings.size(1);
  if (P == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(embeddings.scalar_type(), "hle_assign_pixels_cuda", [&] {
    const auto kernel = D <= kRegisterDim ? assign_kernel<scalar_t, true>
                                          : assign_kernel<scalar_t, false>;
    launch(kernel, blocks_for(P), seed_embeddings.const_data_ptr<scalar_t>(),
           seed_positions.const_data_ptr<scalar_t>(), seed_sigmas.const_data_ptr<scalar_t>(), K,
           embeddings.const_data_ptr<scalar_t>(), embeddings.stride(0), embeddings.stride(1),
           positions.const_data_ptr<scalar_t>(), pixel_mask.const_data_ptr<bool>(), P, D,
           static_cast<scalar_t>(den_s), static_cast<scalar_t>(mask_threshold),
           static_cast<scalar_t>(exponent_cut(mask_threshold)), labels.data_ptr<int64_t>(),
           best.data_ptr<scalar_t>());
  });
}

int64_t hle_select_seeds_cuda(
    const at::Tensor& cand_embeddings, const at::Tensor& cand_positions,
    const at::Tensor& cand_sigmas, double den_s, double merge_threshold, at::Tensor& kept) {
  at::checkAllSameGPU(
      "hle_select_seeds_cuda",
      {{cand_embeddings, "cand_embeddings", 1}, {cand_positions, "cand_positions", 2},
       {cand_sigmas, "cand_sigmas", 3}, {kept, "kept", 4}});
  c10::cuda::CUDAGuard device_guard(cand_embeddings.device());
  const int64_t K0 = cand_embeddings.size(0), D = cand_embeddings.size(1);
  if (K0 == 0 || kept.numel() == 0) {
    return 0;
  }
  at::Tensor active = at::ones({K0}, cand_embeddings.options().dtype(at::kByte));
  at::Tensor count = at::zeros({1}, kept.options());
  AT_DISPATCH_FLOATING_TYPES(cand_embeddings.scalar_type(), "hle_select_seeds_cuda", [&] {
    launch(select_kernel<scalar_t>, 1u, cand_embeddings.const_data_ptr<scalar_t>(),
           cand_positions.const_data_ptr<scalar_t>(), cand_sigmas.const_data_ptr<scalar_t>(), K0,
           D, static_cast<scalar_t>(den_s), static_cast<scalar_t>(merge_threshold),
           static_cast<scalar_t>(exponent_cut(merge_threshold)), kept.size(0),
           active.data_ptr<unsigned char>(), kept.data_ptr<int64_t>(),
           count.data_ptr<int64_t>());
  });
  return count.item<int64_t>();  // synchronises with the stream
}

}  // namespace seg_methods
