// CPU kernels of RegProxy's local pixel-token association (see token_association.h). The math of
// one pixel (neighbour offsets, validity, masked softmax over the 9 neighbours and its backward)
// is token_association_utils.h, shared with the CUDA kernels.
//
// Work is split with at::parallel_for over rows of tokens (b, ty): a task owns the rh output rows
// of its token row (forward), the 9 * rh * rw affinity channels of its tokens (grad_affinity) or
// one row of token gradients (grad_tokens, a gather over the 3 token rows around it), so no two
// tasks write the same element and nothing needs atomics.
//
// The class-logit side runs on whole pixel rows so that the inner loops are contiguous and
// vectorise: for one class and token row ty + dy, the token logits are first copied into a
// "nearest-upsampled" row u[(t + 1) * rw + px] = tokens[ty + dy, t] (t in -1..w, zero outside
// the grid); neighbour (dy, dx) of output column x = tx * rw + px is then u[x + (dx + 1) * rw].
// Out-of-grid neighbours have weight exactly 0 and read the zero padding, so the inner loop runs
// over all 9 neighbours without branches (as the official unfold + matmul does).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/types.h>

#include <algorithm>
#include <vector>

#include "token_association.h"
#include "token_association_utils.h"

// The pointers of the inner loops are distinct buffers; tell GCC so that it vectorises them
// without runtime alias checks (18 input streams exceed its versioning limit).
#if defined(__GNUC__) && !defined(__clang__)
#define TOKEN_ASSOCIATION_IVDEP _Pragma("GCC ivdep")
#elif defined(__clang__)
#define TOKEN_ASSOCIATION_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#else
#define TOKEN_ASSOCIATION_IVDEP
#endif

namespace seg_methods {

namespace {

using namespace token_association;

// Enough multiply-adds per task to amortise the thread hand-off.
inline int64_t grain_in_rows(int64_t work_per_row) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, work_per_row));
}

// Sizes shared by the kernels.
struct Dims {
  int64_t B, C, h, w, rh, rw, H, W;
  int64_t hw() const { return h * w; }
  int64_t HW() const { return H * W; }
  int64_t R() const { return rh * rw; }
  int64_t up_len() const { return (w + 2) * rw; }  // one upsampled row, one token of padding
};

Dims make_dims(const at::Tensor& tokens, int64_t rh, int64_t rw) {
  const int64_t h = tokens.size(2), w = tokens.size(3);
  return {tokens.size(0), tokens.size(1), h, w, rh, rw, h * rh, w * rw};
}

// Upsampled rows of one class for the token rows ty - 1, ty, ty + 1 into up[3][up_len] (rows
// outside the grid stay zero). `tc` is the (h, w) map of the class.
template <typename scalar_t>
void fill_upsampled_rows(const scalar_t* tc, int64_t ty, const Dims& d, scalar_t* up) {
  const int64_t len = d.up_len();
  for (int dy = -1; dy <= 1; ++dy) {
    scalar_t* u = up + (dy + 1) * len;
    if (!inside(ty, dy, d.h)) {
      continue;  // zero-filled once by the caller
    }
    const scalar_t* src = tc + (ty + dy) * d.w;
    std::fill(u, u + d.rw, scalar_t(0));
    for (int64_t t = 0; t < d.w; ++t) {
      std::fill(u + (t + 1) * d.rw, u + (t + 2) * d.rw, src[t]);
    }
    std::fill(u + (d.w + 1) * d.rw, u + len, scalar_t(0));
  }
}

