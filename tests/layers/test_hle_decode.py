"""Tests of the compiled HLE decoding kernel (seg_methods/layers/hle_decode.py and
csrc/hle_decode) against the pure-PyTorch decoding it replaces
(seg_methods/modeling/postprocessing/hle_decoding.py).

Parity (identical labels and seeds, ``best`` / Phi to rounding) on random clustered embedding maps
(several bandwidths and thresholds, including ones where the CPU kernel's per-chunk bounds skip
seeds), pure-noise maps, the model's strided (D, H, W) layout, NaN inputs, odd and empty shapes
(no candidate, one pixel, no pixel, no seed, nothing masked in), float32 / float64; a hand-built
map with known instances and a merged seed; the panoptic decoding with the op swapped in; errors.
Decoding has no gradient, so there is no gradcheck.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from seg_methods.layers.hle_decode import (
    hle_assign_pixels_to_seeds,
    hle_greedy_seed_clustering,
    hle_seed_kernel_row,
)
from seg_methods.modeling.postprocessing import hle_decoding
from seg_methods.modeling.postprocessing.hle_decoding import (
    assign_pixels_to_seeds,
    greedy_seed_clustering,
    hle_panoptic_decode,
    seed_candidates,
    seed_kernel_row,
)
from seg_methods.utils.ext import ext_has_cuda, has_op

hd_module = importlib.import_module("seg_methods.layers.hle_decode")

HAS_OP = all(has_op(n) for n in ("hle_kernel_rows", "hle_assign_pixels", "hle_seed_clustering"))
needs_op = pytest.mark.skipif(not HAS_OP, reason="seg_methods._C hle_decode ops not built")
needs_cuda = pytest.mark.skipif(
    not (HAS_OP and torch.cuda.is_available() and ext_has_cuda()),
    reason="needs a GPU and the CUDA kernels",
)
DTYPES = [torch.float32, torch.float64]


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-15)


def _positions(h, w, coord_scale, dtype):
    ys = torch.arange(h, dtype=dtype) / coord_scale
    xs = torch.arange(w, dtype=dtype) / coord_scale
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)


def _scene(h, w, d, n_inst, dtype, seed=0, noise=0.15, thing_frac=0.7):
    """A clustered map: instances on a Voronoi partition of random centres, embeddings = unit
    instance mean + noise, re-normalised; a random subset of pixels masked out (stuff).

    Returns (emb (D, H, W), positions (P, 2), sigmas (P,), mask (P,), candidates (K0,)); the
    candidates come from seed_candidates on a seed map peaked at the instance centres.
    """
    g = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(n_inst, d, generator=g, dtype=torch.float64), dim=1)
    centres = torch.rand(n_inst, 2, generator=g, dtype=torch.float64) * torch.tensor([h, w])
    grid = _positions(h, w, 1.0, torch.float64)  # (P, 2) in pixels
    inst = torch.cdist(grid, centres).argmin(dim=1)  # (P,)
    emb = means[inst] + noise * torch.randn(h * w, d, generator=g, dtype=torch.float64)
    emb = F.normalize(emb, dim=1).t().reshape(d, h, w)
    dist = torch.cdist(grid, centres).min(dim=1).values
    seed_map = (1.0 - dist / (dist.max() + 1)) * (
        0.8 + 0.2 * torch.rand(h * w, generator=g, dtype=torch.float64)
    )
    mask = torch.rand(h * w, generator=g) < thing_frac
    sigmas = 0.3 + 0.4 * torch.rand(h * w, generator=g, dtype=torch.float64)
    cand = seed_candidates(seed_map.reshape(h, w), mask.reshape(h, w), 0.3)
    return (
        emb.to(dtype),
        _positions(h, w, float(max(h, w)), dtype),
        sigmas.to(dtype),
        mask,
        cand,
    )


def _flat(emb):
    """The model's layout: (D, H, W) viewed as (P, D) without a copy."""
    return emb.reshape(emb.shape[0], -1).t()


def _assert_clustering_equal(out, ref, dtype):
    labels, seeds, best = out
    labels_r, seeds_r, best_r = ref
    assert torch.equal(seeds, seeds_r)
    assert torch.equal(labels, labels_r), f"{int((labels != labels_r).sum())} labels differ"
    assert best.dtype == best_r.dtype == dtype
    torch.testing.assert_close(best, best_r, **_tol(dtype))


