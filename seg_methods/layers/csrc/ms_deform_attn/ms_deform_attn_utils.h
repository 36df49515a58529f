// Per-element math of multi-scale deformable attention (Deformable DETR, Zhu et al. 2021, Eq. 3;
// used by Mask2Former's pixel decoder), written once and compiled into both the CPU kernels
// (ms_deform_attn_cpu.cpp) and the CUDA kernels (ms_deform_attn_cuda.cu).
//
// Sampling convention (identical to F.grid_sample(mode="bilinear", padding_mode="zeros",
// align_corners=False) on the grid 2 * loc - 1): a normalized location (x, y) in [0, 1] of a level
// with H x W pixels is read at the continuous pixel position
//     w_im = x * W - 0.5,   h_im = y * H - 0.5
// so pixel (i, j) has its centre at ((j + 0.5) / W, (i + 0.5) / H). The value there is the bilinear
// blend of the four neighbouring pixels; neighbours outside the map contribute zero.
#pragma once

#include <cmath>
#include <cstdint>

#include "macros.h"

namespace seg_methods {
namespace ms_deform_attn {

// Corner order: 0 = (h_low, w_low), 1 = (h_low, w_high), 2 = (h_high, w_low), 3 = (h_high, w_high).
template <typename T>
struct BilinearSample {
  int64_t offset[4];  // pixel index h * W + w inside the level; only meaningful where valid[c]
  T weight[4];        // bilinear weight of each corner; 0 for corners outside the map
  bool valid[4];      // whether the corner lies inside the H x W map
  T lh;               // h_im - floor(h_im), in [0, 1)
  T lw;               // w_im - floor(w_im), in [0, 1)
  bool all_valid;     // all four corners inside the map (the common case, fused fast path)
};

template <typename T>
HOST_DEVICE_INLINE T floor_value(T x) {
#if defined(__CUDA_ARCH__)
  return floor(x);
#else
  return std::floor(x);
#endif
}

// Fills `s` for the normalized location (loc_x, loc_y) on a level of size height x width.
// Returns false when no corner can contribute (the position is at least one pixel outside the map,
// or not finite); `s` is then left unspecified.
template <typename T>
HOST_DEVICE_INLINE bool bilinear_sample(T loc_x, T loc_y, int64_t height, int64_t width,
                                        BilinearSample<T>& s) {
  const T h_im = loc_y * static_cast<T>(height) - static_cast<T>(0.5);
  const T w_im = loc_x * static_cast<T>(width) - static_cast<T>(0.5);
  // Written so that NaN fails the test; also keeps floor() away from huge values before the
  // integer conversion below. The bound -1 is inclusive: the value there is 0, but grid_sample's
  // one-sided derivative (cell [-1, 0]) is not, and we match it.
  if (!(h_im >= static_cast<T>(-1) && w_im >= static_cast<T>(-1) && h_im < static_cast<T>(height) &&
        w_im < static_cast<T>(width))) {
    return false;
  }
  const T h_floor = floor_value(h_im);
  const T w_floor = floor_value(w_im);
  const int64_t h_low = static_cast<int64_t>(h_floor);  // in [-1, height - 1]
  const int64_t w_low = static_cast<int64_t>(w_floor);  // in [-1, width - 1]
  const int64_t h_high = h_low + 1;
  const int64_t w_high = w_low + 1;
  s.lh = h_im - h_floor;
  s.lw = w_im - w_floor;
  const T hh = static_cast<T>(1) - s.lh;
  const T hw = static_cast<T>(1) - s.lw;

  const bool h_low_ok = h_low >= 0;
  const bool h_high_ok = h_high <= height - 1;
  const bool w_low_ok = w_low >= 0;
  const bool w_high_ok = w_high <= width - 1;
  s.valid[0] = h_low_ok && w_low_ok;
  s.valid[1] = h_low_ok && w_high_ok;
  s.valid[2] = h_high_ok && w_low_ok;
  s.valid[3] = h_high_ok && w_high_ok;
  s.all_valid = s.valid[0] && s.valid[3];

  s.offset[0] = h_low * width + w_low;
  s.offset[1] = h_low * width + w_high;
  s.offset[2] = h_high * width + w_low;
  s.offset[3] = h_high * width + w_high;

  const T zero = static_cast<T>(0);
  s.weight[0] = s.valid[0] ? hh * hw : zero;
  s.weight[1] = s.valid[1] ? hh * s.lw : zero;
  s.weight[2] = s.valid[2] ? s.lh * hw : zero;
  s.weight[3] = s.valid[3] ? s.lh * s.lw : zero;
  return true;
}

// Gradients of one sampling point given the dot products corner_dot[c] = <grad_out, v_c> between
// the output gradient of its (query, head) and the value vector v_c of each corner (0 for invalid
// corners). With sampled = sum_c weight_c * v_c and output += attn * sampled:
//   d out / d attn  = sampled                      -> grad_attn = sum_c weight_c * corner_dot[c]
//   d out / d w_im  = attn * sum_c (d weight_c / d lw) * v_c, and d w_im / d x = W
//   d out / d h_im  = attn * sum_c (d weight_c / d lh) * v_c, and d h_im / d y = H
// Inside a cell the weights are products (1-lh or lh) * (1-lw or lw), so
//   d weight / d lw = (-(1-lh), (1-lh), -lh, lh),  d weight / d lh = (-(1-lw), -lw, (1-lw), lw).
// The one-sided derivative at integer positions is the one of the cell [floor, floor + 1], as in
// grid_sample's backward.
template <typename T>
HOST_DEVICE_INLINE void point_gradients(const BilinearSample<T>& s, const T corner_dot[4], T attn,
                                        int64_t height, int64_t width, T* grad_attn, T* grad_loc_x,
                                        T* grad_loc_y) {
  const T hh = static_cast<T>(1) - s.lh;
  const T hw = static_cast<T>(1) - s.lw;
  const T zero = static_cast<T>(0);
  const T d0 = s.valid[0] ? corner_dot[0] : zero;
  const T d1 = s.valid[1] ? corner_dot[1] : zero;
  const T d2 = s.valid[2] ? corner_dot[2] : zero;
  const T d3 = s.valid[3] ? corner_dot[3] : zero;
  *grad_attn = s.weight[0] * d0 + s.weight[1] * d1 + s.weight[2] * d2 + s.weight[3] * d3;
  const T d_lw = hh * (d1 - d0) + s.lh * (d3 - d2);
  const T d_lh = hw * (d2 - d0) + s.lw * (d3 - d1);
  *grad_loc_x = attn * static_cast<T>(width) * d_lw;
  *grad_loc_y = attn * static_cast<T>(height) * d_lh;
}

}  // namespace ms_deform_attn
}  // namespace seg_methods
