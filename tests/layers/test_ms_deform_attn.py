"""Tests of multi-scale deformable attention sampling (compiled op and PyTorch reference)."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from seg_methods.layers.ms_deform_attn import ms_deform_attn, ms_deform_attn_pytorch
from seg_methods.utils.ext import has_op

# The module itself (the attribute seg_methods.layers.ms_deform_attn is the exported function).
msda_module = importlib.import_module("seg_methods.layers.ms_deform_attn")

HAS_OP = has_op("ms_deform_attn_forward") and has_op("ms_deform_attn_backward")
needs_op = pytest.mark.skipif(not HAS_OP, reason="seg_methods._C with ms_deform_attn not built")
needs_cuda = pytest.mark.skipif(
    not (HAS_OP and torch.cuda.is_available()), reason="needs CUDA and the compiled op"
)
IMPLS = ["pytorch", pytest.param("op", marks=needs_op)]


def _levels(shapes):
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index, int(sizes.sum())


def _random_inputs(n, shapes, m, d, lq, p, dtype=torch.float64, spread=0.4, device="cpu"):
    """Random inputs; locations in [-spread/2, 1 + spread/2] so some points fall outside."""
    spatial_shapes, level_start_index, s = _levels(shapes)
    value = torch.randn(n, s, m, d, dtype=dtype)
    loc = torch.rand(n, lq, m, len(shapes), p, 2, dtype=dtype) * (1 + spread) - spread / 2
    attn = torch.rand(n, lq, m, len(shapes), p, dtype=dtype)
    return [t.to(device) for t in (value, spatial_shapes, level_start_index, loc, attn)]


# One level of 2 x 2 pixels, two channels: channel 0 = [[1, 2], [3, 4]], channel 1 = 10x that.
# Pixel (i, j) has its centre at normalized (x, y) = ((j + 0.5) / 2, (i + 0.5) / 2).
_MAP = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
_POINTS = [
    ((0.75, 0.25), 2.0),  # centre of pixel (0, 1)
    ((0.5, 0.5), 2.5),  # between all four pixels: their mean
    ((1.5, 0.5), 0.0),  # right of the map by more than one pixel
    ((0.0, 0.25), 0.5),  # on the left border at row 0: half of pixel (0, 0), half zero padding
    ((0.5, 0.25), 1.5),  # between pixels (0, 0) and (0, 1)
]


def _tiny_inputs(points, weights, dtype=torch.float64):
    """1 image, 1 head, 1 level 2 x 2, D = 2, one query per row of `points` groups."""
    spatial_shapes, level_start_index, _ = _levels([(2, 2)])
    value = torch.stack([_MAP.flatten(), 10 * _MAP.flatten()], dim=-1)  # (S=4, D=2)
    value = value.reshape(1, 4, 1, 2).to(dtype)
    loc = torch.tensor(points, dtype=dtype).reshape(1, len(points), 1, 1, -1, 2)
    attn = torch.tensor(weights, dtype=dtype).reshape(1, len(points), 1, 1, -1)
    return value, spatial_shapes, level_start_index, loc, attn


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_computed_single_points(impl):
    # One query per point, P = 1, weight 1: the output is the bilinear read itself.
    value, ss, lsi, loc, attn = _tiny_inputs([[pt] for pt, _ in _POINTS], [[1.0]] * len(_POINTS))
    out = ms_deform_attn(value, ss, lsi, loc, attn, impl=impl)
    expected = torch.tensor([[e, 10 * e] for _, e in _POINTS], dtype=torch.float64)
    assert out.shape == (1, len(_POINTS), 2)
    torch.testing.assert_close(out[0], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_computed_weighted_sum(impl):
    # One query, P = 4 points with weights: 0.5 * 2 + 0.25 * 2.5 + 2 * 0 + 1 * 0.5 = 2.125.
    points = [[pt for pt, _ in _POINTS[:4]]]
    value, ss, lsi, loc, attn = _tiny_inputs(points, [[0.5, 0.25, 2.0, 1.0]])
    out = ms_deform_attn(value, ss, lsi, loc, attn, impl=impl)
    torch.testing.assert_close(
        out, torch.tensor([[[2.125, 21.25]]], dtype=torch.float64), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_computed_gradients(impl):
    # The point between the four pixels, weight 1.5, upstream gradient 1 on channel 0 only:
    #   d out / d attn = bilinear read = 2.5
    #   d out / d x = 1.5 * W * (0.5 * (2 - 1) + 0.5 * (4 - 3)) = 1.5 * 2 * 1 = 3
    #   d out / d y = 1.5 * H * (0.5 * (3 - 1) + 0.5 * (4 - 2)) = 1.5 * 2 * 2 = 6
    #   d out / d value[pixel, channel 0] = 1.5 * 0.25 for all four pixels, 0 for channel 1.
    value, ss, lsi, loc, attn = _tiny_inputs([[(0.5, 0.5)]], [[1.5]])
    for t in (value, loc, attn):
        t.requires_grad_(True)
    out = ms_deform_attn(value, ss, lsi, loc, attn, impl=impl)
    out.backward(torch.tensor([[[1.0, 0.0]]], dtype=torch.float64))
    torch.testing.assert_close(attn.grad.flatten(), torch.tensor([2.5], dtype=torch.float64))
    torch.testing.assert_close(loc.grad.flatten(), torch.tensor([3.0, 6.0], dtype=torch.float64))
    expected_gv = torch.tensor([[0.375, 0.0]] * 4, dtype=torch.float64)
    torch.testing.assert_close(value.grad.reshape(4, 2), expected_gv)


def test_reference_equals_grid_sample_definition():
    # Independent check of the reference on 2 levels: per level/head grid_sample + weighted sum.
    value, ss, lsi, loc, attn = _random_inputs(1, [(3, 4), (2, 5)], 2, 3, 4, 2)
    out = ms_deform_attn_pytorch(value, ss, lsi, loc, attn)
    expected = torch.zeros(1, 4, 2, 3, dtype=torch.float64)
    start = 0
    for lvl, (h, w) in enumerate(ss.tolist()):
        for head in range(2):
            vmap = value[0, start : start + h * w, head].T.reshape(1, 3, h, w)
            grid = 2 * loc[:, :, head, lvl] - 1  # (1, Lq, P, 2)
            sampled = F.grid_sample(vmap, grid, align_corners=False)[0]  # (D, Lq, P)
            expected[0, :, head] += (sampled * attn[0, :, head, lvl]).sum(-1).T
        start += h * w
    torch.testing.assert_close(out, expected.reshape(1, 4, 6))


def _op_and_reference(inputs, grad_seed=1):
    results = []
    for impl in ("op", "pytorch"):
        value, ss, lsi, loc, attn = [t.clone() for t in inputs]
        for t in (value, loc, attn):
            t.requires_grad_(True)
        out = ms_deform_attn(value, ss, lsi, loc, attn, impl=impl)
        grad_out = torch.randn(
            out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=out.dtype
        ).to(out.device)
        out.backward(grad_out)
        results.append((out.detach(), value.grad, loc.grad, attn.grad))
    return results


@needs_op
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "n, shapes, m, d, lq, p",
    [
        (2, [(5, 7), (3, 3), (1, 2)], 3, 5, 11, 3),  # odd sizes, D below one vector of lanes
        (1, [(4, 6), (2, 3)], 2, 19, 7, 4),  # D = 2 lane blocks + a tail of 3
        (1, [(1, 1)], 1, 8, 3, 2),  # a single-pixel level
    ],
)
def test_op_matches_reference(dtype, n, shapes, m, d, lq, p):
    inputs = _random_inputs(n, shapes, m, d, lq, p, dtype=dtype)
    (out, *grads), (ref, *ref_grads) = _op_and_reference(inputs)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, ref, **tol)
    for g, rg, name in zip(grads, ref_grads, ("value", "sampling_locations", "attention")):
        torch.testing.assert_close(g, rg, **tol, msg=lambda msg: f"grad {name}: {msg}")


@needs_op
def test_op_matches_reference_on_pixel_centres_and_borders():
    # Locations exactly on pixel centres, pixel edges and the map border (x or y = 0 or 1), where
    # the bilinear weights are at their kinks: both implementations take the cell [floor, floor+1].
    shapes = [(4, 5), (3, 2)]
    value, ss, lsi, _, _ = _random_inputs(1, shapes, 2, 4, 1, 1)
    coords = torch.tensor([0.0, 0.125, 0.25, 0.5, 0.75, 1.0, 1.25, -0.25], dtype=torch.float64)
    xy = torch.cartesian_prod(coords, coords)  # (64, 2)
    lq = xy.shape[0]
    loc = xy.reshape(1, lq, 1, 1, 1, 2).expand(1, lq, 2, 2, 1, 2).contiguous()
    attn = torch.rand(1, lq, 2, 2, 1, dtype=torch.float64)
    (out, *grads), (ref, *ref_grads) = _op_and_reference([value, ss, lsi, loc, attn])
    torch.testing.assert_close(out, ref)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n, lq", [(0, 5), (2, 0)])
def test_empty_inputs(impl, n, lq):
    value, ss, lsi, loc, attn = _random_inputs(n, [(3, 3), (1, 2)], 2, 4, lq, 2)
    for t in (value, loc, attn):
        t.requires_grad_(True)
    out = ms_deform_attn(value, ss, lsi, loc, attn, impl=impl)
    assert out.shape == (n, lq, 8)
    out.sum().backward()
    assert value.grad.shape == value.shape and loc.grad.shape == loc.shape
    assert attn.grad.shape == attn.shape
    assert value.grad.abs().sum().item() == 0.0


@needs_op
def test_gradcheck_op():
    value, ss, lsi, loc, attn = _random_inputs(1, [(3, 4), (2, 2)], 2, 3, 3, 2)
    for t in (value, loc, attn):
        t.requires_grad_(True)

    def fn(v, sl, a):
        return ms_deform_attn(v, ss, lsi, sl, a, impl="op")

    assert torch.autograd.gradcheck(fn, (value, loc, attn), eps=1e-6, atol=1e-5)


@needs_op
def test_raw_op_backward_outputs():
    value, ss, lsi, loc, attn = _random_inputs(1, [(3, 4)], 1, 2, 2, 2)
    grad_out = torch.ones(1, 2, 2, dtype=torch.float64)
    grads = torch.ops.seg_methods.ms_deform_attn_backward(value, ss, lsi, loc, attn, grad_out)
    assert [tuple(g.shape) for g in grads] == [
        tuple(value.shape),
        tuple(loc.shape),
        (1, 2, 1, 1, 2),
    ]


def test_pytorch_impl_without_extension(monkeypatch):
    # Pretend the extension is missing: "auto" falls back to the reference, "op" fails clearly.
    monkeypatch.setattr(msda_module, "has_op", lambda name: False)
    value, ss, lsi, loc, attn = _tiny_inputs([[pt] for pt, _ in _POINTS], [[1.0]] * len(_POINTS))
    expected = torch.tensor([[e, 10 * e] for _, e in _POINTS], dtype=torch.float64)
    for impl in ("auto", "pytorch"):
        out = ms_deform_attn(value, ss, lsi, loc, attn, impl=impl)
        torch.testing.assert_close(out[0], expected, rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match="not available"):
        ms_deform_attn(value, ss, lsi, loc, attn, impl="op")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_computed_in_float32(impl, dtype):
    inputs = _random_inputs(1, [(3, 4), (2, 2)], 2, 4, 5, 2, dtype=torch.float32)
    low = [t.to(dtype) if t.is_floating_point() else t for t in inputs]
    out = ms_deform_attn(*low, impl=impl)
    assert out.dtype == dtype
    # Same result as float32 on the rounded inputs, up to the final rounding to `dtype`.
    expected = ms_deform_attn_pytorch(*[t.float() if t.is_floating_point() else t for t in low])
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)


def test_bad_shapes_raise_clear_errors():
    value, ss, lsi, loc, attn = _random_inputs(1, [(3, 4), (2, 2)], 2, 4, 5, 2)
    with pytest.raises(ValueError, match="value has S = 15 pixels but spatial_shapes"):
        ms_deform_attn(value[:, :15], ss, lsi, loc, attn)
    with pytest.raises(ValueError, match=r"sampling_locations must be \(N, Lq, M, L, P, 2\)"):
        ms_deform_attn(value, ss, lsi, loc[..., :1], attn)
    with pytest.raises(ValueError, match="does not match"):
        ms_deform_attn(value, ss, lsi, loc[:, :, :1].contiguous(), attn)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn(value, ss, lsi, loc, attn[..., :1])
    with pytest.raises(ValueError, match="level_start_index"):
        ms_deform_attn(value, ss, lsi[:1], loc, attn)
    with pytest.raises(ValueError, match="impl must be one of"):
        ms_deform_attn(value, ss, lsi, loc, attn, impl="cuda")


@needs_op
def test_raw_op_checks_inputs():
    value, ss, lsi, loc, attn = _random_inputs(1, [(3, 4), (2, 2)], 2, 4, 5, 2)
    op = torch.ops.seg_methods.ms_deform_attn_forward
    with pytest.raises(RuntimeError, match="value has S = 15 pixels but spatial_shapes sum to 16"):
        op(value[:, :15].contiguous(), ss, lsi, loc, attn)
    with pytest.raises(RuntimeError, match=r"level_start_index\[1\] = 11"):
        op(value, ss, lsi + torch.tensor([0, -1]), loc, attn)
    with pytest.raises(RuntimeError, match="must share one dtype"):
        op(value, ss, lsi, loc.float(), attn)
    with pytest.raises(RuntimeError, match="must be int64"):
        op(value, ss.int(), lsi, loc, attn)
    strided = torch.zeros(1, 16, 2, 8, dtype=torch.float64)[..., ::2]  # value's shape, strided
    with pytest.raises(RuntimeError, match="must be contiguous"):
        op(strided, ss, lsi, loc, attn)
    with pytest.raises(RuntimeError, match="attention_weights"):
        op(value, ss, lsi, loc, attn[..., :1].contiguous())
    with pytest.raises(RuntimeError, match="grad_output must be"):
        torch.ops.seg_methods.ms_deform_attn_backward(
            value, ss, lsi, loc, attn, torch.zeros(1, 5, 7, dtype=torch.float64)
        )


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_cpu(dtype):
    inputs = _random_inputs(2, [(5, 7), (3, 3), (1, 2)], 3, 5, 11, 3, dtype=dtype)
    results = []
    for device in ("cpu", "cuda"):
        value, ss, lsi, loc, attn = [t.clone().to(device) for t in inputs]
        for t in (value, loc, attn):
            t.requires_grad_(True)
        out = ms_deform_attn(value, ss, lsi, loc, attn, impl="op")
        out.backward(torch.ones_like(out))
        results.append([x.cpu() for x in (out.detach(), value.grad, loc.grad, attn.grad)])
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for cpu_t, cuda_t in zip(*results):
        torch.testing.assert_close(cuda_t, cpu_t, **tol)
