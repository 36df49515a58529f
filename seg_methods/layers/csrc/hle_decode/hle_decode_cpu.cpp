// CPU kernels of the HLE decoding (see hle_decode.h), parallelised with at::parallel_for. The
// per-element math (Phi's exponent, joining, suppression, the exponential filter and the group
// bounds) is hle_decode_utils.h, shared with CUDA.
//
// - assign: tasks over ranges of kRange pixels. A task packs the embeddings of up to kChunk
//   *masked-in* pixels of its range (pixels outside pixel_mask are never evaluated) into a local
//   (D, kChunk) buffer, then scans the seeds in order: one vectorisable pass computes the dot
//   products and exponents of the chunk, a second one tests the exponential filter and computes
//   exp only for the exponents that pass (the pixels near the winning seed). Before that, a
//   conservative bound of the exponent over the whole chunk (embedding cone around the chunk's
//   mean direction, distance to the chunk's bounding box; hle_decode_utils.h) skips the seeds that
//   cannot win any pixel of the chunk. Each task owns its pixels: no atomics, and the result does
//   not depend on the number of threads.
// - select: the greedy suppression over the candidates (sequential over the kept seeds; the
//   candidates of one seed are scanned in one loop).
// - rows: tasks over (seed, chunk of pixels), Phi written in full.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "hle_decode.h"
#include "hle_decode_utils.h"

namespace seg_methods {

namespace {

using namespace hle_decode;

constexpr int64_t kRange = 4096;  // pixels per assign task
constexpr int64_t kChunk = 64;    // masked-in pixels evaluated together

// Seeds' per-seed constants, in the tensor dtype (for the exact per-pixel math) and in double
// (for the chunk bounds).
template <typename scalar_t>
struct SeedTable {
  std::vector<scalar_t> den;      // (K,) 2 sigma^2
  std::vector<double> den_d;      // (K,)
  std::vector<double> emb_d;      // (K, D)
  std::vector<double> norm;       // (K,) |e_i|
  std::vector<char> finite;       // (K,) every value of the seed is finite

  SeedTable(const scalar_t* se, const scalar_t* sp, const scalar_t* ss, int64_t K, int64_t D)
      : den(K), den_d(K), emb_d(K * D), norm(K), finite(K) {
    for (int64_t k = 0; k < K; ++k) {
      den[k] = kernel_denominator(ss[k]);
      den_d[k] = static_cast<double>(den[k]);
      double n2 = 0.0;
      bool ok = std::isfinite(den_d[k]) && std::isfinite(static_cast<double>(sp[2 * k])) &&
                std::isfinite(static_cast<double>(sp[2 * k + 1]));
      for (int64_t d = 0; d < D; ++d) {
        const double v = static_cast<double>(se[k * D + d]);
        emb_d[k * D + d] = v;
        n2 += v * v;
        ok = ok && std::isfinite(v);
      }
      norm[k] = std::sqrt(n2);
      finite[k] = ok;
    }
  }
};

// Conservative description of a chunk of pixels for exponent_upper_bound: embedding cone
// e_k = a_k c + r_k (a_k in [a_min, a_max], |r_k| <= r_max), max norm, bounding box.
struct ChunkBound {
  bool usable = false;  // false: a value is not finite, the chunk is never skipped
  std::vector<double> centre;
  double a_min = 0.0, a_max = 0.0, r_max = 0.0, norm_max = 0.0;
  double y_lo = 0.0, y_hi = 0.0, x_lo = 0.0, x_hi = 0.0;

