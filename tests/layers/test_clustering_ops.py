"""Tests of the clustering ops (seg_methods/layers/clustering.py and csrc/{soft,hard}_cluster).

Hand-computed tiny cases, parity of the compiled kernels with the pure-PyTorch references on
random, odd-sized and empty inputs, float64 gradcheck, and a check that the fused soft step saves
no (B, K, HW) tensor for backward.
"""

import math

import pytest
import torch

from seg_methods.layers import clustering
from seg_methods.layers.clustering import (
    hard_cluster,
    hard_cluster_from_qk,
    hard_cluster_pytorch,
    soft_cluster,
    soft_cluster_pytorch,
)
from seg_methods.utils.ext import ext_has_cuda, has_op

HAS_SOFT = has_op("soft_cluster_forward") and has_op("soft_cluster_backward")
HAS_HARD = all(
    has_op(n)
    for n in ("hard_cluster_argmax", "hard_cluster_reduce", "hard_cluster_reduce_backward")
)
needs_soft = pytest.mark.skipif(not HAS_SOFT, reason="seg_methods._C soft_cluster ops not built")
needs_hard = pytest.mark.skipif(not HAS_HARD, reason="seg_methods._C hard_cluster ops not built")
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and ext_has_cuda()), reason="needs a GPU and CUDA kernels"
)

# "ext" runs the compiled kernels (skipped when not built), "pytorch" the reference.
IMPLS = [pytest.param("ext", marks=needs_soft), "pytorch"]
HARD_IMPLS = [pytest.param("ext", marks=needs_hard), "pytorch"]

LN3 = math.log(3.0)


# ----------------------------------------------------------------------------------------------
# soft clustering: hand-computed case
# ----------------------------------------------------------------------------------------------
def _hand_inputs(dtype=torch.float64):
    """B=1, K=2, HW=3, D=2. With q = I the logits are the keys: column n of L is k[n].

    Pixel logits (0, 0), (ln 3, 0), (0, ln 3) give assignments (1/2, 1/2), (3/4, 1/4),
    (1/4, 3/4) over the two clusters. With v = [[4, 0], [0, 4], [8, 8]]:
        U[0] = 1/2 [4, 0] + 3/4 [0, 4] + 1/4 [8, 8] = [4, 5]
        U[1] = 1/2 [4, 0] + 1/4 [0, 4] + 3/4 [8, 8] = [8, 7]
    """
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=dtype)
    k = torch.tensor([[[0.0, 0.0], [LN3, 0.0], [0.0, LN3]]], dtype=dtype)
    v = torch.tensor([[[4.0, 0.0], [0.0, 4.0], [8.0, 8.0]]], dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("impl", IMPLS)
def test_soft_cluster_hand_computed(impl):
    q, k, v = _hand_inputs()
    update, logits, assign = soft_cluster(
        q, k, v, return_logits=True, return_assignment=True, impl=impl, tile_size=2
    )
    expected_assign = torch.tensor([[[0.5, 0.75, 0.25], [0.5, 0.25, 0.75]]], dtype=q.dtype)
    torch.testing.assert_close(logits, k.transpose(1, 2))
    torch.testing.assert_close(assign, expected_assign)
    torch.testing.assert_close(update, torch.tensor([[[4.0, 5.0], [8.0, 7.0]]], dtype=q.dtype))

    # Bias on pixel 0 only: its logits become (ln 3, 0), assignment (3/4, 1/4):
    #   U[0] = 3/4 [4, 0] + [0, 3] + [2, 2] = [5, 5];  U[1] = 1/4 [4, 0] + [0, 1] + [6, 6] = [7, 7]
    bias = torch.zeros(1, 2, 3, dtype=q.dtype)
    bias[0, 0, 0] = LN3
    out = soft_cluster(q, k, v, bias, impl=impl)
    torch.testing.assert_close(out, torch.tensor([[[5.0, 5.0], [7.0, 7.0]]], dtype=q.dtype))

    # scale multiplies q k^T only: doubling the keys and halving the scale changes nothing.
    out = soft_cluster(q, 2 * k, v, bias, impl=impl, scale=0.5)
    torch.testing.assert_close(out, torch.tensor([[[5.0, 5.0], [7.0, 7.0]]], dtype=q.dtype))


@pytest.mark.parametrize("impl", IMPLS)
def test_soft_cluster_hand_computed_gradients(impl):
    """Gradients of U[0, 0, 0] = sum_n M[0, n] v[n, 0] for the hand case.

    dU/dv[n] = (M[0, n], 0) = (1/2, 0), (3/4, 0), (1/4, 0).
    With two clusters dU/dL[0, n] = v[n, 0] M0 M1 = 4/4, 0, 8 * 3/16 = (1, 0, 1.5) and
    dU/dL[1, n] = -(1, 0, 1.5). Since L = q k^T with q = I:
    grad_q[i] = sum_n dL[i, n] k[n]: grad_q[0] = (0, 1.5 ln 3), grad_q[1] = (0, -1.5 ln 3);
    grad_k[n] = sum_i dL[i, n] q[i] = (dL[0, n], dL[1, n]); grad_bias = dL.
    """
    q, k, v = _hand_inputs()
    bias = torch.zeros(1, 2, 3, dtype=q.dtype)
    for t in (q, k, v, bias):
        t.requires_grad_(True)
    out = soft_cluster(q, k, v, bias, impl=impl, tile_size=2)
    out[0, 0, 0].backward()
    dl = torch.tensor([[[1.0, 0.0, 1.5], [-1.0, 0.0, -1.5]]], dtype=q.dtype)
    torch.testing.assert_close(v.grad, torch.tensor([[[0.5, 0.0], [0.75, 0.0], [0.25, 0.0]]]).to(q))
    torch.testing.assert_close(q.grad, torch.tensor([[[0.0, 1.5 * LN3], [0.0, -1.5 * LN3]]]).to(q))
    torch.testing.assert_close(k.grad, dl.transpose(1, 2))
    torch.testing.assert_close(bias.grad, dl)


# ----------------------------------------------------------------------------------------------
# soft clustering: parity with the reference
# ----------------------------------------------------------------------------------------------
def _random_soft(B, K, HW, D, Dv, dtype, with_bias, device="cpu"):
    g = torch.Generator().manual_seed(B * 1000 + K * 100 + HW)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).to(device)  # noqa: E731
    q, k, v = mk(B, K, D), mk(B, HW, D), mk(B, HW, Dv)
    bias = mk(B, K, HW) if with_bias else None
    return q, k, v, bias