// Softmax weights of the rh pixel rows of token row (b, ty) into dst[n * n_stride + py * W + x].
template <typename scalar_t>
void row_weights(const scalar_t* affinity, int64_t b, int64_t ty, const Dims& d, scalar_t* dst,
                 int64_t n_stride) {
  const int64_t plane = d.hw();
  const scalar_t* a_b = affinity + b * kNeighbours * d.R() * plane;
  scalar_t logits[kNeighbours];
  scalar_t weights[kNeighbours];
  for (int64_t py = 0; py < d.rh; ++py) {
    for (int64_t tx = 0; tx < d.w; ++tx) {
      for (int64_t px = 0; px < d.rw; ++px) {
        const scalar_t* a = a_b + affinity_channel(0, py, px, d.rh, d.rw) * plane + ty * d.w + tx;
        load_masked_logits(a, d.R() * plane, ty, tx, d.h, d.w, logits);
        masked_softmax(logits, weights);
        const int64_t x = tx * d.rw + px;
        for (int n = 0; n < kNeighbours; ++n) {
          dst[n * n_stride + py * d.W + x] = weights[n];
        }
      }
    }
  }
}

// out[x] = sum_n w[n][x] * u[n][x] over the 9 neighbours, x in [0, len).
template <typename scalar_t>
void weighted_sum9(const scalar_t* const* w, const scalar_t* const* u, scalar_t* out,
                   int64_t len) {
  const scalar_t *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3], *w4 = w[4], *w5 = w[5];
  const scalar_t *w6 = w[6], *w7 = w[7], *w8 = w[8];
  const scalar_t *u0 = u[0], *u1 = u[1], *u2 = u[2], *u3 = u[3], *u4 = u[4], *u5 = u[5];
  const scalar_t *u6 = u[6], *u7 = u[7], *u8 = u[8];
  TOKEN_ASSOCIATION_IVDEP
  for (int64_t x = 0; x < len; ++x) {
    out[x] = w0[x] * u0[x] + w1[x] * u1[x] + w2[x] * u2[x] + w3[x] * u3[x] + w4[x] * u4[x] +
             w5[x] * u5[x] + w6[x] * u6[x] + w7[x] * u7[x] + w8[x] * u8[x];
  }
}

// g[n][x] += go[x] * u[n][x] for the 9 neighbours, x in [0, len).
template <typename scalar_t>
void multiply_add9(scalar_t* const* g, const scalar_t* go, const scalar_t* const* u, int64_t len) {
  scalar_t *g0 = g[0], *g1 = g[1], *g2 = g[2], *g3 = g[3], *g4 = g[4], *g5 = g[5];
  scalar_t *g6 = g[6], *g7 = g[7], *g8 = g[8];
  const scalar_t *u0 = u[0], *u1 = u[1], *u2 = u[2], *u3 = u[3], *u4 = u[4], *u5 = u[5];
  const scalar_t *u6 = u[6], *u7 = u[7], *u8 = u[8];
  TOKEN_ASSOCIATION_IVDEP
  for (int64_t x = 0; x < len; ++x) {
    const scalar_t v = go[x];
    g0[x] += v * u0[x];
    g1[x] += v * u1[x];
    g2[x] += v * u2[x];
    g3[x] += v * u3[x];
    g4[x] += v * u4[x];
    g5[x] += v * u5[x];
    g6[x] += v * u6[x];
    g7[x] += v * u7[x];
    g8[x] += v * u8[x];
  }
}

// acc[x] += a[x] * b[x], x in [0, len).
template <typename scalar_t>
void multiply_add(scalar_t* acc, const scalar_t* a, const scalar_t* b, int64_t len) {
  TOKEN_ASSOCIATION_IVDEP
  for (int64_t x = 0; x < len; ++x) {
    acc[x] += a[x] * b[x];
  }
}