  template <typename scalar_t>
  void build(const scalar_t* eb, const scalar_t* py, const scalar_t* px, int64_t n, int64_t D) {
    centre.assign(D, 0.0);
    usable = true;
    for (int64_t i = 0; i < n && usable; ++i) {
      usable = std::isfinite(static_cast<double>(py[i])) &&
               std::isfinite(static_cast<double>(px[i]));
      for (int64_t d = 0; d < D; ++d) {
        const double v = static_cast<double>(eb[d * kChunk + i]);
        usable = usable && std::isfinite(v);
        centre[d] += v;
      }
    }
    if (!usable) {
      return;
    }
    double c2 = 0.0;
    for (int64_t d = 0; d < D; ++d) {
      c2 += centre[d] * centre[d];
    }
    const double cn = std::sqrt(c2);
    for (int64_t d = 0; d < D; ++d) {
      centre[d] = cn > 0.0 ? centre[d] / cn : 0.0;  // c = 0: the bound is Cauchy-Schwarz
    }
    a_min = INFINITY;
    a_max = -INFINITY;
    r_max = 0.0;
    norm_max = 0.0;
    y_lo = x_lo = INFINITY;
    y_hi = x_hi = -INFINITY;
    for (int64_t i = 0; i < n; ++i) {
      double a = 0.0, n2 = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        const double v = static_cast<double>(eb[d * kChunk + i]);
        a += v * centre[d];
        n2 += v * v;
      }
      a_min = std::min(a_min, a);
      a_max = std::max(a_max, a);
      // |r|^2 = |e|^2 - a^2 up to rounding; the 1e-12 |e|^2 covers the cancellation.
      r_max = std::max(r_max, std::sqrt(std::max(0.0, n2 - a * a) + 1e-12 * n2));
      norm_max = std::max(norm_max, std::sqrt(n2));
      y_lo = std::min(y_lo, static_cast<double>(py[i]));
      y_hi = std::max(y_hi, static_cast<double>(py[i]));
      x_lo = std::min(x_lo, static_cast<double>(px[i]));
      x_hi = std::max(x_hi, static_cast<double>(px[i]));
    }
  }

  // Upper bound of the exponent of seed k over the chunk (NaN-free when usable and the seed is
  // finite).
  template <typename scalar_t>
  double exponent_bound(
      const SeedTable<scalar_t>& seeds, const scalar_t* sp, int64_t k, int64_t D,
      double den_s) const {
    const double* s = seeds.emb_d.data() + k * D;
    double s_c = 0.0;
    for (int64_t d = 0; d < D; ++d) {
      s_c += s[d] * centre[d];
    }
    const double sn = seeds.norm[k];
    const double s_perp = std::sqrt(std::max(0.0, sn * sn - s_c * s_c) + 1e-12 * sn * sn);
    const double dot_max = dot_upper_bound(s_c, s_perp, a_min, a_max, r_max);
    const double dist2 = interval_gap2(static_cast<double>(sp[2 * k]), y_lo, y_hi) +
                         interval_gap2(static_cast<double>(sp[2 * k + 1]), x_lo, x_hi);
    return exponent_upper_bound(dot_max, norm_max * sn, dist2, seeds.den_d[k], den_s);
  }
};

template <typename scalar_t>
void assign_kernel(
    const scalar_t* se, const scalar_t* sp, const scalar_t* ss, int64_t K, const scalar_t* emb,
    int64_t stride_p, int64_t stride_d, const scalar_t* pos, const bool* mask, int64_t P,
    int64_t D, double den_s_d, double mask_threshold, int64_t* labels, scalar_t* best) {
  const SeedTable<scalar_t> seeds(se, sp, ss, K, D);
  const scalar_t den_s = static_cast<scalar_t>(den_s_d);
  const scalar_t thr = static_cast<scalar_t>(mask_threshold);
  const scalar_t cut0 = static_cast<scalar_t>(exponent_cut(mask_threshold));
  const int64_t ranges = (P + kRange - 1) / kRange;
  // One range is kRange * K * D multiply-adds at most; small problems run inline.
  const int64_t grain =
      std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(1, kRange * K * (D + 8)));
  at::parallel_for(0, ranges, grain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> eb(D * kChunk);
    scalar_t py[kChunk], px[kChunk], acc[kChunk], expo[kChunk], bst[kChunk], cut[kChunk];
    int64_t lab[kChunk], idx[kChunk];
    ChunkBound bound;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t p0 = r * kRange;
      const int64_t p1 = std::min(P, p0 + kRange);
      std::fill(labels + p0, labels + p1, int64_t(-1));
      std::fill(best + p0, best + p1, scalar_t(0));
      int64_t p = p0;
      while (p < p1) {
        // Pack the next (up to) kChunk masked-in pixels.
        int64_t n = 0;
        for (; p < p1 && n < kChunk; ++p) {
          if (mask[p]) {
            idx[n++] = p;
          }
        }
        if (n == 0) {
          break;
        }
        for (int64_t d = 0; d < D; ++d) {
          scalar_t* dst = eb.data() + d * kChunk;
          for (int64_t i = 0; i < n; ++i) {
            dst[i] = emb[idx[i] * stride_p + d * stride_d];
          }
        }
        for (int64_t i = 0; i < n; ++i) {
          py[i] = pos[2 * idx[i]];
          px[i] = pos[2 * idx[i] + 1];
          bst[i] = scalar_t(0);
          lab[i] = -1;
          cut[i] = cut0;
        }
        bound.build(eb.data(), py, px, n, D);
        double min_cut = static_cast<double>(cut0);
        for (int64_t k = 0; k < K; ++k) {
          if (bound.usable && seeds.finite[k] &&
              bound.exponent_bound(seeds, sp, k, D, den_s_d) <= min_cut) {
            continue;  // no pixel of the chunk can join seed k
          }
          const scalar_t* s = se + k * D;
          for (int64_t i = 0; i < n; ++i) {
            acc[i] = scalar_t(0);
          }
          for (int64_t d = 0; d < D; ++d) {
            const scalar_t sd = s[d];
            const scalar_t* e = eb.data() + d * kChunk;
            for (int64_t i = 0; i < n; ++i) {
              acc[i] += e[i] * sd;
            }
          }
          const scalar_t sy = sp[2 * k], sx = sp[2 * k + 1], den_i = seeds.den[k];
          for (int64_t i = 0; i < n; ++i) {
            expo[i] = kernel_exponent(acc[i], py[i] - sy, px[i] - sx, den_i, den_s);
          }
          bool joined = false;
          for (int64_t i = 0; i < n; ++i) {
            if (passes_cut(expo[i], cut[i])) {
              const scalar_t phi = kernel_value(expo[i]);
              if (pixel_joins(phi, bst[i], thr)) {
                bst[i] = phi;
                lab[i] = k;
                cut[i] = expo[i];  // a later seed must beat exp(expo[i]) = bst[i]
                joined = true;
              }
            }
          }
          if (joined) {
            min_cut = static_cast<double>(*std::min_element(cut, cut + n));
          }
        }
        for (int64_t i = 0; i < n; ++i) {
          labels[idx[i]] = lab[i];
          best[idx[i]] = bst[i];
        }
      }
    }
  });
}