# (spatial_sigma, mask_threshold, merge_threshold, max_instances)
PARAMS = [
    (0.5, 0.5, 0.5, 200),  # MODEL.HLE.DECODE defaults
    (0.05, 0.3, 0.7, 25),  # small bandwidth: the CPU kernel skips far seeds per chunk
    (2.0, 0.0, 0.5, 200),  # every positive Phi passes the threshold
    (0.5, -1.0, 0.2, 200),  # negative threshold: Phi > best (0) decides
    (1.0, 0.9, 0.95, 3),  # strict thresholds, few instances
]


@needs_op
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("params", PARAMS)
def test_clustering_matches_reference_on_clustered_maps(dtype, params):
    spatial_sigma, mask_thr, merge_thr, max_inst = params
    emb, pos, sigmas, mask, cand = _scene(37, 53, 12, 9, dtype, seed=int(100 * spatial_sigma))
    assert cand.numel() > 3
    kw = dict(
        spatial_sigma=spatial_sigma,
        mask_threshold=mask_thr,
        merge_threshold=merge_thr,
        max_instances=max_inst,
    )
    ref = greedy_seed_clustering(cand, _flat(emb), pos, sigmas, mask, **kw)
    out = hle_greedy_seed_clustering(cand, _flat(emb), pos, sigmas, mask, impl="ext", **kw)
    _assert_clustering_equal(out, ref, dtype)
    assert int((out[0] >= 0).sum()) > 0  # the case is not trivial
    seeds = torch.ops.seg_methods.hle_select_seeds(
        cand, _flat(emb), pos, sigmas, spatial_sigma, merge_thr, max_inst
    )  # the seed selection alone
    assert torch.equal(seeds, ref[1])
    # contiguous (P, D) embeddings give the same result as the strided view
    out_c = hle_greedy_seed_clustering(
        cand, _flat(emb).contiguous(), pos, sigmas, mask, impl="ext", **kw
    )
    _assert_clustering_equal(out_c, ref, dtype)


@needs_op
@pytest.mark.parametrize("dtype", DTYPES)
def test_clustering_matches_reference_on_noise_with_many_candidates(dtype):
    """Unstructured embeddings (D = 5) and every pixel a candidate, in a random order, one pixel
    listed twice: many small instances and merges, up to max_instances."""
    g = torch.Generator().manual_seed(3)
    h, w, d = 11, 13, 5
    emb = F.normalize(torch.randn(h * w, d, generator=g, dtype=dtype), dim=1)
    pos = _positions(h, w, 8.0, dtype)
    sigmas = 0.2 + 0.5 * torch.rand(h * w, generator=g, dtype=dtype)
    mask = torch.rand(h * w, generator=g) < 0.8
    cand = torch.cat([torch.randperm(h * w, generator=g), torch.tensor([5])])
    for merge in (0.3, 0.9):
        kw = dict(spatial_sigma=0.3, mask_threshold=0.4, merge_threshold=merge, max_instances=25)
        ref = greedy_seed_clustering(cand, emb, pos, sigmas, mask, **kw)
        out = hle_greedy_seed_clustering(cand, emb, pos, sigmas, mask, impl="ext", **kw)
        _assert_clustering_equal(out, ref, dtype)
        assert ref[1].numel() > 5


@needs_op
def test_clustering_on_a_hand_built_map():
    """6 x 8 map, D = 3: instance A (columns 0-2, e_0), instance B (columns 5-7, e_1); columns 3-4
    are stuff (masked out). Candidates: a pixel of A (score 0.9), a pixel of B, then another pixel
    of A, which A's seed absorbs (Phi = 1 > merge_threshold). Large spatial bandwidth, so the
    embedding term decides: Phi = 1 inside an instance, exp(-1 / (2 * 0.3^2)) = 0.0039 across."""
    h, w = 6, 8
    eye = torch.eye(3)
    emb = eye[2].repeat(h, w, 1)  # (H, W, D)
    emb[:, :3] = eye[0]
    emb[:, 5:] = eye[1]
    emb = emb.permute(2, 0, 1).contiguous()
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[:, :3], mask[:, 5:] = True, True
    pos = _positions(h, w, 8.0, torch.float32)
    sigmas = torch.full((h * w,), 0.3)
    cand = torch.tensor([1 * w + 1, 3 * w + 6, 4 * w + 0])
    expected = torch.full((h, w), -1, dtype=torch.int64)
    expected[:, :3], expected[:, 5:] = 0, 1
    kw = dict(spatial_sigma=100.0, mask_threshold=0.5, merge_threshold=0.5, max_instances=10)
    for impl in ("ext", "pytorch"):
        labels, seeds, best = hle_greedy_seed_clustering(
            cand, _flat(emb), pos, sigmas, mask.reshape(-1), impl=impl, **kw
        )
        assert seeds.tolist() == [1 * w + 1, 3 * w + 6]  # the third candidate merged into A
        assert torch.equal(labels.reshape(h, w), expected)
        assert torch.equal(best.reshape(h, w)[~mask], torch.zeros(h * w - int(mask.sum())))
        assert float(best[mask.reshape(-1)].min()) > 0.999
    # max_instances = 1 keeps A only
    labels, seeds, _ = hle_greedy_seed_clustering(
        cand, _flat(emb), pos, sigmas, mask.reshape(-1), impl="ext", **{**kw, "max_instances": 1}
    )
    assert seeds.tolist() == [1 * w + 1] and torch.equal(
        labels.reshape(h, w), torch.where(expected == 0, 0, -1)
    )


