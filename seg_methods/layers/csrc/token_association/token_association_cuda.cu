// CUDA kernels of RegProxy's local pixel-token association (see token_association.h). The math of
// one pixel (neighbour offsets, validity, masked softmax over the 9 neighbours and its backward)
// is token_association_utils.h, shared with the CPU kernels; launches go through cuda_launch.cuh.
//
// Thread layout (x, the output column, varies fastest everywhere, so that neighbouring threads
// read and write neighbouring addresses of the (B, *, H, W) tensors):
//   forward           one thread per (b, channel chunk, y, x): the 9 masked logits of its pixel,
//                     their softmax in registers (stored by the threads of chunk 0 when the
//                     weights are saved), then kChannelsPerThread classes of output. The softmax
//                     is recomputed once per chunk: 9 exponentials against 9 * 16 multiply-adds.
//   grad_affinity     one thread per (b, y, x): g_n = sum_c grad_output * token logit of neighbour
//                     n over all classes, then the softmax backward into the pixel's 9 channels.
//   grad_tokens       one thread per (b, c, ty, tx), a gather: the sum over the 9 tokens whose
//                     neighbourhood contains it and their rh * rw pixels. We chose the gather over
//                     a scatter from output pixels with atomicAdd: every token would receive
//                     9 * rh * rw atomic adds to one address (contention), the result would depend
//                     on their order (not reproducible), and float64 atomics are slow; the gather
//                     reads 2 * 9 * rh * rw values per token and writes each gradient once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/TensorUtils.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "cuda_launch.cuh"
#include "token_association.h"
#include "token_association_utils.h"

namespace seg_methods {

namespace {

using namespace token_association;
using cuda_launch::blocks_for;
using cuda_launch::launch;
using cuda_launch::thread_index;

constexpr int64_t kChannelsPerThread = 16;

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ affinity,
                               const scalar_t* __restrict__ tokens, scalar_t* __restrict__ output,
                               scalar_t* __restrict__ weights, int64_t B, int64_t C, int64_t h,
                               int64_t w, int64_t rh, int64_t rw, int64_t chunks) {
  const int64_t H = h * rh, W = w * rw;
  const int64_t idx = thread_index();
  if (idx >= B * chunks * H * W) {
    return;
  }
  const int64_t x = idx % W, y = (idx / W) % H;
  const int64_t chunk = (idx / (H * W)) % chunks, b = idx / (chunks * H * W);
  const int64_t ty = y / rh, py = y % rh, tx = x / rw, px = x % rw;
  const int64_t plane = h * w;

  scalar_t logits[kNeighbours], wt[kNeighbours];
  const scalar_t* a = affinity + (b * kNeighbours * rh * rw + affinity_channel(0, py, px, rh, rw)) *
                                     plane + ty * w + tx;
  load_masked_logits(a, rh * rw * plane, ty, tx, h, w, logits);
  masked_softmax(logits, wt);
  if (weights != nullptr && chunk == 0) {
    for (int n = 0; n < kNeighbours; ++n) {
      weights[((b * kNeighbours + n) * H + y) * W + x] = wt[n];
    }
  }
  const int64_t c_end = min(C, (chunk + 1) * kChannelsPerThread);
  for (int64_t c = chunk * kChannelsPerThread; c < c_end; ++c) {
    const scalar_t* tc = tokens + (b * C + c) * plane;
    scalar_t acc = scalar_t(0);
    for (int n = 0; n < kNeighbours; ++n) {
      if (neighbour_valid(n, ty, tx, h, w)) {
        acc += wt[n] * tc[(ty + neighbour_dy(n)) * w + tx + neighbour_dx(n)];
      }
    }
    output[((b * C + c) * H + y) * W + x] = acc;
  }
}

template <typename scalar_t>
__global__ void backward_affinity_kernel(const scalar_t* __restrict__ grad_output,
                                         const scalar_t* __restrict__ weights,
                                         const scalar_t* __restrict__ tokens,
                                         scalar_t* __restrict__ grad_affinity, int64_t B,
                                         int64_t C, int64_t h, int64_t w, int64_t rh,
                                         int64_t rw) {
  const int64_t H = h * rh, W = w * rw;
  const int64_t idx = thread_index();
  if (idx >= B * H * W) {
    return;
  }
  const int64_t x = idx % W, y = (idx / W) % H, b = idx / (H * W);
  const int64_t ty = y / rh, py = y % rh, tx = x / rw, px = x % rw;
  const int64_t plane = h * w;

  scalar_t wt[kNeighbours], g[kNeighbours], ga[kNeighbours];
  for (int n = 0; n < kNeighbours; ++n) {
    wt[n] = weights[((b * kNeighbours + n) * H + y) * W + x];
    g[n] = scalar_t(0);
  }
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t go = grad_output[((b * C + c) * H + y) * W + x];
    const scalar_t* tc = tokens + (b * C + c) * plane;
    for (int n = 0; n < kNeighbours; ++n) {
      if (neighbour_valid(n, ty, tx, h, w)) {
        g[n] += go * tc[(ty + neighbour_dy(n)) * w + tx + neighbour_dx(n)];
      }
    }
  }
  masked_softmax_backward(wt, g, ga);
  scalar_t* out = grad_affinity + b * kNeighbours * rh * rw * plane + ty * w + tx;
  for (int n = 0; n < kNeighbours; ++n) {
    out[affinity_channel(n, py, px, rh, rw) * plane] = ga[n];
  }
}

