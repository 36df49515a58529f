"""Tests of RegProxy's local pixel-token association (seg_methods/layers/token_association.py and
csrc/token_association).

The compiled op and the pure-PyTorch reference are compared with each other and with the official
head's forward formula written again here, independently (in-place -inf borders as in
``ProxyHead.forward_affinity``, ``F.unfold`` + ``einsum``), on odd, one-row / one-column and empty
grids; float64 gradcheck; a hand-computed 2 x 2 token grid; extreme logits.
"""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from seg_methods.layers.token_association import (
    TokenAssociation,
    neighbour_validity,
    token_association,
    token_association_pytorch,
)
from seg_methods.utils.ext import ext_has_cuda, has_op

# The module itself (seg_methods.layers.token_association is the function, exported by layers/).
ta_module = importlib.import_module("seg_methods.layers.token_association")

HAS_OP = has_op("token_association_forward") and has_op("token_association_backward")
needs_op = pytest.mark.skipif(not HAS_OP, reason="seg_methods._C token_association not built")
needs_cuda = pytest.mark.skipif(
    not (HAS_OP and torch.cuda.is_available() and ext_has_cuda()),
    reason="needs a GPU and the CUDA kernels",
)
IMPLS = [pytest.param("op", marks=needs_op), "pytorch"]


def official_forward(affinity, token_logits, rh, rw):
    """The official ProxyHead.forward formula, written independently of the module under test.

    Borders as ProxyHead.forward_affinity (in place on a copy), softmax over the 9 neighbours,
    unfold of the token logits, then out[b, c, (y, i), (x, j)] = sum_n p[b, n, i, j, y, x] *
    unfolded[b, c, n, y, x] as one einsum.
    """
    B, C, h, w = token_logits.shape
    a = affinity.clone().reshape(B, 9, rh, rw, h, w)
    a[:, :3, :, :, 0, :] = float("-inf")  # top
    a[:, -3:, :, :, -1, :] = float("-inf")  # bottom
    a[:, ::3, :, :, :, 0] = float("-inf")  # left
    a[:, 2::3, :, :, :, -1] = float("-inf")  # right
    p = a.softmax(dim=1)
    unfolded = F.unfold(token_logits, kernel_size=3, padding=1).reshape(B, C, 9, h, w)
    out = torch.einsum("bnijyx,bcnyx->bcyixj", p, unfolded)  # (B, C, h, rh, w, rw)
    return out.reshape(B, C, h * rh, w * rw)


def _inputs(B, C, h, w, rh, rw, dtype=torch.float64, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed + 1000 * h + 100 * w + 10 * C + rh)
    affinity = scale * torch.randn(B, 9 * rh * rw, h, w, generator=g, dtype=dtype)
    tokens = torch.randn(B, C, h, w, generator=g, dtype=dtype)
    grad = torch.randn(B, C, h * rh, w * rw, generator=g, dtype=dtype)
    return affinity, tokens, grad


def _forward_backward(fn, affinity, tokens, grad):
    a = affinity.detach().clone().requires_grad_(True)
    t = tokens.detach().clone().requires_grad_(True)
    out = fn(a, t)
    out.backward(grad)
    return out.detach(), a.grad, t.grad


def _all_three(affinity, tokens, grad, rh, rw):
    """(output, grad_affinity, grad_tokens) of the op, the reference and the official formula."""
    return {
        "op": _forward_backward(
            lambda a, t: token_association(a, t, (rh, rw), impl="op"), affinity, tokens, grad
        ),
        "reference": _forward_backward(
            lambda a, t: token_association_pytorch(a, t, (rh, rw)), affinity, tokens, grad
        ),
        "official": _forward_backward(
            lambda a, t: official_forward(a, t, rh, rw), affinity, tokens, grad
        ),
    }


# ----------------------------------------------------------------------------------------------
# layout and hand-computed cases
# ----------------------------------------------------------------------------------------------
def test_neighbour_validity_matches_official_borders():
    for h, w in [(1, 1), (1, 4), (3, 1), (2, 2), (3, 5)]:
        a = torch.zeros(9, h, w)
        a[:3, 0, :] = 1  # the official head's four border assignments
        a[-3:, -1, :] = 1
        a[::3, :, 0] = 1
        a[2::3, :, -1] = 1
        assert torch.equal(neighbour_validity(h, w), a == 0), (h, w)