def _soft_outputs_and_grads(fn, q, k, v, bias, flags, **kwargs):
    """Runs fn with every input requiring grad; returns outputs and input gradients for a
    random linear loss on every returned output."""
    inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    b = bias.detach().clone().requires_grad_(True) if bias is not None else None
    ret_logits, ret_assign = flags
    out = fn(*inputs, b, return_logits=ret_logits, return_assignment=ret_assign, **kwargs)
    outs = list(out) if isinstance(out, tuple) else [out]
    g = torch.Generator().manual_seed(7)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype).to(o)).sum() for o in outs)
    leaves = inputs + ([b] if b is not None else [])
    grads = torch.autograd.grad(loss, leaves)
    return [o.detach() for o in outs], list(grads)


@needs_soft
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape",
    [
        (2, 5, 37, 4, 3),  # odd sizes, several tiles with a partial last one
        (1, 7, 3, 6, 2),  # K > HW is allowed
        (3, 1, 10, 2, 5),  # one cluster: assignment is all ones
        (1, 16, 130, 8, 8),
    ],
)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("flags", [(False, False), (True, False), (False, True), (True, True)])
def test_soft_cluster_matches_reference(dtype, shape, with_bias, flags):
    q, k, v, bias = _random_soft(*shape, dtype=dtype, with_bias=with_bias)
    ref_out, ref_grads = _soft_outputs_and_grads(soft_cluster_pytorch, q, k, v, bias, flags)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for tile in (8, 0):  # 0: automatic tile size (one tile here)
        out, grads = _soft_outputs_and_grads(
            soft_cluster, q, k, v, bias, flags, impl="ext", tile_size=tile or None
        )
        assert len(out) == len(ref_out) and len(grads) == len(ref_grads)
        for a, b in zip(out, ref_out):
            torch.testing.assert_close(a, b, **tol)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, **tol)