template <typename scalar_t>
int64_t select_kernel(
    const scalar_t* ce, const scalar_t* cp, const scalar_t* cs, int64_t K0, int64_t D,
    double den_s_d, double merge_threshold, int64_t slots, int64_t* kept) {
  const scalar_t den_s = static_cast<scalar_t>(den_s_d);
  const scalar_t merge = static_cast<scalar_t>(merge_threshold);
  const scalar_t merge_cut = static_cast<scalar_t>(exponent_cut(merge_threshold));
  std::vector<char> active(K0, 1);
  int64_t count = 0;
  for (int64_t c = 0; c < K0 && count < slots; ++c) {
    if (!active[c]) {
      continue;
    }
    kept[count++] = c;
    active[c] = 0;
    const scalar_t* s = ce + c * D;
    const scalar_t den_i = kernel_denominator(cs[c]);
    const scalar_t sy = cp[2 * c], sx = cp[2 * c + 1];
    for (int64_t j = c + 1; j < K0; ++j) {
      if (!active[j]) {
        continue;
      }
      const scalar_t* e = ce + j * D;
      scalar_t dot = scalar_t(0);
      for (int64_t d = 0; d < D; ++d) {
        dot += e[d] * s[d];
      }
      const scalar_t a = kernel_exponent(dot, cp[2 * j] - sy, cp[2 * j + 1] - sx, den_i, den_s);
      // exp(a) <= merge_threshold below the cut; NaN always suppresses.
      if ((passes_cut(a, merge_cut) || a != a) && seed_suppresses(kernel_value(a), merge)) {
        active[j] = 0;
      }
    }
  }
  return count;
}