@needs_op
@pytest.mark.parametrize("dtype", DTYPES)
def test_odd_and_empty_shapes(dtype):
    kw = dict(spatial_sigma=0.5, mask_threshold=0.5, merge_threshold=0.5, max_instances=5)
    # one pixel, its own seed: Phi = 1
    emb = torch.ones(1, 1, dtype=dtype)
    pos = torch.zeros(1, 2, dtype=dtype)
    sig = torch.full((1,), 0.5, dtype=dtype)
    one = torch.ones(1, dtype=torch.bool)
    for m in (one, ~one):
        out = hle_greedy_seed_clustering(torch.tensor([0]), emb, pos, sig, m, impl="ext", **kw)
        ref = greedy_seed_clustering(torch.tensor([0]), emb, pos, sig, m, **kw)
        _assert_clustering_equal(out, ref, dtype)
    assert out[1].tolist() == [0] and out[0].tolist() == [-1]  # masked out: a seed, no pixel
    # 1 x N and N x 1 maps, odd sizes, D = 1
    for h, w, d in ((1, 17, 1), (13, 1, 2), (7, 9, 3)):
        e, p, s, m, c = _scene(h, w, d, 2, dtype, seed=h + w)
        c = torch.arange(h * w) if c.numel() == 0 else c
        ref = greedy_seed_clustering(c, _flat(e), p, s, m, **kw)
        out = hle_greedy_seed_clustering(c, _flat(e), p, s, m, impl="ext", **kw)
        _assert_clustering_equal(out, ref, dtype)
    # no candidate, no instance allowed, nothing masked in
    e, p, s, m, c = _scene(5, 6, 4, 2, dtype)
    for cand, mask, mi in (
        (torch.zeros(0, dtype=torch.int64), m, 5),
        (c, m, 0),
        (c, torch.zeros_like(m), 5),
    ):
        ref = greedy_seed_clustering(cand, _flat(e), p, s, mask, **{**kw, "max_instances": mi})
        out = hle_greedy_seed_clustering(
            cand, _flat(e), p, s, mask, impl="ext", **{**kw, "max_instances": mi}
        )
        _assert_clustering_equal(out, ref, dtype)
        assert int((out[0] >= 0).sum()) == 0
    # no pixel at all
    out = hle_greedy_seed_clustering(
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(0, 12, dtype=dtype),
        torch.zeros(0, 2, dtype=dtype),
        torch.zeros(0, dtype=dtype),
        torch.zeros(0, dtype=torch.bool),
        impl="ext",
        **kw,
    )
    assert [t.shape for t in out] == [(0,), (0,), (0,)]
    # assignment with no seed; kernel row of one pixel
    labels = hle_assign_pixels_to_seeds(
        torch.zeros(0, 4, dtype=dtype),
        torch.zeros(0, 2, dtype=dtype),
        torch.zeros(0, dtype=dtype),
        _flat(e),
        p,
        m,
        spatial_sigma=0.5,
        mask_threshold=0.5,
        impl="ext",
    )
    assert torch.equal(labels, torch.full((30,), -1))
    row = hle_seed_kernel_row(emb[0], pos[0], sig[0], emb, pos, 0.5, impl="ext")
    assert row.tolist() == [1.0]