@needs_soft
def test_soft_cluster_partial_requires_grad_and_scale():
    """Only some inputs need gradients; a non-unit scale; gradients equal the reference."""
    q, k, v, bias = _random_soft(2, 6, 21, 5, 4, torch.float64, with_bias=True)
    for needs in [
        (True, False, False, False),
        (False, True, True, False),
        (False, False, False, True),
    ]:
        grads = []
        for impl in ("ext", "pytorch"):
            ts = [t.clone().requires_grad_(n) for t, n in zip((q, k, v, bias), needs)]
            out = soft_cluster(*ts, impl=impl, scale=0.3, tile_size=4)
            out.pow(2).sum().backward()
            grads.append([t.grad for t in ts])
        for a, b in zip(*grads):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@needs_soft
@pytest.mark.parametrize("threads", [1, 2])
def test_soft_cluster_parallel_tiles_match_reference(threads):
    """Large enough (B*K*HW*(D+Dv) >= 2^22) for the CPU driver to share the tiles among threads
    with per-thread accumulators; small tiles so that every thread gets several."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v, bias = _random_soft(2, 32, 2100, 16, 24, torch.float64, with_bias=True)
        flags = (False, False)
        ref_out, ref_grads = _soft_outputs_and_grads(soft_cluster_pytorch, q, k, v, bias, flags)
        out, grads = _soft_outputs_and_grads(
            soft_cluster, q, k, v, bias, flags, impl="ext", tile_size=128
        )
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(out + grads, ref_out + ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@needs_soft
@pytest.mark.parametrize("shape", [(2, 3, 0, 4, 5), (2, 0, 6, 4, 5), (0, 3, 6, 4, 5)])
def test_soft_cluster_empty(shape):
    B, K, HW, D, Dv = shape
    q, k, v, bias = _random_soft(B, K, HW, D, Dv, torch.float64, with_bias=True)
    q, k, v, bias = [t.requires_grad_(True) for t in (q, k, v, bias)]
    update, logits, assign = soft_cluster(
        q, k, v, bias, return_logits=True, return_assignment=True, impl="ext"
    )
    assert update.shape == (B, K, Dv) and logits.shape == assign.shape == (B, K, HW)
    # No pixel (or no cluster): every update is an empty sum.
    torch.testing.assert_close(update, torch.zeros(B, K, Dv, dtype=torch.float64))
    (update.sum() + logits.sum() + assign.sum()).backward()
    for t in (q, k, v, bias):
        assert t.grad is not None and t.grad.shape == t.shape
    # With HW = 0 the assignment is empty; with K = 0 nothing reaches k.
    assert torch.count_nonzero(q.grad) == 0 and torch.count_nonzero(k.grad) == 0
    torch.testing.assert_close(bias.grad, torch.ones_like(bias))


@needs_soft
def test_soft_cluster_gradcheck():
    q, k, v, bias = _random_soft(2, 3, 7, 4, 2, torch.float64, with_bias=True)
    inputs = [t.requires_grad_(True) for t in (q, k, v, bias)]

    def f_all(q, k, v, bias):
        return soft_cluster(
            q, k, v, bias, return_logits=True, return_assignment=True, impl="ext", tile_size=3
        )

    def f_update(q, k, v, bias):
        return soft_cluster(q, k, v, bias, impl="ext", scale=0.7, tile_size=3)

    def f_logits_only(q, k, v):
        return soft_cluster(q, k, v, return_logits=True, impl="ext", tile_size=4)

    assert torch.autograd.gradcheck(f_all, inputs)
    assert torch.autograd.gradcheck(f_update, inputs)
    assert torch.autograd.gradcheck(f_logits_only, inputs[:3])


def _saved_tensor_sizes(fn):
    """Numel and data pointer of every tensor autograd saves while running fn()."""
    saved = []

    def pack(t):
        saved.append((t.numel(), t.data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


@needs_soft
def test_soft_cluster_saves_no_assignment_sized_tensor():
    B, K, HW, D, Dv = 2, 5, 64, 3, 4
    big = B * K * HW
    q, k, v, bias = _random_soft(B, K, HW, D, Dv, torch.float32, with_bias=True)
    q, k, v, bias = [t.requires_grad_(True) for t in (q, k, v, bias)]

    saved, out = _saved_tensor_sizes(lambda: soft_cluster(q, k, v, impl="ext", tile_size=16))
    assert saved, "the autograd Function saved nothing"
    assert max(n for n, _ in saved) < big
    assert [n for n, _ in saved if n == B * HW], "the per-pixel log-sum-exp is saved"
    out.sum().backward()

    # With a bias, the only (B, K, HW) tensor saved is the caller's bias itself (no copy).
    saved, _ = _saved_tensor_sizes(lambda: soft_cluster(q, k, v, bias, impl="ext", tile_size=16))
    assert [p for n, p in saved if n >= big] == [bias.data_ptr()]

    # The check can fail: the reference and the return_logits path do keep (B, K, HW) tensors.
    saved, _ = _saved_tensor_sizes(lambda: soft_cluster(q, k, v, impl="pytorch"))
    assert max(n for n, _ in saved) >= big
    saved, _ = _saved_tensor_sizes(lambda: soft_cluster(q, k, v, return_logits=True, impl="ext"))
    assert max(n for n, _ in saved) >= big


@needs_soft
def test_soft_cluster_half_precision_is_computed_in_float32():
    q, k, v, bias = _random_soft(1, 4, 9, 3, 2, torch.float32, with_bias=True)
    out = soft_cluster(q.half(), k.half(), v.half(), bias.half(), impl="ext")
    assert out.dtype == torch.float16
    ref = soft_cluster_pytorch(
        q.half().float(), k.half().float(), v.half().float(), bias.half().float()
    )
    torch.testing.assert_close(out.float(), ref, rtol=2e-3, atol=2e-3)


def test_soft_cluster_shape_errors():
    q, k, v, bias = _random_soft(2, 3, 5, 4, 2, torch.float32, with_bias=True)
    with pytest.raises(ValueError, match="share D"):
        soft_cluster(q, k[..., :3], v)
    with pytest.raises(ValueError, match="share HW"):
        soft_cluster(q, k, v[:, :4])
    with pytest.raises(ValueError, match="batch sizes differ"):
        soft_cluster(q[:1], k, v)
    with pytest.raises(ValueError, match=r"logits_bias must have shape \(B, K, HW\)"):
        soft_cluster(q, k, v, bias[:, :2])
    with pytest.raises(ValueError, match="impl"):
        soft_cluster(q, k, v, impl="cuda")


@needs_soft
def test_soft_cluster_op_checks_shapes():
    """The compiled op raises clear errors itself (for callers of torch.ops directly)."""
    q, k, v, bias = _random_soft(2, 3, 5, 4, 2, torch.float32, with_bias=True)
    op = torch.ops.seg_methods.soft_cluster_forward
    with pytest.raises(RuntimeError, match="must share D"):
        op(q, k[..., :3], v, None, 1.0, False, False, 0)
    with pytest.raises(RuntimeError, match="must share HW"):
        op(q, k, v[:, :4], None, 1.0, False, False, 0)
    with pytest.raises(RuntimeError, match=r"'logits_bias' must have shape \(B, K, HW\)"):
        op(q, k, v, bias[..., :4], 1.0, False, False, 0)
    with pytest.raises(RuntimeError, match="dtype"):
        op(q, k.double(), v, None, 1.0, False, False, 0)


def test_soft_cluster_falls_back_without_extension(monkeypatch):
    monkeypatch.setattr(clustering, "has_op", lambda name: False)
    q, k, v = _hand_inputs()
    out = soft_cluster(q, k, v)  # auto -> reference
    torch.testing.assert_close(out, torch.tensor([[[4.0, 5.0], [8.0, 7.0]]], dtype=q.dtype))
    with pytest.raises(RuntimeError, match="impl='ext'"):
        soft_cluster(q, k, v, impl="ext")


# ----------------------------------------------------------------------------------------------
# hard (k-means) assignment
# ----------------------------------------------------------------------------------------------
def _hard_hand_inputs(dtype=torch.float64):
    """B=1, K=2, HW=3. Pixel 0: 0.2 > 0.1 -> cluster 1; pixel 1: 0.9 > 0.3 -> 0; pixel 2: a tie
    (0.5, 0.5) -> the first cluster, 0. So index = [1, 0, 0], counts = [2, 1] and with
    v = [[4, 0], [0, 4], [8, 8]]: sum U[0] = v1 + v2 = [8, 12], U[1] = v0 = [4, 0];
    mean U[0] = [4, 6], U[1] = [4, 0]."""
    logits = torch.tensor([[[0.1, 0.9, 0.5], [0.2, 0.3, 0.5]]], dtype=dtype)
    v = torch.tensor([[[4.0, 0.0], [0.0, 4.0], [8.0, 8.0]]], dtype=dtype)
    return logits, v


@pytest.mark.parametrize("impl", HARD_IMPLS)
def test_hard_cluster_hand_computed(impl):
    logits, v = _hard_hand_inputs()
    w = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], dtype=v.dtype)
    expected = {
        "sum": ([[8.0, 12.0], [4.0, 0.0]], [[3.0, 4.0], [1.0, 2.0], [1.0, 2.0]]),
        "mean": ([[4.0, 6.0], [4.0, 0.0]], [[3.0, 4.0], [0.5, 1.0], [0.5, 1.0]]),
    }
    for reduce, (update_ref, grad_ref) in expected.items():
        vv = v.clone().requires_grad_(True)
        ll = logits.clone().requires_grad_(True)
        update, index, counts = hard_cluster(ll, vv, reduce, impl=impl)
        assert index.dtype == torch.long and counts.dtype == torch.long
        assert index.tolist() == [[1, 0, 0]]
        assert counts.tolist() == [[2, 1]]
        torch.testing.assert_close(update, torch.tensor([update_ref], dtype=v.dtype))
        # loss = sum(U * w): grad_v[n] = w[index[n]] (/ count for the mean)
        (update * w).sum().backward()
        torch.testing.assert_close(vv.grad, torch.tensor([grad_ref], dtype=v.dtype))
        assert ll.grad is None  # no gradient through the argmax


@needs_hard
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 5, 37, 3), (1, 7, 3, 2), (3, 1, 10, 5), (2, 9, 300, 70)])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_hard_cluster_matches_reference(dtype, shape, reduce):
    B, K, HW, Dv = shape
    g = torch.Generator().manual_seed(HW)
    # Integer logits in a small range produce many ties; tie-breaking must match torch.argmax.
    logits = torch.randint(0, 3, (B, K, HW), generator=g).to(dtype)
    v = torch.randn(B, HW, Dv, generator=g, dtype=dtype)
    gu = torch.randn(B, K, Dv, generator=g, dtype=dtype)
    results = []
    for impl in ("ext", "pytorch"):
        vv = v.clone().requires_grad_(True)
        update, index, counts = hard_cluster(logits, vv, reduce, impl=impl)
        (update * gu).sum().backward()
        results.append((update.detach(), index, counts, vv.grad))
    (u0, i0, c0, g0), (u1, i1, c1, g1) = results
    assert torch.equal(i0, i1) and torch.equal(c0, c1)
    assert int(c0.sum()) == B * HW
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(u0, u1, **tol)
    torch.testing.assert_close(g0, g1, **tol)


@needs_hard
def test_hard_cluster_nan_and_empty_cluster():
    logits = torch.tensor([[[0.0, float("nan"), 1.0], [2.0, 5.0, float("nan")], [1.0, 0.0, 0.0]]])
    v = torch.tensor([[[1.0], [2.0], [3.0]]])
    for impl in ("ext", "pytorch"):
        update, index, counts = hard_cluster(logits, v, "mean", impl=impl)
        # NaN wins the argmax as in torch.argmax; cluster 2 gets no pixel -> mean 0, count 0.
        assert index.tolist() == [[1, 0, 1]]
        assert counts.tolist() == [[1, 2, 0]]
        torch.testing.assert_close(update, torch.tensor([[[2.0], [2.0], [0.0]]]))


@pytest.mark.parametrize("impl", HARD_IMPLS)
@pytest.mark.parametrize("shape", [(2, 3, 0, 4), (2, 0, 5, 4), (0, 3, 5, 4), (2, 3, 5, 0)])
def test_hard_cluster_empty(impl, shape):
    B, K, HW, Dv = shape
    logits = torch.randn(B, K, HW)
    v = torch.randn(B, HW, Dv, requires_grad=True)
    update, index, counts = hard_cluster(logits, v, "mean", impl=impl)
    assert update.shape == (B, K, Dv) and index.shape == (B, HW) and counts.shape == (B, K)
    assert torch.count_nonzero(update) == 0
    assert int(counts.sum()) == (B * HW if K > 0 else 0)
    if K == 0:
        assert (index == -1).all()  # no cluster to assign the pixels to
    update.sum().backward()
    assert v.grad.shape == v.shape and torch.count_nonzero(v.grad) == 0


@needs_hard
def test_hard_cluster_gradcheck():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 11, generator=g, dtype=torch.float64)
    v = torch.randn(2, 11, 3, generator=g, dtype=torch.float64, requires_grad=True)
    for reduce in ("mean", "sum"):
        assert torch.autograd.gradcheck(
            lambda v: hard_cluster(logits, v, reduce, impl="ext")[0], (v,)
        )


@pytest.mark.parametrize("impl", HARD_IMPLS)
def test_hard_cluster_from_qk_equals_logits_path(impl):
    q, k, v, bias = _random_soft(2, 6, 50, 4, 3, torch.float64, with_bias=True)
    logits = torch.bmm(q, k.transpose(1, 2)) * 0.5 + bias
    ref = hard_cluster_pytorch(logits, v, "sum")
    out = hard_cluster_from_qk(q, k, v, bias, "sum", scale=0.5, impl=impl, tile_size=16)
    torch.testing.assert_close(out[0], ref[0])
    assert torch.equal(out[1], ref[1]) and torch.equal(out[2], ref[2])


@needs_hard
def test_hard_cluster_op_checks():
    v = torch.randn(1, 3, 2)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.seg_methods.hard_cluster_reduce(torch.tensor([[0, 5, 1]]), v, 2, True)
    with pytest.raises(RuntimeError, match=r"index must have shape \(B, HW\)"):
        torch.ops.seg_methods.hard_cluster_reduce(torch.tensor([[0, 1]]), v, 2, True)
    with pytest.raises(RuntimeError, match=r"logits must have shape \(B, K, HW\)"):
        torch.ops.seg_methods.hard_cluster_argmax(torch.randn(3, 4))
    with pytest.raises(ValueError, match="must share B and HW"):
        hard_cluster(torch.randn(1, 2, 4), v)
    with pytest.raises(ValueError, match="reduce"):
        hard_cluster(torch.randn(1, 2, 3), v, "max")
    # Negative indices mark unassigned pixels: they are skipped.
    update, counts = torch.ops.seg_methods.hard_cluster_reduce(
        torch.tensor([[0, -1, 0]]), v, 2, False
    )
    expected = torch.stack([v[0, 0] + v[0, 2], torch.zeros(2)]).unsqueeze(0)  # (1, K=2, Dv=2)
    torch.testing.assert_close(update, expected)
    assert counts.tolist() == [[2, 0]]


# ----------------------------------------------------------------------------------------------
# CUDA parity (never runs on the CPU-only machines; the CPU tests above cover the shared math)
# ----------------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("with_bias", [False, True])
def test_soft_cluster_cuda_matches_cpu(with_bias):
    q, k, v, bias = _random_soft(2, 5, 300, 4, 3, torch.float64, with_bias=with_bias)
    flags = (True, True)
    cpu_out, cpu_grads = _soft_outputs_and_grads(soft_cluster, q, k, v, bias, flags, impl="ext")
    dev = [t.cuda() if t is not None else None for t in (q, k, v, bias)]
    gpu_out, gpu_grads = _soft_outputs_and_grads(
        soft_cluster, *dev, flags, impl="ext", tile_size=64
    )
    for a, b in zip(cpu_out + cpu_grads, gpu_out + gpu_grads):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-10, atol=1e-10)


@needs_cuda
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_hard_cluster_cuda_matches_cpu(reduce):
    logits = torch.randint(0, 3, (2, 5, 301)).double()
    v = torch.randn(2, 301, 7, dtype=torch.float64)
    outs = []
    for device in ("cpu", "cuda"):
        vv = v.to(device).requires_grad_(True)
        update, index, counts = hard_cluster(logits.to(device), vv, reduce, impl="ext")
        update.pow(2).sum().backward()
        outs.append([x.detach().cpu() for x in (update, index, counts, vv.grad)])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