template <typename scalar_t>
void forward_kernel(const scalar_t* affinity, const scalar_t* tokens, scalar_t* output,
                    scalar_t* weights, const Dims& d) {
  const int64_t work_per_row = (d.C + 1) * kNeighbours * d.rh * d.W;
  at::parallel_for(0, d.B * d.h, grain_in_rows(work_per_row), [&](int64_t begin, int64_t end) {
    // Weights of one token row when they are not stored: [n][py][x].
    std::vector<scalar_t> local(weights == nullptr ? kNeighbours * d.rh * d.W : 0);
    std::vector<scalar_t> up(3 * d.up_len(), scalar_t(0));
    const scalar_t* wp[kNeighbours];
    const scalar_t* uq[kNeighbours];  // neighbour n of output column x is uq[n][x]
    for (int n = 0; n < kNeighbours; ++n) {
      uq[n] = up.data() + (neighbour_dy(n) + 1) * d.up_len() + (neighbour_dx(n) + 1) * d.rw;
    }
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / d.h, ty = r % d.h;
      scalar_t* wr = weights != nullptr ? weights + b * kNeighbours * d.HW() + ty * d.rh * d.W
                                        : local.data();
      const int64_t n_stride = weights != nullptr ? d.HW() : d.rh * d.W;
      row_weights(affinity, b, ty, d, wr, n_stride);
      std::fill(up.begin(), up.end(), scalar_t(0));  // rows outside the grid stay zero
      for (int64_t c = 0; c < d.C; ++c) {
        const int64_t bc = b * d.C + c;
        fill_upsampled_rows(tokens + bc * d.hw(), ty, d, up.data());
        for (int64_t py = 0; py < d.rh; ++py) {
          for (int n = 0; n < kNeighbours; ++n) {
            wp[n] = wr + n * n_stride + py * d.W;
          }
          scalar_t* out = output + (bc * d.H + ty * d.rh + py) * d.W;
          weighted_sum9(wp, uq, out, d.W);
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_affinity_kernel(const scalar_t* grad_output, const scalar_t* weights,
                              const scalar_t* tokens, scalar_t* grad_affinity, const Dims& d) {
  const int64_t work_per_row = (d.C + 1) * kNeighbours * d.rh * d.W;
  at::parallel_for(0, d.B * d.h, grain_in_rows(work_per_row), [&](int64_t begin, int64_t end) {
    // g[n][py][x] = sum_c grad_output[c, y, x] * tokens[c, neighbour n]: dL / d weight.
    std::vector<scalar_t> g(kNeighbours * d.rh * d.W);
    std::vector<scalar_t> up(3 * d.up_len(), scalar_t(0));
    scalar_t w9[kNeighbours], g9[kNeighbours], ga9[kNeighbours];
    scalar_t* gp[kNeighbours];
    const scalar_t* uq[kNeighbours];
    for (int n = 0; n < kNeighbours; ++n) {
      uq[n] = up.data() + (neighbour_dy(n) + 1) * d.up_len() + (neighbour_dx(n) + 1) * d.rw;
    }
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / d.h, ty = r % d.h;
      std::fill(g.begin(), g.end(), scalar_t(0));
      std::fill(up.begin(), up.end(), scalar_t(0));
      for (int64_t c = 0; c < d.C; ++c) {
        const int64_t bc = b * d.C + c;
        fill_upsampled_rows(tokens + bc * d.hw(), ty, d, up.data());
        for (int64_t py = 0; py < d.rh; ++py) {
          const scalar_t* go = grad_output + (bc * d.H + ty * d.rh + py) * d.W;
          for (int n = 0; n < kNeighbours; ++n) {
            gp[n] = g.data() + (n * d.rh + py) * d.W;
          }
          // Out-of-grid neighbours read the zero padding: their g stays 0, as their weight.
          multiply_add9(gp, go, uq, d.W);
        }
      }
      const scalar_t* wr = weights + b * kNeighbours * d.HW() + ty * d.rh * d.W;
      scalar_t* ga = grad_affinity + b * kNeighbours * d.R() * d.hw() + ty * d.w;
      for (int64_t py = 0; py < d.rh; ++py) {
        for (int64_t x = 0; x < d.W; ++x) {
          for (int n = 0; n < kNeighbours; ++n) {
            w9[n] = wr[n * d.HW() + py * d.W + x];
            g9[n] = g[(n * d.rh + py) * d.W + x];
          }
          masked_softmax_backward(w9, g9, ga9);
          const int64_t tx = x / d.rw, px = x % d.rw;
          for (int n = 0; n < kNeighbours; ++n) {
            ga[affinity_channel(n, py, px, d.rh, d.rw) * d.hw() + tx] = ga9[n];
          }
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_tokens_kernel(const scalar_t* grad_output, const scalar_t* weights,
                            scalar_t* grad_tokens, const Dims& d) {
  const int64_t work_per_row = d.C * kNeighbours * d.rh * d.W;
  at::parallel_for(0, d.B * d.h, grain_in_rows(work_per_row), [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> s(d.W);  // weight * grad_output summed over dy and py, one dx
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / d.h, sy = r % d.h;
      for (int64_t c = 0; c < d.C; ++c) {
        const int64_t bc = b * d.C + c;
        scalar_t* gt = grad_tokens + (bc * d.h + sy) * d.w;
        std::fill(gt, gt + d.w, scalar_t(0));
        // Token (sy, sx) is neighbour n = (dy, dx) of token (sy - dy, sx - dx). Per column
        // offset dx, s[x] sums weight * grad_output over the valid dy and the rh pixel rows;
        // then the rw columns of every token are added to the token at tx + dx.
        for (int dx = -1; dx <= 1; ++dx) {
          std::fill(s.begin(), s.end(), scalar_t(0));
          for (int dy = -1; dy <= 1; ++dy) {
            if (!inside(sy, -dy, d.h)) {
              continue;
            }
            const int n = neighbour_index(dy, dx);
            const int64_t ty = sy - dy;
            const scalar_t* wr = weights + (b * kNeighbours + n) * d.HW() + ty * d.rh * d.W;
            const scalar_t* go = grad_output + (bc * d.H + ty * d.rh) * d.W;
            for (int64_t py = 0; py < d.rh; ++py) {
              multiply_add(s.data(), wr + py * d.W, go + py * d.W, d.W);
            }
          }
          for (int64_t tx = std::max<int64_t>(0, -dx); tx < std::min(d.w, d.w - dx); ++tx) {
            scalar_t sum = scalar_t(0);
            for (int64_t px = 0; px < d.rw; ++px) {
              sum += s[tx * d.rw + px];
            }
            gt[tx + dx] += sum;
          }
        }
      }
    }
  });
}

}  // namespace

void token_association_forward_cpu(const at::Tensor& affinity, const at::Tensor& tokens,
                                   int64_t rh, int64_t rw, at::Tensor& output,
                                   at::Tensor& weights) {
  const Dims d = make_dims(tokens, rh, rw);
  AT_DISPATCH_FLOATING_TYPES(tokens.scalar_type(), "token_association_forward_cpu", [&] {
    forward_kernel<scalar_t>(affinity.const_data_ptr<scalar_t>(),
                             tokens.const_data_ptr<scalar_t>(), output.data_ptr<scalar_t>(),
                             weights.defined() ? weights.data_ptr<scalar_t>() : nullptr, d);
  });
}

void token_association_backward_affinity_cpu(const at::Tensor& grad_output,
                                             const at::Tensor& weights, const at::Tensor& tokens,
                                             int64_t rh, int64_t rw, at::Tensor& grad_affinity) {
  const Dims d = make_dims(tokens, rh, rw);
  AT_DISPATCH_FLOATING_TYPES(tokens.scalar_type(), "token_association_backward_affinity_cpu", [&] {
    backward_affinity_kernel<scalar_t>(
        grad_output.const_data_ptr<scalar_t>(), weights.const_data_ptr<scalar_t>(),
        tokens.const_data_ptr<scalar_t>(), grad_affinity.data_ptr<scalar_t>(), d);
  });
}

void token_association_backward_tokens_cpu(const at::Tensor& grad_output,
                                           const at::Tensor& weights, int64_t rh, int64_t rw,
                                           at::Tensor& grad_tokens) {
  const int64_t h = grad_tokens.size(2), w = grad_tokens.size(3);
  const Dims d{grad_tokens.size(0), grad_tokens.size(1), h, w, rh, rw, h * rh, w * rw};
  AT_DISPATCH_FLOATING_TYPES(
      grad_output.scalar_type(), "token_association_backward_tokens_cpu", [&] {
        backward_tokens_kernel<scalar_t>(grad_output.const_data_ptr<scalar_t>(),
                                         weights.const_data_ptr<scalar_t>(),
                                         grad_tokens.data_ptr<scalar_t>(), d);
      });
}

}  // namespace seg_methods