@needs_op
@pytest.mark.parametrize("dtype", DTYPES)
def test_assign_and_kernel_row_match_reference(dtype):
    """The fast variant's full-resolution assignment and seed_kernel_row; seeds given as the
    reference's kept seeds of a downsampled map, as hle_panoptic_decode does."""
    emb, pos, sigmas, mask, cand = _scene(67, 71, 12, 7, dtype, seed=5)  # 2 CPU tasks of 4096
    kw = dict(spatial_sigma=0.4, mask_threshold=0.5)
    _, seeds, _ = greedy_seed_clustering(
        cand, _flat(emb), pos, sigmas, mask, merge_threshold=0.5, max_instances=200, **kw
    )
    flat = _flat(emb)
    args = (flat[seeds], pos[seeds], sigmas[seeds], flat, pos, mask)
    ref = assign_pixels_to_seeds(*args, **kw)
    out = hle_assign_pixels_to_seeds(*args, impl="ext", **kw)
    assert torch.equal(out, ref) and int((ref >= 0).sum()) > 0
    # a single-thread and a two-thread run agree (tasks own their pixels)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(hle_assign_pixels_to_seeds(*args, impl="ext", **kw), ref)
    finally:
        torch.set_num_threads(threads)
    for k in (0, seeds.numel() - 1):
        i = int(seeds[k])
        r_ref = seed_kernel_row(flat[i], pos[i], sigmas[i], flat, pos, 0.4)
        r_op = hle_seed_kernel_row(flat[i], pos[i], sigmas[i], flat, pos, 0.4, impl="ext")
        torch.testing.assert_close(r_op, r_ref, **_tol(dtype))


@needs_op
def test_nan_embeddings_and_sigmas_match_reference():
    """NaN never joins a mask and always suppresses a candidate (the reference's comparisons)."""
    emb, pos, sigmas, mask, cand = _scene(23, 29, 6, 5, torch.float32, seed=9)
    flat = _flat(emb).clone()
    flat[::7] = float("nan")
    sigmas = sigmas.clone()
    sigmas[cand[1]] = float("nan")
    kw = dict(spatial_sigma=0.5, mask_threshold=0.5, merge_threshold=0.5, max_instances=50)
    ref = greedy_seed_clustering(cand, flat, pos, sigmas, mask, **kw)
    out = hle_greedy_seed_clustering(cand, flat, pos, sigmas, mask, impl="ext", **kw)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    torch.testing.assert_close(out[2], ref[2], equal_nan=True)


@needs_op
@pytest.mark.parametrize("downsample", [1, 2])
def test_panoptic_decode_with_the_op_swapped_in(monkeypatch, downsample):
    """hle_panoptic_decode with the reference functions replaced by the op (what a use_op switch
    in hle_decoding.py does) gives the same panoptic output."""
    d, h, w = 12, 33, 45
    emb, _, sigmas, mask, _ = _scene(h, w, d, 6, torch.float32, seed=11, thing_frac=1.0)
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(3 * torch.randn(3, h, w, generator=g), dim=0)
    probs[0] += 2.0 * mask.reshape(h, w)  # class 0 (thing) wins on most pixels
    probs = probs / probs.sum(0, keepdim=True)
    seed = torch.rand(h, w, generator=g)
    kw = dict(thing_ids=[0], spatial_sigma=0.5, coord_scale=float(w), downsample=downsample)
    ref = hle_panoptic_decode(emb, sigmas.reshape(h, w), seed, probs, **kw)
    monkeypatch.setattr(
        hle_decoding,
        "greedy_seed_clustering",
        lambda *a, **k: hle_greedy_seed_clustering(*a, impl="ext", **k),
    )
    monkeypatch.setattr(
        hle_decoding,
        "assign_pixels_to_seeds",
        lambda *a, **k: hle_assign_pixels_to_seeds(*a, impl="ext", **k),
    )
    out = hle_panoptic_decode(emb, sigmas.reshape(h, w), seed, probs, **kw)
    assert torch.equal(out["panoptic_seg"], ref["panoptic_seg"])
    assert out["segments_info"] == ref["segments_info"]
    assert sum(s["isthing"] for s in ref["segments_info"]) >= 2