template <typename scalar_t>
void rows_kernel(
    const scalar_t* se, const scalar_t* sp, const scalar_t* ss, int64_t K, const scalar_t* emb,
    int64_t stride_p, int64_t stride_d, const scalar_t* pos, int64_t P, int64_t D,
    double den_s_d, scalar_t* rows) {
  const scalar_t den_s = static_cast<scalar_t>(den_s_d);
  constexpr int64_t kRowChunk = 1024;
  const int64_t chunks = (P + kRowChunk - 1) / kRowChunk;
  const int64_t grain = std::max<int64_t>(1, 32768 / (kRowChunk * (D + 8)));
  at::parallel_for(0, K * chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task / chunks;
      const int64_t p0 = (task % chunks) * kRowChunk;
      const int64_t p1 = std::min(P, p0 + kRowChunk);
      const scalar_t* s = se + k * D;
      const scalar_t den_i = kernel_denominator(ss[k]);
      const scalar_t sy = sp[2 * k], sx = sp[2 * k + 1];
      scalar_t* out = rows + k * P;
      for (int64_t p = p0; p < p1; ++p) {
        scalar_t dot = scalar_t(0);
        for (int64_t d = 0; d < D; ++d) {
          dot += emb[p * stride_p + d * stride_d] * s[d];
        }
        out[p] = kernel_value(kernel_exponent(dot, pos[2 * p] - sy, pos[2 * p + 1] - sx, den_i,
                                              den_s));
      }
    }
  });
}

}  // namespace

void hle_kernel_rows_cpu(
    const at::Tensor& seed_embeddings, const at::Tensor& seed_positions,
    const at::Tensor& seed_sigmas, const at::Tensor& embeddings, const at::Tensor& positions,
    double den_s, at::Tensor& rows) {
  const int64_t K = seed_embeddings.size(0), P = embeddings.size(0), D = embeddings.size(1);
  AT_DISPATCH_FLOATING_TYPES(embeddings.scalar_type(), "hle_kernel_rows_cpu", [&] {
    rows_kernel<scalar_t>(
        seed_embeddings.const_data_ptr<scalar_t>(),
        seed_positions.const_data_ptr<scalar_t>(),
        seed_sigmas.const_data_ptr<scalar_t>(),
        K,
        embeddings.const_data_ptr<scalar_t>(),
        embeddings.stride(0),
        embeddings.stride(1),
        positions.const_data_ptr<scalar_t>(),
        P,
        D,
        den_s,
        rows.data_ptr<scalar_t>());
  });
}

void hle_assign_pixels_cpu(
    const at::Tensor& seed_embeddings, const at::Tensor& seed_positions,
    const at::Tensor& seed_sigmas, const at::Tensor& embeddings, const at::Tensor& positions,
    const at::Tensor& pixel_mask, double den_s, double mask_threshold, at::Tensor& labels,
    at::Tensor& best) {
  const int64_t K = seed_embeddings.size(0), P = embeddings.size(0), D = embeddings.size(1);
  AT_DISPATCH_FLOATING_TYPES(embeddings.scalar_type(), "hle_assign_pixels_cpu", [&] {
    assign_kernel<scalar_t>(
        seed_embeddings.const_data_ptr<scalar_t>(),
        seed_positions.const_data_ptr<scalar_t>(),
        seed_sigmas.const_data_ptr<scalar_t>(),
        K,
        embeddings.const_data_ptr<scalar_t>(),
        embeddings.stride(0),
        embeddings.stride(1),
        positions.const_data_ptr<scalar_t>(),
        pixel_mask.const_data_ptr<bool>(),
        P,
        D,
        den_s,
        mask_threshold,
        labels.data_ptr<int64_t>(),
        best.data_ptr<scalar_t>());
  });
}

int64_t hle_select_seeds_cpu(
    const at::Tensor& cand_embeddings, const at::Tensor& cand_positions,
    const at::Tensor& cand_sigmas, double den_s, double merge_threshold, at::Tensor& kept) {
  const int64_t K0 = cand_embeddings.size(0), D = cand_embeddings.size(1);
  int64_t count = 0;
  AT_DISPATCH_FLOATING_TYPES(cand_embeddings.scalar_type(), "hle_select_seeds_cpu", [&] {
    count = select_kernel<scalar_t>(
        cand_embeddings.const_data_ptr<scalar_t>(),
        cand_positions.const_data_ptr<scalar_t>(),
        cand_sigmas.const_data_ptr<scalar_t>(),
        K0,
        D,
        den_s,
        merge_threshold,
        kept.size(0),
        kept.data_ptr<int64_t>());
  });
  return count;
}

}  // namespace seg_methods
