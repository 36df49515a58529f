"""Tests of the low-rank dense affinity apply (seg_methods/layers/dense_affinity.py and
csrc/dense_affinity): P = Psi + phi0(Q) (phi1(Q)^T Psi), Unifying Training and Inference Eq. 3-4.

A hand-computed tiny case, parity of the compiled op (both backends) and of the factored
reference with the naive (HW x HW) form on odd, empty and single-channel shapes, float64
gradcheck, the batched forms with a different number of channels per image, and a check that the
compiled op keeps nothing pixel-sized for backward besides its inputs.
"""

import pytest
import torch

from seg_methods.layers.dense_affinity import (
    DenseAffinityApply,
    dense_affinity_apply,
    dense_affinity_apply_batched,
    dense_affinity_apply_pytorch,
)
from seg_methods.utils.ext import ext_has_cuda, has_op

HAS_OP = has_op("dense_affinity_forward") and has_op("dense_affinity_backward")
needs_op = pytest.mark.skipif(not HAS_OP, reason="seg_methods._C dense_affinity ops not built")
needs_cuda = pytest.mark.skipif(
    not (HAS_OP and torch.cuda.is_available() and ext_has_cuda()),
    reason="needs a GPU and CUDA kernels",
)

# (impl, backend): the compiled op with each backend (skipped when not built), the reference.
IMPLS = [
    pytest.param(("ext", "gemm"), marks=needs_op, id="ext-gemm"),
    pytest.param(("ext", "direct"), marks=needs_op, id="ext-direct"),
    pytest.param(("pytorch", "gemm"), id="pytorch"),
]

# (N, H, W, C): odd sizes, no channel at all (N = 0), one channel, one embedding channel, one
# pixel, no embedding channel (C = 0: P = psi).
SHAPES = [(3, 5, 7, 4), (0, 5, 3, 4), (1, 3, 3, 2), (4, 3, 5, 1), (2, 1, 1, 3), (3, 3, 3, 0)]


