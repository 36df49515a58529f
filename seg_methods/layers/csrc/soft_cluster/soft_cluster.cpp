// Device-generic tiling driver of the fused soft clustering step (see soft_cluster.h) and its
// registration as torch.ops.seg_methods.soft_cluster_{forward,backward}.
//
// Forward, per tile of T pixels (ClustSeg Eq. 10, CMT-DeepLab Eq. 5-7):
//   L_t = scale * q k_t^T (+ bias_t)          batched GEMM              (B, K, T)
//   M_t = softmax_K(L_t), lse_t               tile kernel (per pixel)   (B, K, T), (B, T)
//   U  += M_t v_t                             batched GEMM              (B, K, Dv)
// Backward, per tile (M_t recomputed from the saved lse unless the forward returned it):
//   dV_t = M_t^T dU;   dM_t = dU v_t^T (+ grad of the returned assignment)
//   dL_t = M_t * (dM_t - sum_K M_t dM_t) (+ grad of the returned logits)
//   dbias_t = dL_t;   dq += scale * dL_t k_t;   dk_t = scale * dL_t^T q
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>

#include "macros.h"
#include "soft_cluster.h"

namespace seg_methods {

namespace {

// Pixels per tile: about 2^18 (CPU) or 2^22 (CUDA) elements in one (B, K, T) tile but at least 512
// pixels (so the per-batch GEMMs stay efficient when B * K is large), at most what gives every CPU
// thread a tile, a multiple of 64. Our choice (not from the papers): on the CPU a 1 MiB float tile
// keeps the per-pixel softmax in the L2 cache while the GEMMs stay large enough for BLAS.
int64_t pick_tile(
    const at::Tensor& ref, int64_t B, int64_t K, int64_t HW, int64_t slots, int64_t requested) {
  if (requested > 0) {
    return requested;
  }
  const int64_t target = ref.is_cuda() ? (int64_t(1) << 22) : (int64_t(1) << 18);
  int64_t t = std::max<int64_t>(512, target / std::max<int64_t>(1, B * K));
  const int64_t per_slot = (HW + slots - 1) / slots;
  t = std::min(t, ((per_slot + 63) / 64) * 64);
  return std::max<int64_t>(64, (t / 64) * 64);
}

void check_same(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(
      t.device() == ref.device(),
      "soft_cluster: '", name, "' is on ", t.device(), " but q is on ", ref.device());
  TORCH_CHECK(
      t.scalar_type() == ref.scalar_type(),
      "soft_cluster: '", name, "' has dtype ", t.scalar_type(), " but q has ", ref.scalar_type());
}

void check_bkn(const at::Tensor& t, int64_t B, int64_t K, int64_t HW, const char* name) {
  TORCH_CHECK(
      t.dim() == 3 && t.size(0) == B && t.size(1) == K && t.size(2) == HW,
      "soft_cluster: '", name, "' must have shape (B, K, HW) = (", B, ", ", K, ", ", HW,
      "), got ", t.sizes());
}

// Validates q (B, K, D), k (B, HW, D), v (B, HW, Dv) and the optional bias (B, K, HW).
void check_inputs(
    const at::Tensor& q,
    const at::Tensor& k,
    const at::Tensor& v,
    const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(q.dim() == 3, "soft_cluster: q must have shape (B, K, D), got ", q.sizes());
  TORCH_CHECK(k.dim() == 3, "soft_cluster: k must have shape (B, HW, D), got ", k.sizes());
  TORCH_CHECK(v.dim() == 3, "soft_cluster: v must have shape (B, HW, Dv), got ", v.sizes());
  TORCH_CHECK(
      q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
      "soft_cluster: expected float32 or float64 tensors, got ", q.scalar_type(),
      " (the Python wrapper upcasts half precision)");
  check_same(q, k, "k");
  check_same(q, v, "v");
  TORCH_CHECK(
      k.size(0) == q.size(0) && v.size(0) == q.size(0),
      "soft_cluster: batch sizes differ: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(
      k.size(2) == q.size(2),
      "soft_cluster: q (B, K, D) and k (B, HW, D) must share D, got q ", q.sizes(), " and k ",
      k.sizes());
  TORCH_CHECK(
      v.size(1) == k.size(1),
      "soft_cluster: k (B, HW, D) and v (B, HW, Dv) must share HW, got k ", k.sizes(), " and v ",
      v.sizes());
  if (bias.has_value()) {
    check_same(q, *bias, "logits_bias");
    check_bkn(*bias, q.size(0), q.size(1), k.size(1), "logits_bias");
  }
}

// The contiguous version of an optional tensor (nullopt stays nullopt).
std::optional<at::Tensor> contiguous_or_none(const std::optional<at::Tensor>& t) {
  std::optional<at::Tensor> out;
  if (t.has_value()) {
    out = t->contiguous();
  }
  return out;
}

// Logits of one tile into `out` (B, K, t): q_scaled k_t^T (+ bias_t).
void tile_logits(
    at::Tensor& out,
    const at::Tensor& q_scaled,
    const at::Tensor& k_t,
    const std::optional<at::Tensor>& bias,
    int64_t start,
    int64_t len) {
  if (bias.has_value()) {
    at::baddbmm_out(out, bias->narrow(2, start, len), q_scaled, k_t.transpose(1, 2));
  } else {
    at::bmm_out(out, q_scaled, k_t.transpose(1, 2));
  }
}

// A reusable buffer of shape `full` whose last (pixel) dimension shrinks for the last tile.
at::Tensor tile_buffer(at::Tensor& full, int64_t len, int64_t full_len) {
  if (len == full_len) {
    return full;
  }
  std::vector<int64_t> sizes(full.sizes().begin(), full.sizes().end());
  sizes.back() = len;
  return at::empty(sizes, full.options());
}

// Number of private accumulators: one per CPU thread (see for_each_tile_range), one on CUDA.
int64_t num_slots(const at::Tensor& ref) {
  return ref.is_cuda() ? 1 : std::max<int64_t>(1, at::get_num_threads());
}

// Runs body(first_tile, last_tile, slot) over the tiles [0, n_tiles). On the CPU this is a single
// at::parallel_for region: every thread takes a contiguous range of tiles and runs their GEMMs
// and tile kernels itself (nested ATen parallel_for calls run inline), so there is one thread
// synchronisation per call instead of several per tile (measured here: several times faster than
// multi-threaded GEMMs tile after tile when other processes compete for the cores); `slot` (the
// thread number) selects the thread's private accumulator. On CUDA the tiles run in order on the
// current stream with slot 0.
template <typename F>
void for_each_tile_range(
    const at::Tensor& ref, int64_t n_tiles, int64_t slots, int64_t work, const F& body) {
  // Small problems run inline: waking the thread pool costs more than they do.
  constexpr int64_t kMinParallelWork = int64_t(1) << 22;  // multiply-adds
  if (ref.is_cuda() || n_tiles <= 1 || slots <= 1 || work < kMinParallelWork) {
    body(0, n_tiles, 0);
    return;
  }
  // Worker threads inherit the caller's thread-local state (grad mode, inference mode, ...).
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    const int64_t slot = at::get_thread_num();
    TORCH_CHECK(slot >= 0 && slot < slots, "soft_cluster: unexpected thread number ", slot);
    body(begin, end, slot);
  });
}