def _hand_case(dtype=torch.float64):
    """2 x 2 token grid, region_res (1, 2): 8 output pixels in 2 rows of 4, two classes.

    Class 0 logits [[1, 2], [4, 8]]; class 1 all ones. Affinity channel = n * 2 + px. Every token
    of a 2 x 2 grid has exactly 4 valid neighbours (itself, its row and column neighbours and the
    diagonal one); with zero logits each weighs 1/4, so a pixel is (1 + 2 + 4 + 8) / 4 = 3.75
    (it would be 15 / 9 if the out-of-grid neighbours took part with zero padding). Set logits:
      token (0, 0), px 0: n = 4 (itself) ln 2 -> weights 2/5, 1/5, 1/5, 1/5 -> (2 + 14) / 5 = 3.2;
                          also n = 0 (out of grid) = 100, which must change nothing;
      token (0, 1), px 1: n = 3 (left, token (0, 0)) ln 4 -> (4 * 1 + 2 + 4 + 8) / 7 = 18/7;
      token (1, 0), px 1: n = 2 (up-right, token (0, 1)) ln 5 -> (5 * 2 + 1 + 4 + 8) / 8 = 23/8;
      token (1, 1), px 0: n = 0 (up-left, token (0, 0)) ln 3 -> (3 * 1 + 2 + 4 + 8) / 6 = 17/6;
      token (1, 1), px 1: n = 8 (out of grid) = +inf, n = 2 (out of grid) = NaN: no effect, 3.75.
    Class 1 is 1 everywhere (the weights of a pixel sum to 1).
    """
    tokens = torch.tensor([[[1.0, 2.0], [4.0, 8.0]], [[1.0, 1.0], [1.0, 1.0]]], dtype=dtype)[None]
    affinity = torch.zeros(1, 9 * 2, 2, 2, dtype=dtype)
    ch = lambda n, px: n * 2 + px  # noqa: E731  (rh = 1, rw = 2)
    affinity[0, ch(4, 0), 0, 0] = math.log(2.0)
    affinity[0, ch(0, 0), 0, 0] = 100.0
    affinity[0, ch(3, 1), 0, 1] = math.log(4.0)
    affinity[0, ch(2, 1), 1, 0] = math.log(5.0)
    affinity[0, ch(0, 0), 1, 1] = math.log(3.0)
    affinity[0, ch(8, 1), 1, 1] = float("inf")
    affinity[0, ch(2, 1), 1, 1] = float("nan")
    expected0 = torch.tensor([[3.2, 3.75, 3.75, 18 / 7], [3.75, 23 / 8, 17 / 6, 3.75]], dtype=dtype)
    expected = torch.stack([expected0, torch.ones(2, 4, dtype=dtype)])[None]  # (1, 2, 2, 4)
    return affinity, tokens, expected


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_built_2x2_grid(impl):
    affinity, tokens, expected = _hand_case()
    out = token_association(affinity, tokens, (1, 2), impl=impl)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(official_forward(affinity, tokens, 1, 2), expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_built_2x2_grid_gradients(impl):
    """Zero affinity, loss = sum of class 0 over the 8 pixels, region_res (1, 2).

    Every pixel weighs each of the 4 tokens 1/4, so d loss / d token = 8 * 1/4 = 2 (class 0) and 0
    for class 1. d loss / d a_n = w_n (v_n - sum_k w_k v_k) = (v_n - 3.75) / 4 at the valid
    neighbours (v_n = class-0 logit of neighbour n) and 0 at the 5 out-of-grid ones.
    """
    _, tokens, _ = _hand_case()
    affinity = torch.zeros(1, 18, 2, 2, dtype=torch.float64, requires_grad=True)
    tokens.requires_grad_(True)
    out = token_association(affinity, tokens, (1, 2), impl=impl)
    out[:, 0].sum().backward()
    torch.testing.assert_close(
        tokens.grad, torch.tensor([[[[2.0, 2.0], [2.0, 2.0]], [[0.0, 0.0], [0.0, 0.0]]]]).double()
    )
    values = torch.tensor([[1.0, 2.0], [4.0, 8.0]], dtype=torch.float64)
    expected = torch.zeros(9, 2, 2, 2, dtype=torch.float64)  # (n, px, ty, tx)
    for ty in range(2):
        for tx in range(2):
            for n in range(9):
                y, x = ty + n // 3 - 1, tx + n % 3 - 1
                if 0 <= y < 2 and 0 <= x < 2:
                    expected[n, :, ty, tx] = (values[y, x] - 3.75) / 4
    torch.testing.assert_close(affinity.grad, expected.reshape(1, 18, 2, 2))


# ----------------------------------------------------------------------------------------------
# parity: op vs reference vs the official formula
# ----------------------------------------------------------------------------------------------
@needs_op
@pytest.mark.parametrize("h", [1, 2, 3, 5])
@pytest.mark.parametrize("w", [1, 2, 3, 5])
@pytest.mark.parametrize("C", [1, 7])
def test_parity_odd_grids(h, w, C):
    rh, rw = 2, 3
    affinity, tokens, grad = _inputs(2, C, h, w, rh, rw)
    results = _all_three(affinity, tokens, grad, rh, rw)
    for name in ("reference", "official"):
        for a, b in zip(results["op"], results[name]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@needs_op
@pytest.mark.parametrize("region", [(1, 1), (4, 4), (3, 1), (1, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parity_region_res_and_dtype(region, dtype):
    rh, rw = region
    affinity, tokens, grad = _inputs(1, 5, 4, 3, rh, rw, dtype=dtype)
    results = _all_three(affinity, tokens, grad, rh, rw)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for name in ("reference", "official"):
        for a, b in zip(results["op"], results[name]):
            assert a.dtype == dtype
            torch.testing.assert_close(a, b, **tol)


@needs_op
def test_non_contiguous_inputs_and_partial_gradients():
    rh, rw = 2, 2
    affinity, tokens, grad = _inputs(2, 3, 3, 4, rh, rw)
    # Same values, other strides: channels-last affinity, transposed token storage.
    a_nc = affinity.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    t_nc = tokens.transpose(2, 3).contiguous().transpose(2, 3)
    assert not a_nc.is_contiguous() and not t_nc.is_contiguous()
    ref = token_association_pytorch(affinity, tokens, (rh, rw))
    torch.testing.assert_close(token_association(a_nc, t_nc, (rh, rw), impl="op"), ref)
    for needs in [(True, False), (False, True)]:
        grads = []
        for impl in ("op", "pytorch"):
            a = affinity.clone().requires_grad_(needs[0])
            t = tokens.clone().requires_grad_(needs[1])
            token_association(a, t, (rh, rw), impl=impl).backward(grad)
            grads.append((a.grad, t.grad))
        for x, y in zip(*grads):
            assert (x is None) == (y is None)
            if x is not None:
                torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


@needs_op
@pytest.mark.parametrize("threads", [1, 2])
def test_parity_multithreaded(threads):
    """Enough work per token row for the CPU kernels to share the rows among threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        affinity, tokens, grad = _inputs(2, 40, 8, 7, 4, 4)
        op = _forward_backward(
            lambda a, t: token_association(a, t, 4, impl="op"), affinity, tokens, grad
        )
        ref = _forward_backward(
            lambda a, t: token_association_pytorch(a, t, 4), affinity, tokens, grad
        )
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(op, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# empty shapes
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "shape", [(0, 3, 2, 3), (2, 0, 2, 3), (0, 0, 2, 3), (2, 3, 0, 3), (2, 3, 2, 0)]
)
def test_empty_shapes(impl, shape):
    B, C, h, w = shape
    rh, rw = 2, 3
    affinity, tokens, _ = _inputs(B, C, h, w, rh, rw)
    affinity.requires_grad_(True)
    tokens.requires_grad_(True)
    out = token_association(affinity, tokens, (rh, rw), impl=impl)
    assert out.shape == (B, C, h * rh, w * rw)
    out.sum().backward()
    for t in (affinity, tokens):
        assert t.grad is not None and t.grad.shape == t.shape
        assert torch.count_nonzero(t.grad) == 0  # nothing depends on them
    if HAS_OP and impl == "op":
        with torch.no_grad():
            out2, weights = torch.ops.seg_methods.token_association_forward(
                affinity, tokens, rh, rw, True
            )
        assert out2.shape == out.shape and weights.shape == (B, 9, h * rh, w * rw)
        if C == 0 and B > 0:  # no class, but the weights are still the softmax
            ref = F.softmax(
                affinity.detach()
                .reshape(B, 9, rh, rw, h, w)
                .masked_fill(~neighbour_validity(h, w)[None, :, None, None], float("-inf")),
                dim=1,
            )
            torch.testing.assert_close(
                weights, ref.permute(0, 1, 4, 2, 5, 3).reshape(B, 9, h * rh, w * rw)
            )


# ----------------------------------------------------------------------------------------------
# gradcheck
# ----------------------------------------------------------------------------------------------
@needs_op
# Small (full gradcheck runs one backward per output element): a 3 x 2 grid with B = 2, a one-row
# grid, a one-column grid; rh != rw.
@pytest.mark.parametrize("shape", [(2, 2, 3, 2, 1, 2), (1, 2, 1, 3, 2, 1), (1, 1, 2, 1, 1, 1)])
def test_gradcheck(shape):
    B, C, h, w, rh, rw = shape
    affinity, tokens, _ = _inputs(B, C, h, w, rh, rw, scale=1.0)
    affinity.requires_grad_(True)
    tokens.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, t: token_association(a, t, (rh, rw), impl="op"), (affinity, tokens)
    )
    # The reference too (it is what the op is compared with everywhere else).
    assert torch.autograd.gradcheck(
        lambda a, t: token_association_pytorch(a, t, (rh, rw)), (affinity, tokens)
    )


# ----------------------------------------------------------------------------------------------
# extreme logits
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_and_infinite_logits(impl, dtype):
    """Huge logits pick one neighbour without overflow; -inf logits drop a valid neighbour."""
    rh, rw = 2, 2
    affinity, tokens, grad = _inputs(1, 3, 3, 3, rh, rw, dtype=dtype)
    big = 1e30 if dtype == torch.float32 else 1e300
    # Every pixel: neighbour 4 (its own token) gets a huge logit, the others huge negative ones
    # or -inf: the weights are one-hot on the own token, so the output is the upsampled tokens.
    a = torch.full_like(affinity, -big)
    a[:, 4 * rh * rw : 5 * rh * rw] = big
    a[:, : rh * rw] = float("-inf")
    a = a.requires_grad_(True)
    t = tokens.clone().requires_grad_(True)
    out = token_association(a, t, (rh, rw), impl=impl)
    upsampled = tokens.repeat_interleave(rh, dim=2).repeat_interleave(rw, dim=3)
    torch.testing.assert_close(out, upsampled)
    out.backward(grad)
    assert torch.isfinite(a.grad).all() and torch.isfinite(t.grad).all()
    torch.testing.assert_close(a.grad, torch.zeros_like(a.grad))  # saturated softmax
    # d out / d tokens: each token receives the gradient of its own rh x rw pixels.
    expected = grad.reshape(1, 3, 3, rh, 3, rw).sum(dim=(3, 5))
    torch.testing.assert_close(t.grad, expected)

    # Moderately large logits (exp overflows without the max shift): equal to the reference.
    for scale in (80.0, 1e4):
        a2 = affinity * scale
        ref = official_forward(a2, tokens, rh, rw)
        assert torch.isfinite(ref).all()
        torch.testing.assert_close(token_association(a2, tokens, (rh, rw), impl=impl), ref)

    # Every valid logit of a pixel -inf: NaN, as torch.softmax (and the official head) gives.
    a3 = affinity.clone()
    a3[0, :, 1, 1] = float("-inf")  # all 9 neighbours of the centre token, all its pixels
    out3 = token_association(a3, tokens, (rh, rw), impl=impl)
    assert torch.isnan(out3[:, :, 2:4, 2:4]).all()
    mask = torch.ones_like(out3, dtype=torch.bool)
    mask[:, :, 2:4, 2:4] = False
    torch.testing.assert_close(out3[mask], official_forward(a3, tokens, rh, rw)[mask])


# ----------------------------------------------------------------------------------------------
# dtypes, saved tensors, fallback, tracing, errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(impl, dtype):
    affinity, tokens, _ = _inputs(1, 4, 3, 2, 2, 2, dtype=torch.float32)
    a, t = affinity.to(dtype).requires_grad_(True), tokens.to(dtype).requires_grad_(True)
    out = token_association(a, t, 2, impl=impl)
    assert out.dtype == dtype
    ref = token_association_pytorch(a.detach().float(), t.detach().float(), 2)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    out.float().sum().backward()
    assert a.grad.dtype == dtype and t.grad.dtype == dtype


@needs_op
def test_saves_weights_instead_of_affinity():
    """Autograd keeps the (B, 9, H, W) weights (as many elements as the affinity) and the token
    logits by reference; not the affinity, no unfolded (B, 9 C, h w) copy."""
    affinity, tokens, grad = _inputs(2, 5, 3, 4, 2, 2)
    affinity.requires_grad_(True)
    tokens.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = token_association(affinity, tokens, 2, impl="op")
    assert len(saved) == 2
    weights, kept_tokens = saved
    assert weights.shape == (2, 9, 6, 8) and weights.numel() == affinity.numel()
    assert kept_tokens.data_ptr() == tokens.data_ptr()
    torch.testing.assert_close(weights.sum(1), torch.ones(2, 6, 8, dtype=weights.dtype))
    out.backward(grad)

    # Inference stores nothing and does not compute the weights.
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        saved.clear()
        token_association(affinity, tokens, 2, impl="op")
    assert saved == []


def test_falls_back_without_extension(monkeypatch):
    monkeypatch.setattr(ta_module, "has_op", lambda name: False)
    affinity, tokens, expected = _hand_case()
    torch.testing.assert_close(token_association(affinity, tokens, (1, 2)), expected)
    with pytest.raises(RuntimeError, match="impl='op'"):
        token_association(affinity, tokens, (1, 2), impl="op")


@needs_op
def test_trace_records_the_compiled_op():
    affinity, tokens, _ = _inputs(1, 3, 3, 4, 2, 2, dtype=torch.float32)
    module = TokenAssociation(2)
    assert "region_res=(2, 2)" in repr(module)
    with torch.no_grad():
        traced = torch.jit.trace(module, (affinity, tokens))
        assert "seg_methods::token_association_forward" in str(traced.graph)
        affinity2, tokens2, _ = _inputs(1, 3, 3, 4, 2, 2, dtype=torch.float32, seed=5)
        torch.testing.assert_close(
            traced(affinity2, tokens2), token_association_pytorch(affinity2, tokens2, 2)
        )


def test_shape_errors():
    affinity, tokens, _ = _inputs(1, 2, 3, 3, 2, 2)
    with pytest.raises(ValueError, match=r"affinity must be \(B, 9 \* rh \* rw, h, w\)"):
        token_association(affinity[:, :-1], tokens, 2)
    with pytest.raises(ValueError, match=r"affinity must be \(B, 9 \* rh \* rw, h, w\)"):
        token_association(affinity, tokens[..., :2], 2)
    with pytest.raises(ValueError, match="region_res must be positive"):
        token_association(affinity, tokens, (0, 2))
    with pytest.raises(ValueError, match="impl"):
        token_association(affinity, tokens, 2, impl="cuda")
    with pytest.raises(ValueError, match="floating point"):
        token_association(affinity, tokens.long(), 2)


@needs_op
def test_op_checks_shapes():
    """The compiled op raises clear errors itself (for callers of torch.ops directly)."""
    affinity, tokens, grad = _inputs(1, 2, 3, 3, 2, 2)
    fwd = torch.ops.seg_methods.token_association_forward
    bwd = torch.ops.seg_methods.token_association_backward
    with pytest.raises(RuntimeError, match=r"affinity must have shape \(B, 9 \* rh \* rw, h, w\)"):
        fwd(affinity, tokens, 2, 3, False)
    with pytest.raises(RuntimeError, match="dtype"):
        fwd(affinity.float(), tokens, 2, 2, False)
    with pytest.raises(RuntimeError, match="region_res must be positive"):
        fwd(affinity, tokens, 0, 2, False)
    _, weights = fwd(affinity, tokens, 2, 2, True)
    with pytest.raises(RuntimeError, match=r"grad_output must have shape"):
        bwd(grad[..., :-1], weights, tokens, 2, 2, [True, True])
    with pytest.raises(RuntimeError, match=r"weights must have shape \(B, 9, h \* rh, w \* rw\)"):
        bwd(grad, weights[:, :8], tokens, 2, 2, [True, True])


# ----------------------------------------------------------------------------------------------
# CUDA (never runs on the CPU-only machines; the CPU tests above cover the shared math)
# ----------------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("shape", [(2, 7, 5, 3, 2, 3), (1, 19, 1, 4, 4, 4), (2, 40, 6, 6, 4, 4)])
def test_cuda_matches_cpu(shape):
    B, C, h, w, rh, rw = shape
    affinity, tokens, grad = _inputs(B, C, h, w, rh, rw)

    def run(device):
        return _forward_backward(
            lambda a, t: token_association(a, t, (rh, rw), impl="op"),
            affinity.to(device),
            tokens.to(device),
            grad.to(device),
        )

    for a, b in zip(run("cpu"), run("cuda")):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-10, atol=1e-10)


@needs_cuda
def test_cuda_gradcheck_and_empty():
    affinity, tokens, _ = _inputs(1, 3, 2, 3, 2, 2, scale=1.0)
    a = affinity.cuda().requires_grad_(True)
    t = tokens.cuda().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, t: token_association(a, t, 2, impl="op"), (a, t))
    for B, C in [(0, 3), (2, 0)]:
        affinity, tokens, _ = _inputs(B, C, 2, 3, 2, 2)
        out = token_association(affinity.cuda(), tokens.cuda(), 2, impl="op")
        assert out.shape == (B, C, 4, 6)