template <typename scalar_t>
__global__ void backward_tokens_kernel(const scalar_t* __restrict__ grad_output,
                                       const scalar_t* __restrict__ weights,
                                       scalar_t* __restrict__ grad_tokens, int64_t B, int64_t C,
                                       int64_t h, int64_t w, int64_t rh, int64_t rw) {
  const int64_t H = h * rh, W = w * rw;
  const int64_t idx = thread_index();
  if (idx >= B * C * h * w) {
    return;
  }
  const int64_t sx = idx % w, sy = (idx / w) % h, bc = idx / (h * w), b = bc / C;
  scalar_t acc = scalar_t(0);
  // Token (sy, sx) is neighbour n = (dy, dx) of token (sy - dy, sx - dx).
  for (int n = 0; n < kNeighbours; ++n) {
    const int dy = neighbour_dy(n), dx = neighbour_dx(n);
    if (!inside(sy, -dy, h) || !inside(sx, -dx, w)) {
      continue;
    }
    const int64_t y0 = (sy - dy) * rh, x0 = (sx - dx) * rw;
    const scalar_t* wn = weights + (b * kNeighbours + n) * H * W;
    const scalar_t* go = grad_output + bc * H * W;
    for (int64_t py = 0; py < rh; ++py) {
      for (int64_t px = 0; px < rw; ++px) {
        const int64_t i = (y0 + py) * W + x0 + px;
        acc += wn[i] * go[i];
      }
    }
  }
  grad_tokens[idx] = acc;
}

}  // namespace

void token_association_forward_cuda(const at::Tensor& affinity, const at::Tensor& tokens,
                                    int64_t rh, int64_t rw, at::Tensor& output,
                                    at::Tensor& weights) {
  at::checkAllSameGPU("token_association_forward_cuda",
                      {{affinity, "affinity", 1}, {tokens, "token_logits", 2},
                       {output, "output", 3}});
  c10::cuda::CUDAGuard device_guard(tokens.device());
  const int64_t B = tokens.size(0), C = tokens.size(1), h = tokens.size(2), w = tokens.size(3);
  // At least one chunk, so that the weights are written even when C == 0.
  const int64_t chunks = std::max<int64_t>(1, (C + kChannelsPerThread - 1) / kChannelsPerThread);
  const int64_t n = B * chunks * h * rh * w * rw;
  if (n == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(tokens.scalar_type(), "token_association_forward_cuda", [&] {
    launch(forward_kernel<scalar_t>, blocks_for(n), affinity.const_data_ptr<scalar_t>(),
           tokens.const_data_ptr<scalar_t>(), output.data_ptr<scalar_t>(),
           weights.defined() ? weights.data_ptr<scalar_t>() : nullptr, B, C, h, w, rh, rw,
           chunks);
  });
}

void token_association_backward_affinity_cuda(const at::Tensor& grad_output,
                                              const at::Tensor& weights, const at::Tensor& tokens,
                                              int64_t rh, int64_t rw, at::Tensor& grad_affinity) {
  at::checkAllSameGPU("token_association_backward_affinity_cuda",
                      {{grad_output, "grad_output", 1}, {weights, "weights", 2},
                       {tokens, "token_logits", 3}, {grad_affinity, "grad_affinity", 4}});
  c10::cuda::CUDAGuard device_guard(tokens.device());
  const int64_t B = tokens.size(0), C = tokens.size(1), h = tokens.size(2), w = tokens.size(3);
  const int64_t n = B * h * rh * w * rw;
  if (n == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(
      tokens.scalar_type(), "token_association_backward_affinity_cuda", [&] {
        launch(backward_affinity_kernel<scalar_t>, blocks_for(n),
               grad_output.const_data_ptr<scalar_t>(), weights.const_data_ptr<scalar_t>(),
               tokens.const_data_ptr<scalar_t>(), grad_affinity.data_ptr<scalar_t>(), B, C, h, w,
               rh, rw);
      });
}

void token_association_backward_tokens_cuda(const at::Tensor& grad_output,
                                            const at::Tensor& weights, int64_t rh, int64_t rw,
                                            at::Tensor& grad_tokens) {
  at::checkAllSameGPU("token_association_backward_tokens_cuda",
                      {{grad_output, "grad_output", 1}, {weights, "weights", 2},
                       {grad_tokens, "grad_tokens", 3}});
  c10::cuda::CUDAGuard device_guard(grad_tokens.device());
  const int64_t B = grad_tokens.size(0), C = grad_tokens.size(1);
  const int64_t h = grad_tokens.size(2), w = grad_tokens.size(3);
  const int64_t n = grad_tokens.numel();
  if (n == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(
      grad_output.scalar_type(), "token_association_backward_tokens_cuda", [&] {
        launch(backward_tokens_kernel<scalar_t>, blocks_for(n),
               grad_output.const_data_ptr<scalar_t>(), weights.const_data_ptr<scalar_t>(),
               grad_tokens.data_ptr<scalar_t>(), B, C, h, w, rh, rw);
      });
}

}  // namespace seg_methods