// Sum of the per-slot accumulators (slots, ...) -> (...).
at::Tensor reduce_slots(const at::Tensor& partial) {
  return partial.size(0) == 1 ? partial.select(0, 0) : partial.sum(0);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_cluster_forward(
    const at::Tensor& q_in,
    const at::Tensor& k_in,
    const at::Tensor& v_in,
    const std::optional<at::Tensor>& bias_in,
    double scale,
    bool return_logits,
    bool return_assignment,
    int64_t tile_size) {
  check_inputs(q_in, k_in, v_in, bias_in);
  c10::OptionalDeviceGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous();
  const at::Tensor k = k_in.contiguous();
  const at::Tensor v = v_in.contiguous();
  const std::optional<at::Tensor> bias = contiguous_or_none(bias_in);
  const int64_t B = q.size(0), K = q.size(1), HW = k.size(1), Dv = v.size(2);
  const auto opts = q.options();

  at::Tensor lse = at::empty({B, HW}, opts);
  at::Tensor logits = return_logits ? at::empty({B, K, HW}, opts) : at::Tensor();
  at::Tensor assign = return_assignment ? at::empty({B, K, HW}, opts) : at::Tensor();
  if (HW == 0 || B == 0) {
    return {at::zeros({B, K, Dv}, opts), lse, logits, assign};
  }
  const at::Tensor q_scaled = scale == 1.0 ? q : q * scale;
  const int64_t slots = num_slots(q);
  const int64_t T = pick_tile(q, B, K, HW, slots, tile_size);
  const int64_t n_tiles = (HW + T - 1) / T;
  at::Tensor partial = at::zeros({slots, B, K, Dv}, opts);  // per-slot sums of M_t v_t

  const int64_t work = B * K * HW * (q.size(2) + Dv);
  for_each_tile_range(q, n_tiles, slots, work, [&](int64_t first, int64_t last, int64_t s) {
    at::Tensor acc = partial.select(0, s);
    at::Tensor tile_full = at::empty({B, K, T}, opts);
    at::Tensor lse_full = at::empty({B, T}, opts);
    for (int64_t i = first; i < last; ++i) {
      const int64_t start = i * T;
      const int64_t len = std::min(T, HW - start);
      at::Tensor tile = tile_buffer(tile_full, len, T);
      at::Tensor lse_t = tile_buffer(lse_full, len, T);
      tile_logits(tile, q_scaled, k.narrow(1, start, len), bias, start, len);
      if (return_logits) {
        logits.narrow(2, start, len).copy_(tile);
      }
      soft_cluster_tile_softmax(tile, lse_t);  // tile now holds M_t
      lse.narrow(1, start, len).copy_(lse_t);
      if (return_assignment) {
        assign.narrow(2, start, len).copy_(tile);
      }
      acc.baddbmm_(tile, v.narrow(1, start, len));
    }
  });
  return {reduce_slots(partial), lse, logits, assign};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_cluster_backward(
    const std::optional<at::Tensor>& grad_update_in,
    const std::optional<at::Tensor>& grad_logits_in,
    const std::optional<at::Tensor>& grad_assign_in,
    const at::Tensor& q_in,
    const at::Tensor& k_in,
    const at::Tensor& v_in,
    const std::optional<at::Tensor>& bias_in,
    const at::Tensor& lse_in,
    const std::optional<at::Tensor>& logits_in,
    const std::optional<at::Tensor>& assign_in,
    double scale,
    std::array<bool, 4> output_mask,
    int64_t tile_size) {
  check_inputs(q_in, k_in, v_in, bias_in);
  c10::OptionalDeviceGuard guard(q_in.device());
  const int64_t B = q_in.size(0), K = q_in.size(1), D = q_in.size(2);
  const int64_t HW = k_in.size(1), Dv = v_in.size(2);
  const auto opts = q_in.options();

  auto contiguous_opt = [&](const std::optional<at::Tensor>& t, const char* name, bool bkn) {
    std::optional<at::Tensor> out;
    if (t.has_value() && t->defined()) {
      check_same(q_in, *t, name);
      if (bkn) {
        check_bkn(*t, B, K, HW, name);
      }
      out = t->contiguous();
    }
    return out;
  };
  const std::optional<at::Tensor> grad_update =
      contiguous_opt(grad_update_in, "grad_update", false);
  if (grad_update.has_value()) {
    TORCH_CHECK(
        grad_update->dim() == 3 && grad_update->size(0) == B && grad_update->size(1) == K &&
            grad_update->size(2) == Dv,
        "soft_cluster: grad_update must have shape (B, K, Dv) = (", B, ", ", K, ", ", Dv,
        "), got ", grad_update->sizes());
  }
  const std::optional<at::Tensor> grad_logits = contiguous_opt(grad_logits_in, "grad_logits", true);
  const std::optional<at::Tensor> grad_assign = contiguous_opt(grad_assign_in, "grad_assign", true);
  const std::optional<at::Tensor> logits = contiguous_opt(logits_in, "logits", true);
  const std::optional<at::Tensor> assign = contiguous_opt(assign_in, "assignment", true);
  check_same(q_in, lse_in, "lse");
  TORCH_CHECK(
      lse_in.dim() == 2 && lse_in.size(0) == B && lse_in.size(1) == HW,
      "soft_cluster: lse must have shape (B, HW) = (", B, ", ", HW, "), got ", lse_in.sizes());

  const at::Tensor q = q_in.contiguous();
  const at::Tensor k = k_in.contiguous();
  const at::Tensor v = v_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const std::optional<at::Tensor> bias = contiguous_or_none(bias_in);

  const bool need_q = output_mask[0], need_k = output_mask[1], need_v = output_mask[2];
  const bool need_bias = output_mask[3] && bias.has_value();
  const bool has_gu = grad_update.has_value();
  const bool has_gl = grad_logits.has_value();
  const bool has_gm = grad_assign.has_value();

  // dL is needed by q, k and bias; M alone by v. Without any incoming gradient all stay zero.
  const bool empty = HW == 0 || B == 0 || K == 0;
  const bool need_dl = !empty && (need_q || need_k || need_bias) && (has_gu || has_gl || has_gm);
  const bool need_dv = !empty && need_v && has_gu;
  // Gradients written tile by tile in full need no zero fill.
  auto make_grad = [&](bool needed, bool fully_written, at::IntArrayRef sizes) {
    if (!needed) {
      return at::Tensor();
    }
    return fully_written ? at::empty(sizes, opts) : at::zeros(sizes, opts);
  };
  at::Tensor grad_k = make_grad(need_k, need_dl, {B, HW, D});
  at::Tensor grad_v = make_grad(need_v, need_dv, {B, HW, Dv});
  at::Tensor grad_bias = make_grad(need_bias, need_dl, {B, K, HW});
  if (!(need_dl || need_dv)) {
    at::Tensor grad_q = need_q ? at::zeros({B, K, D}, opts) : at::Tensor();
    return {grad_q, grad_k, grad_v, grad_bias};
  }

  const at::Tensor q_scaled = scale == 1.0 ? q : q * scale;
  const int64_t slots = num_slots(q);
  const int64_t T = pick_tile(q, B, K, HW, slots, tile_size);
  const int64_t n_tiles = (HW + T - 1) / T;
  // Per-slot sums of scale * dL_t k_t.
  at::Tensor partial_q = need_q ? at::zeros({slots, B, K, D}, opts) : at::Tensor();

  const int64_t work = B * K * HW * (D + Dv);
  for_each_tile_range(q, n_tiles, slots, work, [&](int64_t first, int64_t last, int64_t s) {
    at::Tensor prob_full = at::empty({B, K, T}, opts);
    at::Tensor lse_full = at::empty({B, T}, opts);
    at::Tensor dprob_full = need_dl ? at::empty({B, K, T}, opts) : at::Tensor();
    at::Tensor extra_full = need_dl && has_gl ? at::empty({B, K, T}, opts) : at::Tensor();
    at::Tensor acc_q = need_q ? partial_q.select(0, s) : at::Tensor();
    for (int64_t i = first; i < last; ++i) {
      const int64_t start = i * T;
      const int64_t len = std::min(T, HW - start);
      const at::Tensor k_t = k.narrow(1, start, len);

      // M_t: the returned assignment, or exp(L_t - lse_t) with L_t returned or recomputed.
      at::Tensor prob = tile_buffer(prob_full, len, T);
      if (assign.has_value()) {
        prob.copy_(assign->narrow(2, start, len));
      } else {
        if (logits.has_value()) {
          prob.copy_(logits->narrow(2, start, len));
        } else {
          tile_logits(prob, q_scaled, k_t, bias, start, len);
        }
        at::Tensor lse_t = tile_buffer(lse_full, len, T);
        lse_t.copy_(lse.narrow(1, start, len));
        soft_cluster_tile_recompute(prob, lse_t);
      }

      if (need_dv) {
        at::Tensor gv_t = grad_v.narrow(1, start, len);
        at::bmm_out(gv_t, prob.transpose(1, 2), *grad_update);
      }
      if (!need_dl) {
        continue;
      }
      at::Tensor dprob = tile_buffer(dprob_full, len, T);
      if (has_gu) {
        at::bmm_out(dprob, *grad_update, v.narrow(1, start, len).transpose(1, 2));
        if (has_gm) {
          dprob.add_(grad_assign->narrow(2, start, len));
        }
      } else if (has_gm) {
        dprob.copy_(grad_assign->narrow(2, start, len));
      } else {
        dprob.zero_();
      }
      std::optional<at::Tensor> extra;
      if (has_gl) {
        at::Tensor extra_t = tile_buffer(extra_full, len, T);
        extra_t.copy_(grad_logits->narrow(2, start, len));
        extra = extra_t;
      }
      soft_cluster_tile_softmax_backward(prob, dprob, extra);  // dprob now holds dL_t
      if (need_bias) {
        grad_bias.narrow(2, start, len).copy_(dprob);
      }
      if (need_q) {
        acc_q.baddbmm_(dprob, k_t, 1.0, scale);
      }
      if (need_k) {
        at::Tensor gk_t = grad_k.narrow(1, start, len);
        at::bmm_out(gk_t, dprob.transpose(1, 2), q_scaled);
      }
    }
  });
  at::Tensor grad_q = need_q ? reduce_slots(partial_q) : at::Tensor();
  return {grad_q, grad_k, grad_v, grad_bias};
}

}  // namespace seg_methods

TORCH_LIBRARY_FRAGMENT(seg_methods, m) {
  m.def(
      "soft_cluster_forward(Tensor q, Tensor k, Tensor v, Tensor? bias, float scale, "
      "bool return_logits, bool return_assignment, int tile_size) -> "
      "(Tensor update, Tensor lse, Tensor logits, Tensor assignment)",
      &seg_methods::soft_cluster_forward);
  m.def(
      "soft_cluster_backward(Tensor? grad_update, Tensor? grad_logits, Tensor? grad_assignment, "
      "Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor lse, Tensor? logits, "
      "Tensor? assignment, float scale, bool[4] output_mask, int tile_size) -> "
      "(Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_bias)",
      &seg_methods::soft_cluster_backward);
}