@needs_op
def test_half_precision_runs_in_float32():
    emb, pos, sigmas, mask, cand = _scene(11, 13, 4, 3, torch.float32, seed=2)
    kw = dict(spatial_sigma=0.5, mask_threshold=0.5, merge_threshold=0.5, max_instances=9)
    half = (_flat(emb).half(), pos.half(), sigmas.half())
    out = hle_greedy_seed_clustering(cand, half[0], half[1], half[2], mask, impl="ext", **kw)
    ref = hle_greedy_seed_clustering(
        cand, half[0].float(), half[1].float(), half[2].float(), mask, impl="ext", **kw
    )
    assert out[2].dtype == torch.float16
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


@needs_op
def test_errors_name_the_argument_and_shapes():
    emb, pos, sigmas, mask, cand = _scene(5, 7, 3, 2, torch.float32)
    flat = _flat(emb)
    kw = dict(spatial_sigma=0.5, mask_threshold=0.5, merge_threshold=0.5, max_instances=5)
    with pytest.raises(RuntimeError, match="positions must have shape"):
        hle_greedy_seed_clustering(cand, flat, pos[:-1], sigmas, mask, impl="ext", **kw)
    with pytest.raises(RuntimeError, match="'sigmas' must have shape"):
        hle_greedy_seed_clustering(cand, flat, pos, sigmas[:-1], mask, impl="ext", **kw)
    with pytest.raises(RuntimeError, match="candidates must be flat pixel indices"):
        hle_greedy_seed_clustering(torch.tensor([0, 35]), flat, pos, sigmas, mask, impl="ext", **kw)
    with pytest.raises(RuntimeError, match="seed_embeddings must have shape"):
        hle_assign_pixels_to_seeds(
            flat[:2, :2],
            pos[:2],
            sigmas[:2],
            flat,
            pos,
            mask,
            spatial_sigma=0.5,
            mask_threshold=0.5,
            impl="ext",
        )
    with pytest.raises(RuntimeError, match="must be float32 or float64"):
        torch.ops.seg_methods.hle_seed_clustering(
            cand, flat.long(), pos.long(), sigmas.long(), mask, 0.5, 0.5, 0.5, 5
        )
    with pytest.raises(ValueError, match="impl must be one of"):
        hle_greedy_seed_clustering(cand, flat, pos, sigmas, mask, impl="cuda", **kw)


def test_fallback_without_the_op(monkeypatch):
    """impl='auto' runs the reference when the op is not built; impl='ext' then raises."""
    monkeypatch.setattr(hd_module, "has_op", lambda name: False)
    emb, pos, sigmas, mask, cand = _scene(9, 10, 4, 3, torch.float32, seed=4)
    kw = dict(spatial_sigma=0.5, mask_threshold=0.5, merge_threshold=0.5, max_instances=5)
    ref = greedy_seed_clustering(cand, _flat(emb), pos, sigmas, mask, **kw)
    out = hle_greedy_seed_clustering(cand, _flat(emb), pos, sigmas, mask, impl="auto", **kw)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="impl='ext' needs the compiled ops"):
        hle_greedy_seed_clustering(cand, _flat(emb), pos, sigmas, mask, impl="ext", **kw)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu_reference(dtype):
    emb, pos, sigmas, mask, cand = _scene(37, 53, 12, 9, dtype, seed=7)
    kw = dict(spatial_sigma=0.5, mask_threshold=0.5, merge_threshold=0.5, max_instances=200)
    ref = greedy_seed_clustering(cand, _flat(emb), pos, sigmas, mask, **kw)
    cu = [t.cuda() for t in (cand, _flat(emb), pos, sigmas, mask)]
    out = hle_greedy_seed_clustering(*cu, impl="ext", **kw)
    _assert_clustering_equal([t.cpu() for t in out], ref, dtype)
    flat, seeds = _flat(emb), ref[1]
    args = (flat[seeds], pos[seeds], sigmas[seeds], flat, pos, mask)
    labels = hle_assign_pixels_to_seeds(
        *[t.cuda() for t in args], spatial_sigma=0.5, mask_threshold=0.5, impl="ext"
    )
    assert torch.equal(
        labels.cpu(), assign_pixels_to_seeds(*args, spatial_sigma=0.5, mask_threshold=0.5)
    )
    i = int(seeds[0])
    row = hle_seed_kernel_row(*[t.cuda() for t in (flat[i], pos[i], sigmas[i], flat, pos)], 0.5)
    torch.testing.assert_close(
        row.cpu(), seed_kernel_row(flat[i], pos[i], sigmas[i], flat, pos, 0.5), **_tol(dtype)
    )