def _inputs(N, H, W, C, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    psi = torch.randn(N, H, W, generator=g, dtype=dtype).to(device)
    phi0 = torch.randn(C, H, W, generator=g, dtype=dtype).to(device)
    phi1 = torch.randn(C, H, W, generator=g, dtype=dtype).to(device)
    return psi, phi0, phi1


def _grads(fn, psi, phi0, phi1, grad_seed=1):
    """Output and gradients of sum(fn(...) * R) w.r.t. the three inputs."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (psi, phi0, phi1)]
    out = fn(*leaves)
    g = torch.Generator().manual_seed(grad_seed)
    weight = torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device)
    (out * weight).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


def _apply(impl_backend, **kwargs):
    impl, backend = impl_backend
    return lambda p, f0, f1: dense_affinity_apply(p, f0, f1, impl=impl, backend=backend, **kwargs)


# ----------------------------------------------------------------------------------------------
# hand-computed case
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl_backend", IMPLS)
def test_hand_computed(impl_backend):
    """N = 2, H x W = 1 x 3, C = 1. phi0 = [1, 2, 0], phi1 = [1, 0, 1].

    K = phi1 Psi^T = [1*1 + 0*0 + 1*0, 1*0 + 0*1 + 1*2] = [1, 2], so
    P[0] = [1, 0, 0] + 1 * [1, 2, 0] = [2, 2, 0] and P[1] = [0, 1, 2] + 2 * [1, 2, 0] = [2, 5, 2].
    With scale 0.5 the affinity term halves: P[0] = [1.5, 1, 0], P[1] = [1, 3, 2].
    Gradients for dL/dP = 1 everywhere: dphi0 = sum_n K[n] = 3 per pixel; dK[n] = sum_p phi0 = 3,
    so dpsi[n, p] = 1 + 3 * phi1[p] = [4, 1, 4]; dphi1[p] = 3 * sum_n psi[n, p] = [3, 3, 6].
    """
    psi = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 2.0]]], dtype=torch.float64)
    phi0 = torch.tensor([[[1.0, 2.0, 0.0]]], dtype=torch.float64)
    phi1 = torch.tensor([[[1.0, 0.0, 1.0]]], dtype=torch.float64)
    fn = _apply(impl_backend)
    expected = torch.tensor([[[2.0, 2.0, 0.0]], [[2.0, 5.0, 2.0]]], dtype=torch.float64)
    torch.testing.assert_close(fn(psi, phi0, phi1), expected, rtol=0, atol=1e-12)
    half = torch.tensor([[[1.5, 1.0, 0.0]], [[1.0, 3.0, 2.0]]], dtype=torch.float64)
    torch.testing.assert_close(_apply(impl_backend, scale=0.5)(psi, phi0, phi1), half)

    leaves = [t.clone().requires_grad_(True) for t in (psi, phi0, phi1)]
    fn(*leaves).sum().backward()
    torch.testing.assert_close(leaves[0].grad, torch.tensor([[[4.0, 1.0, 4.0]]] * 2).double())
    torch.testing.assert_close(leaves[1].grad, torch.full((1, 1, 3), 3.0).double())
    torch.testing.assert_close(leaves[2].grad, torch.tensor([[[3.0, 3.0, 6.0]]]).double())


# ----------------------------------------------------------------------------------------------
# parity with the naive (HW x HW) form
# ----------------------------------------------------------------------------------------------
def test_naive_forms_agree_with_paper_layout():
    """The naive reference is literally Psi + (phi0(Q) phi1(Q)^T) Psi in the (HW, N) layout."""
    psi, phi0, phi1 = _inputs(3, 5, 7, 4)
    Psi = psi.reshape(3, -1).t()  # (HW, N)
    Q0, Q1 = phi0.reshape(4, -1).t(), phi1.reshape(4, -1).t()  # (HW, C)
    P = Psi + (Q0 @ Q1.t()) @ Psi  # Eq. 4 left to right
    naive = dense_affinity_apply_pytorch(psi, phi0, phi1, naive=True)
    torch.testing.assert_close(naive, P.t().reshape(psi.shape))
    factored = dense_affinity_apply_pytorch(psi, phi0, phi1)
    torch.testing.assert_close(factored, naive)


@pytest.mark.parametrize("impl_backend", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}_H{}_W{}_C{}".format(*s))
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_parity_with_naive(impl_backend, shape, scale):
    psi, phi0, phi1 = _inputs(*shape)
    got = _grads(_apply(impl_backend, scale=scale), psi, phi0, phi1)
    ref = _grads(
        lambda p, f0, f1: dense_affinity_apply_pytorch(p, f0, f1, scale=scale, naive=True),
        psi,
        phi0,
        phi1,
    )
    for name, a, b in zip(("P", "dpsi", "dphi0", "dphi1"), got, ref):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("impl_backend", IMPLS)
def test_flat_layout_and_float32(impl_backend):
    """psi (N, HW) with phi (C, H, W) or (C, HW), in float32, against the naive form."""
    psi, phi0, phi1 = _inputs(5, 7, 9, 6, dtype=torch.float32)
    ref = dense_affinity_apply_pytorch(psi, phi0, phi1, naive=True)
    fn = _apply(impl_backend)
    out = fn(psi.reshape(5, -1), phi0, phi1)
    assert out.shape == (5, 63)
    torch.testing.assert_close(out, ref.reshape(5, -1), rtol=1e-5, atol=1e-5)
    out = fn(psi.reshape(5, -1), phi0.reshape(6, -1), phi1.reshape(6, -1))
    torch.testing.assert_close(out, ref.reshape(5, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl_backend", IMPLS)
def test_only_some_inputs_need_grad(impl_backend):
    """Gradients requested for one input at a time match the full backward."""
    psi, phi0, phi1 = _inputs(3, 4, 5, 2)
    ref = _grads(_apply(("pytorch", "gemm")), psi, phi0, phi1)
    for i in range(3):
        leaves = [t.clone() for t in (psi, phi0, phi1)]
        leaves[i].requires_grad_(True)
        out = _apply(impl_backend)(*leaves)
        g = torch.Generator().manual_seed(1)
        (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum().backward()
        torch.testing.assert_close(leaves[i].grad, ref[i + 1])


# ----------------------------------------------------------------------------------------------
# gradcheck (float64)
# ----------------------------------------------------------------------------------------------
@needs_op
@pytest.mark.parametrize("backend", ["gemm", "direct"])
@pytest.mark.parametrize("shape", [(3, 3, 5, 2), (1, 1, 3, 1), (2, 2, 3, 3)])
def test_gradcheck_single(backend, shape):
    psi, phi0, phi1 = (t.requires_grad_(True) for t in _inputs(*shape))
    assert torch.autograd.gradcheck(
        lambda p, f0, f1: dense_affinity_apply(p, f0, f1, scale=0.7, impl="ext", backend=backend),
        (psi, phi0, phi1),
    )


@needs_op
@pytest.mark.parametrize("backend", ["gemm", "direct"])
def test_gradcheck_padded_batch(backend):
    g = torch.Generator().manual_seed(3)
    psi = torch.randn(3, 3, 2, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    phi0 = torch.randn(3, 2, 2, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    phi1 = torch.randn(3, 2, 2, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda p, f0, f1: dense_affinity_apply_batched(
            p, f0, f1, [2, 0, 3], impl="ext", backend=backend
        ),
        (psi, phi0, phi1),
    )


# ----------------------------------------------------------------------------------------------
# batched forms: a different number of channels per image
# ----------------------------------------------------------------------------------------------
BATCH_COUNTS = [3, 0, 1, 4]


def _batch(dtype=torch.float64, H=3, W=5, C=3, nmax=4):
    g = torch.Generator().manual_seed(5)
    B = len(BATCH_COUNTS)
    psi = torch.randn(B, nmax, H, W, generator=g, dtype=dtype)
    phi0 = torch.randn(B, C, H, W, generator=g, dtype=dtype)
    phi1 = torch.randn(B, C, H, W, generator=g, dtype=dtype)
    return psi, phi0, phi1


@pytest.mark.parametrize("impl_backend", IMPLS)
def test_batched_list(impl_backend):
    impl, backend = impl_backend
    psi, phi0, phi1 = _batch()
    psi_list = [psi[b, :n] for b, n in enumerate(BATCH_COUNTS)]
    outs = dense_affinity_apply_batched(psi_list, phi0, phi1, impl=impl, backend=backend)
    assert [o.shape[0] for o in outs] == BATCH_COUNTS
    for b, out in enumerate(outs):
        ref = dense_affinity_apply_pytorch(psi_list[b], phi0[b], phi1[b], naive=True)
        torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("impl_backend", IMPLS)
def test_batched_padded_matches_per_image(impl_backend):
    """Padded channels hold garbage (NaN): never read, zero in P, zero gradient."""
    impl, backend = impl_backend
    psi, phi0, phi1 = _batch()
    for b, n in enumerate(BATCH_COUNTS):
        psi[b, n:] = float("nan")
    counts = torch.tensor(BATCH_COUNTS)
    leaves = [t.clone().requires_grad_(True) for t in (psi, phi0, phi1)]
    out = dense_affinity_apply_batched(*leaves, counts, impl=impl, backend=backend)
    assert out.shape == psi.shape
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    (out * weight).sum().backward()
    for b, n in enumerate(BATCH_COUNTS):
        assert torch.all(out[b, n:] == 0), b
        assert torch.all(leaves[0].grad[b, n:] == 0), b
        # Reference: the naive form on the valid channels, same upstream weight.
        rl = [t.clone().requires_grad_(True) for t in (psi[b, :n], phi0[b], phi1[b])]
        ref = dense_affinity_apply_pytorch(*rl, naive=True)
        (ref * weight[b, :n]).sum().backward()
        torch.testing.assert_close(out[b, :n], ref.detach())
        torch.testing.assert_close(leaves[0].grad[b, :n], rl[0].grad)
        torch.testing.assert_close(leaves[1].grad[b], rl[1].grad)
        torch.testing.assert_close(leaves[2].grad[b], rl[2].grad)


@pytest.mark.parametrize("impl_backend", IMPLS)
def test_batched_padded_flat_and_default_counts(impl_backend):
    impl, backend = impl_backend
    psi, phi0, phi1 = _batch()
    B, N = psi.shape[:2]
    out = dense_affinity_apply_batched(
        psi.reshape(B, N, -1),
        phi0.reshape(B, 3, -1),
        phi1.reshape(B, 3, -1),
        impl=impl,
        backend=backend,
    )
    for b in range(B):
        ref = dense_affinity_apply_pytorch(psi[b], phi0[b], phi1[b], naive=True)
        torch.testing.assert_close(out[b], ref.reshape(N, -1))


def test_module():
    psi, phi0, phi1 = _batch()
    module = DenseAffinityApply(scale=1.0)
    assert "scale=1.0" in repr(module)
    torch.testing.assert_close(
        module(psi[0], phi0[0], phi1[0]),
        dense_affinity_apply_pytorch(psi[0], phi0[0], phi1[0], naive=True),
    )
    out = module(psi, phi0, phi1, BATCH_COUNTS)
    assert out.shape == psi.shape and torch.all(out[1] == 0)


# ----------------------------------------------------------------------------------------------
# memory: what the compiled op keeps for backward
# ----------------------------------------------------------------------------------------------
@needs_op
def test_saves_only_inputs_and_small_kernel():
    psi, phi0, phi1 = (t.requires_grad_(True) for t in _inputs(5, 16, 16, 8))
    inputs = {t.untyped_storage().data_ptr() for t in (psi, phi0, phi1)}
    extra = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in inputs:
            extra.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dense_affinity_apply(psi, phi0, phi1, impl="ext")
    assert extra == [(1, 8, 5)]  # the (B, C, N) kernel scale * phi1 psi^T, nothing pixel-sized


# ----------------------------------------------------------------------------------------------
# bad input and dispatch
# ----------------------------------------------------------------------------------------------
def test_bad_shapes_raise_clear_errors():
    psi, phi0, phi1 = _inputs(3, 4, 5, 2)
    with pytest.raises(ValueError, match="share H and W"):
        dense_affinity_apply(psi, phi0[:, :, :4], phi1[:, :, :4])
    with pytest.raises(ValueError, match="one shape"):
        dense_affinity_apply(psi, phi0, phi1[:1])
    with pytest.raises(ValueError, match="different numbers of pixels"):
        dense_affinity_apply(psi.reshape(3, -1)[:, :7], phi0, phi1)
    with pytest.raises(ValueError, match="float dtype"):
        dense_affinity_apply(psi.float(), phi0, phi1)
    with pytest.raises(ValueError, match="counts"):
        dense_affinity_apply_batched(psi[None], phi0[None], phi1[None], [4])
    with pytest.raises(ValueError, match="impl"):
        dense_affinity_apply(psi, phi0, phi1, impl="cuda")


def test_auto_falls_back_without_the_compiled_op(monkeypatch):
    """Without the compiled op, impl="auto" runs the reference (backward included) and
    impl="ext" raises a clear error."""
    from seg_methods.layers import dense_affinity as module

    monkeypatch.setattr(module, "has_op", lambda name: False)
    psi, phi0, phi1 = _inputs(2, 3, 5, 2)
    got = _grads(lambda p, f0, f1: dense_affinity_apply(p, f0, f1), psi, phi0, phi1)
    ref = _grads(
        lambda p, f0, f1: dense_affinity_apply_pytorch(p, f0, f1, naive=True), psi, phi0, phi1
    )
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match="not built"):
        dense_affinity_apply(psi, phi0, phi1, impl="ext")
    with pytest.raises(ValueError, match="backend"):
        dense_affinity_apply(psi, phi0, phi1, backend="cublas")


@needs_op
def test_op_errors_name_the_argument():
    psi, phi0, phi1 = _inputs(3, 4, 5, 2)
    flat = [t.reshape(1, t.shape[0], -1) for t in (psi, phi0, phi1)]
    with pytest.raises(RuntimeError, match="counts\\[0\\] = 5"):
        torch.ops.seg_methods.dense_affinity_forward(*flat, [5], 1.0, 0)
    with pytest.raises(RuntimeError, match="share B and HW"):
        torch.ops.seg_methods.dense_affinity_forward(
            flat[0][..., :3], flat[1], flat[2], None, 1.0, 0
        )
    with pytest.raises(RuntimeError, match="direct kernels take float32 or float64"):
        torch.ops.seg_methods.dense_affinity_forward(*[t.half() for t in flat], None, 1.0, 1)


@needs_op
def test_half_precision_gemm_backend():
    """The GEMM backend runs in the input dtype (no float32 copy of the embeddings)."""
    psi, phi0, phi1 = _inputs(3, 4, 5, 4, dtype=torch.float32)
    out = dense_affinity_apply(psi.bfloat16(), phi0.bfloat16(), phi1.bfloat16(), impl="ext")
    assert out.dtype == torch.bfloat16
    ref = dense_affinity_apply_pytorch(psi, phi0, phi1, naive=True)
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2 * ref.abs().max().item())


@needs_cuda
@pytest.mark.parametrize("backend", ["gemm", "direct"])
def test_cuda_matches_cpu(backend):
    psi, phi0, phi1 = _batch()
    counts = BATCH_COUNTS
    cpu = _grads(
        lambda p, f0, f1: dense_affinity_apply_batched(p, f0, f1, counts, impl="ext"),
        psi,
        phi0,
        phi1,
    )
    cuda = _grads(
        lambda p, f0, f1: dense_affinity_apply_batched(
            p, f0, f1, counts, impl="ext", backend=backend
        ),
        psi.cuda(),
        phi0.cuda(),
        phi1.cuda(),
    )
    for a, b in zip(cpu, cuda):
        torch.testing.assert_close(a, b.cpu())
