"""CRM (continuous refinement): implicit decoder, cascade, losses, input checks.

Tiny CPU cases. The parity with the official code is in test_crm_official_parity.py and the
end-to-end path (training, DefaultPredictor, checkpoints, export) in test_model_e2e.py -k crm.
"""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import seg_methods  # noqa: F401  registers CRM
from seg_methods.config import get_cfg
from seg_methods.modeling.criterion.crm import crm_losses, sobel_magnitude
from seg_methods.modeling.refinement.crm import (
    ImplicitDecoder,
    cascade_refine,
    ensemble_weights,
    make_coord,
    query_chunked,
    query_grid,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = os.path.join(REPO, "configs/quick_schedules/crm_synthetic_refinement_instant_test.yaml")


TORCH_THREADS = 1  # one intra-op thread for this module (tests/conftest.py)


def _decoder(seed=0, channels=6, **kwargs):
    torch.manual_seed(seed)
    dec = ImplicitDecoder(channels, [16, 16], **kwargs)
    with torch.no_grad():
        for p in dec.parameters():
            p.normal_(0.0, 0.5)
    return dec


def _latent_feat(seed=1, channels=6, h=5, w=7):
    return torch.randn(1, channels, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_crm():
    cfg = get_cfg()
    cfg.merge_from_file(QUICK)
    cfg.MODEL.CRM.BASE_CONFIG = ""
    cfg.MODEL.CRM.TEST_PAD = 4
    torch.manual_seed(0)
    return build_model(cfg)


# ------------------------------------------------------------------ coordinates / continuity
def test_make_coord_is_pixel_centres_row_col():
    c = make_coord((2, 4))
    assert c.shape == (2, 4, 2)
    assert torch.allclose(c[:, 0, 0], torch.tensor([-0.5, 0.5]))  # rows
    assert torch.allclose(c[0, :, 1], torch.tensor([-0.75, -0.25, 0.25, 0.75]))  # columns


def test_query_grid_output_size_and_padding():
    # output == input: the padded input's own pixel centres; padding kept in the output frame
    coord, cell, pads = query_grid((6, 4), None, pad=2)
    assert pads == (2, 2) and coord.shape == (10 * 8, 2)
    assert torch.equal(coord, make_coord((10, 8), flatten=True))
    assert torch.allclose(cell, torch.tensor([[2 / 10, 2 / 8]]).expand_as(cell))
    # 3x the output size: its centres 3i+1 are the input's centres i (unpadded region)
    fine, fine_cell, fine_pads = query_grid((6, 4), (18, 12), pad=2)
    assert fine_pads == (6, 6)
    fine = fine.view(18 + 12, 12 + 12, 2)[6:-6, 6:-6]
    coarse = coord.view(10, 8, 2)[2:-2, 2:-2]
    assert torch.allclose(fine[1::3, 1::3], coarse, atol=1e-6)
    assert torch.allclose(fine_cell[0] * 3, cell[0], atol=1e-7)


def test_one_point_queried_at_two_output_scales_gives_one_value():
    """The same continuous point queried through an N-pixel grid and a 3N-pixel grid."""
    feat = _latent_feat()
    for cell_decode in (False, True):
        dec = _decoder(cell_decode=cell_decode).eval()
        coarse, c_cell, _ = query_grid((4, 6), None)
        fine, f_cell, _ = query_grid((4, 6), (12, 18))
        with torch.no_grad():
            a = dec(feat, coarse[None], c_cell[None]).view(4, 6)
            f_cell_same = c_cell[:1].expand_as(f_cell)  # the coarse grid's cell at every point
            b = dec(feat, fine[None], (f_cell if not cell_decode else f_cell_same)[None])
        b = b.view(12, 18)[1::3, 1::3]
        assert torch.allclose(a, b, atol=1e-6), (cell_decode, (a - b).abs().max())
    # with the cell in the MLP input, each grid's own (smaller) cell is a different query
    dec = _decoder(cell_decode=True).eval()
    with torch.no_grad():
        b_own = dec(feat, fine[None], f_cell[None]).view(12, 18)[1::3, 1::3]
    assert not torch.allclose(a, b_own, atol=1e-4)


def test_small_coordinate_changes_give_small_output_changes():
    """Along a line crossing latent-cell borders and centres the ensemble output is continuous;
    the single nearest code (no ensemble) jumps at every border."""
    feat = _latent_feat(h=4, w=4)
    n = 4001
    rows = torch.linspace(-0.9, 0.9, n)
    coord = torch.stack([rows, torch.full_like(rows, 0.13)], -1)[None]
    cell = torch.full_like(coord, 0.05)
    steps = {}
    for ensemble in (True, False):
        dec = _decoder(seed=3, local_ensemble=ensemble, cell_decode=False).eval()
        with torch.no_grad():
            out = dec(feat, coord, cell)[0]
        steps[ensemble] = (out[1:] - out[:-1]).abs()
    step = 1.8 / (n - 1)
    # continuous: the largest change between neighbouring points is of the order of the typical
    # (smooth) change, and vanishes with the step
    assert steps[True].max() < 10 * steps[True].median() + 1e-6
    assert steps[True].max() < 50 * step
    # the nearest-code decoder has O(1) jumps at the latent borders
    assert steps[False].max() > 20 * steps[True].max()


# ------------------------------------------------------------------ local ensemble
def test_ensemble_weights_are_opposite_areas_and_sum_to_one():
    a, b = 0.25, 0.5  # query inside the square of the codes (0,0), (0,1), (1,0), (1,1)
    rel = [
        torch.tensor([a, b]),  # to code (0,0): neighbour (-1,-1)
        torch.tensor([a, b - 1]),  # (0,1): (-1, 1)
        torch.tensor([a - 1, b]),  # (1,0): (1, -1)
        torch.tensor([a - 1, b - 1]),  # (1,1): (1, 1)
    ]
    w = torch.stack(ensemble_weights(rel))
    expected = torch.tensor([(1 - a) * (1 - b), (1 - a) * b, a * (1 - b), a * b])
    assert torch.allclose(w, expected, atol=1e-8)
    assert torch.isclose(w.sum(), torch.tensor(1.0))
    # on a centre the +1e-9 keeps the weights defined
    w0 = torch.stack(ensemble_weights([torch.zeros(2)] * 4))
    assert torch.isfinite(w0).all() and torch.isclose(w0.sum(), torch.tensor(1.0))


def test_decoder_with_identity_mlp_is_bilinear_interpolation():
    """MLP(z) = z (one hidden unit, identity on z >= 0): the ensemble blends the 4 nearest codes
    with bilinear weights, so it equals grid_sample(bilinear, align_corners=False) inside the
    map; this checks the (row, col) flip and the neighbour/weight pairing."""
    dec = ImplicitDecoder(1, [1], abs_coord=True, cell_decode=True).eval()
    with torch.no_grad():
        for p in dec.parameters():
            p.zero_()
        dec.mlp.layers[0].weight[0, 0] = 1.0
        dec.mlp.layers[2].weight[0, 0] = 1.0
    h, w = 4, 6
    z = (torch.arange(h)[:, None] * 10.0 + torch.arange(w)[None] + 1).view(1, 1, h, w)
    g = torch.Generator().manual_seed(0)
    coord = (torch.rand(1, 200, 2, generator=g) * 2 - 1) * torch.tensor([(h - 1) / h, (w - 1) / w])
    with torch.no_grad():
        out = dec(z, coord, torch.zeros_like(coord))[0]
    ref = F.grid_sample(z, coord.flip(-1)[:, None], mode="bilinear", align_corners=False)[0, 0, 0]
    assert torch.allclose(out, ref, atol=1e-3), (out - ref).abs().max()


# ------------------------------------------------------------------ chunking / cascade
def test_chunked_querying_equals_unchunked():
    dec = _decoder().eval()

    class _Net:
        def query(self, latent, coord, cell):
            return dec.query(latent, coord, cell)

    latent = dec.prepare(_latent_feat())
    coord, cell, _ = query_grid((13, 11), (13, 11))
    rows, cols = coord.view(13, 11, 2)[:, 0, 0], coord.view(13, 11, 2)[0, :, 1]
    with torch.no_grad():
        whole = query_chunked(_Net(), latent, rows, cols, (2 / 13, 2 / 11), 0)
        direct = dec.query(latent, coord[None], cell[None]).view(13, 11)
        for chunk in (1, 7, 50, 143, 1000):
            part = query_chunked(_Net(), latent, rows, cols, (2 / 13, 2 / 11), chunk)
            assert (part - whole).abs().max() <= 1e-6, chunk
    assert (whole - direct).abs().max() <= 1e-6


def test_cascade_chunked_equals_unchunked_and_encodes_once_per_scale(tiny_crm):
    model = tiny_crm.eval()
    calls = {"encode": 0, "query": 0}

    class _Counting:
        def encode(self, im, seg):
            calls["encode"] += 1
            return model.encode(im, seg)

        def query(self, latent, coord, cell):
            calls["query"] += 1
            return model.query(latent, coord, cell)

    image = torch.randn(1, 3, 21, 17)
    seg = (torch.rand(1, 1, 21, 17) > 0.5).float() * 2 - 1
    with torch.no_grad():
        whole = cascade_refine(_Counting(), image, seg, chunk=0, pad=4)
        assert calls == {"encode": 4, "query": 4}
        calls.update(encode=0, query=0)
        part = cascade_refine(_Counting(), image, seg, chunk=37, pad=4)
    n = (21 + 8) * (17 + 8)
    assert calls == {"encode": 4, "query": 4 * math.ceil(n / 37)}
    assert whole.shape == (21, 17)
    assert (part - whole).abs().max() <= 1e-6


class _RecordingNet:
    """encode records the coarse mask it gets; the logits are a fixed function of the point."""

    def __init__(self):
        self.segs = []

    def encode(self, image, seg):
        self.segs.append(seg.clone())
        return image.new_zeros(1, 1, 2, 2)

    def query(self, latent, coord, cell):
        return 4 * coord[..., 0] - 3 * coord[..., 1] + 0.3


def test_cascade_feeds_prob_minus_half_times_two():
    net = _RecordingNet()
    H, W = 16, 12
    seg = (torch.rand(1, 1, H, W, generator=torch.Generator().manual_seed(0)) > 0.3) * 2.0 - 1
    scales = (0.25, 0.5, 1.0)
    out = cascade_refine(net, torch.zeros(1, 3, H, W), seg, scales=scales, chunk=50, pad=0)
    coord = make_coord((H, W))
    prob = torch.sigmoid(4 * coord[..., 0] - 3 * coord[..., 1] + 0.3)
    assert torch.allclose(out, prob, atol=1e-6)
    assert len(net.segs) == 3
    first = F.interpolate(seg, size=(4, 3), mode="bilinear", align_corners=True)
    assert torch.allclose(net.segs[0], first)
    for k, s in enumerate(scales[1:], start=1):
        size = (round(H * s), round(W * s))
        fed = F.interpolate(
            ((prob - 0.5) * 2)[None, None], size, mode="bilinear", align_corners=True
        )
        assert torch.allclose(net.segs[k], fed, atol=1e-6), k
        assert not torch.allclose(net.segs[k], (fed > 0).float() * 2 - 1)  # not thresholded


def test_cascade_suppresses_empty_coarse_masks():
    empty = -torch.ones(1, 1, 10, 10)
    out = cascade_refine(_RecordingNet(), torch.zeros(1, 3, 10, 10), empty, pad=2)
    assert torch.equal(out, torch.zeros(10, 10))
    kept = cascade_refine(
        _RecordingNet(), torch.zeros(1, 3, 10, 10), empty, pad=2, suppress_empty=False
    )
    assert kept.max() > 0.5


# ------------------------------------------------------------------ losses
def _sobel_reference(x, eps):
    """Independent loop implementation of the official SobelOperator on an (H, W) array."""
    h, w = x.shape
    p = np.pad(x, 1)
    blur = np.array([[p[i : i + 3, j : j + 3].sum() / 9 for j in range(w)] for i in range(h)])
    kx = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]]) / 4
    ky = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]]) / 4
    q = np.pad(blur, 1)
    gx = np.array([[(q[i : i + 3, j : j + 3] * kx).sum() for j in range(w)] for i in range(h)])
    gy = np.array([[(q[i : i + 3, j : j + 3] * ky).sum() for j in range(w)] for i in range(h)])
    return np.sqrt(gx**2 + gy**2 + eps)


def test_sobel_magnitude_matches_the_official_operator():
    x = np.zeros((5, 6))
    x[:, 3:] = 1.0  # a vertical edge
    x[0, 0] = 0.5
    ours = sobel_magnitude(torch.tensor(x, dtype=torch.float32)[None, None], 1e-4)[0, 0]
    assert np.allclose(ours.numpy(), _sobel_reference(x, 1e-4), atol=1e-6)
    assert ours[2, 3] > 0.5 and ours[2, 0] < 0.05  # large on the edge, ~0 inside


def test_loss_terms_on_a_hand_built_case():
    # 1x1 images: p = 0.5, g = 0 -> L1 0.5, L2 0.25, Sobel magnitude sqrt(eps) on both (gradient 0)
    logits, gt = torch.zeros(1, 1, 1), torch.zeros(1, 1, 1)
    losses = crm_losses(logits, gt, [(1, 1)])
    assert set(losses) == {"loss_l1", "loss_l2", "loss_grad"}
    assert torch.isclose(losses["loss_l1"], torch.tensor(0.5))
    assert torch.isclose(losses["loss_l2"], torch.tensor(0.25))
    assert losses["loss_grad"].abs() < 1e-7
    # a perfect prediction of an edge has zero loss; the gradient term is weighted 5 (official)
    g = torch.zeros(1, 6, 6)
    g[:, :, 3:] = 1
    perfect = crm_losses(torch.where(g > 0, 30.0, -30.0), g, [(6, 6)])
    assert all(v < 1e-6 for v in perfect.values())
    flat = torch.zeros(1, 6, 6)
    one = crm_losses(flat, g, [(6, 6)], grad_weight=1.0)
    five = crm_losses(flat, g, [(6, 6)])
    assert one["loss_grad"] > 0.01
    assert torch.isclose(five["loss_grad"], 5 * one["loss_grad"])
    ref = np.abs(
        _sobel_reference(np.full((6, 6), 0.5), 1e-4) - _sobel_reference(g[0].numpy(), 1e-4)
    )
    assert math.isclose(float(one["loss_grad"]), ref.mean(), rel_tol=1e-5)
    # BCE only when its weight (official 0) is set
    assert "loss_ce" in crm_losses(flat, g, [(6, 6)], ce_weight=1.0)


def test_losses_ignore_the_batch_padding():
    g = torch.zeros(2, 6, 8)
    g[0, :, 4:] = 1
    g[1, :3, :3] = 1
    logits = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(0))
    sizes = [(6, 8), (4, 5)]
    base = crm_losses(logits, g, sizes)
    poked = logits.clone()
    poked[1, 4:, :] = 100.0
    poked[1, :, 5:] = -100.0
    g2 = g.clone()
    g2[1, 5, 7] = 1.0
    again = crm_losses(poked, g2, sizes)
    for k in base:
        assert torch.equal(base[k], again[k]), k


def test_all_empty_masks_give_finite_losses_and_gradients(tiny_crm):
    model = tiny_crm.train()
    model.zero_grad()
    batch = [
        {
            "image": torch.randint(0, 256, (3, 24, 20), dtype=torch.uint8),
            "coarse_mask": torch.zeros(24, 20),
            "gt_mask": torch.zeros(24, 20, dtype=torch.bool),
        },
        {
            "image": torch.randint(0, 256, (3, 18, 26), dtype=torch.uint8),
            "coarse_mask": torch.zeros(18, 26),
            "gt_mask": torch.zeros(18, 26, dtype=torch.bool),
        },
    ]
    with EventStorage():
        losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.eval()


# ------------------------------------------------------------------ input contract
def test_coarse_mask_size_mismatch_is_a_clear_error(tiny_crm):
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    bad = {"image": image, "coarse_mask": torch.zeros(20, 31), "file_name": "scene_7.png"}
    with torch.no_grad(), pytest.raises(ValueError) as e:
        tiny_crm.eval()([bad])
    msg = str(e.value)
    assert "coarse_mask" in msg and "(20, 31)" in msg and "(20, 30)" in msg
    assert "scene_7.png" in msg
    tiny_crm.train()
    with pytest.raises(ValueError, match="coarse_mask"):
        tiny_crm([dict(bad, gt_mask=torch.zeros(20, 30, dtype=torch.bool))])
    tiny_crm.eval()


def test_image_only_input_without_base_model_names_the_config_key(tiny_crm):
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    with torch.no_grad(), pytest.raises(ValueError) as e:
        tiny_crm.eval()([{"image": image}])
    assert "MODEL.CRM.BASE_CONFIG" in str(e.value) and "coarse_mask" in str(e.value)


def test_inference_outputs_at_the_requested_size(tiny_crm):
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    mask = torch.zeros(20, 30)
    mask[5:15, 8:20] = 1
    with torch.no_grad():
        (out,) = tiny_crm.eval()([{"image": image, "coarse_mask": mask, "height": 41, "width": 59}])
        direct = tiny_crm.refine(image, mask, (41, 59))
    assert out["refined_mask"].shape == (41, 59) and out["sem_seg"].shape == (2, 41, 59)
    assert torch.equal(out["sem_seg"][1], out["refined_mask"])
    assert torch.allclose(out["sem_seg"].sum(0), torch.ones(41, 59))
    assert torch.equal(direct, out["refined_mask"])
    assert ((out["refined_mask"] >= 0) & (out["refined_mask"] <= 1)).all()


class _FixedBase(torch.nn.Module):
    """A stand-in base model returning fixed class probabilities."""

    def __init__(self, probs):
        super().__init__()
        self.probs = probs

    def forward(self, batched_inputs):
        return [{"sem_seg": self.probs}]


def test_semantic_refinement_follows_the_cascadepsp_combination(tiny_crm):
    """Scores are max(refined p_c, 0.5 [base label == c]); an absent class stays 0."""
    H, W = 12, 16
    probs = torch.zeros(3, H, W)
    probs[0] = 0.7
    probs[1, :, 8:] = 0.9  # class 1 on the right half, class 0 elsewhere, class 2 absent
    tiny_crm.base_model = _FixedBase(probs)
    try:
        image = torch.randint(0, 256, (3, H, W), dtype=torch.uint8)
        with torch.no_grad():
            scores = tiny_crm.eval().refine_semantic(image)
            refined = [tiny_crm.refine(image, (probs.argmax(0) == c).float()) for c in range(2)]
    finally:
        tiny_crm.base_model = None
    labels = probs.argmax(0)
    assert scores.shape == (3, H, W)
    for c in range(2):
        assert torch.equal(scores[c], torch.maximum(refined[c], 0.5 * (labels == c).float()))
    assert torch.equal(scores[2], torch.zeros(H, W))


def test_base_weights_are_loaded_frozen_and_kept_out_of_crm_checkpoints(tmp_path):
    from seg_methods.utils.checkpoint import SegCheckpointer

    base_cfg_file = (
        "configs/quick_schedules/per_pixel_deeplabv3plus_synthetic_semantic_instant_test.yaml"
    )
    base_cfg = get_cfg()
    base_cfg.merge_from_file(os.path.join(REPO, base_cfg_file))
    base_cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(5)
    base = build_model(base_cfg)
    base_path = str(tmp_path / "base.pth")
    torch.save({"model": base.state_dict()}, base_path)

    cfg = get_cfg()
    cfg.merge_from_file(QUICK)
    cfg.MODEL.CRM.BASE_CONFIG = base_cfg_file  # relative to the repository root
    cfg.MODEL.CRM.BASE_WEIGHTS = base_path
    crm = build_model(cfg).train()
    assert not crm.base_model.training
    assert not any(k.startswith("base_model.") for k in crm.state_dict())
    for k, v in base.state_dict().items():
        assert torch.equal(crm.base_model.state_dict()[k], v), k
    assert not any(p.requires_grad for p in crm.base_model.parameters())
    # a CRM checkpoint (CRM's own weights only) loads strictly into a model with a base
    SegCheckpointer(crm, str(tmp_path)).save("crm")
    fresh = build_model(cfg)
    SegCheckpointer(fresh, strict=True).load(str(tmp_path / "crm.pth"))
    image = torch.randint(0, 256, (3, 24, 20), dtype=torch.uint8)
    with torch.no_grad():
        a, b = crm.eval()([{"image": image}])[0], fresh.eval()([{"image": image}])[0]
    assert a["sem_seg"].shape == (8, 24, 20) and torch.equal(a["sem_seg"], b["sem_seg"])
    with pytest.raises(ValueError, match="MODEL.CRM.BASE_CONFIG"):
        cfg.MODEL.CRM.BASE_CONFIG = ""
        build_model(cfg)


def test_tiled_fusion_equals_whole_map(tiny_crm):
    model = tiny_crm.eval()
    image = torch.randn(1, 3, 70, 45, generator=torch.Generator().manual_seed(3))
    seg = torch.rand(1, 1, 70, 45, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        model.fusion_tile_rows = 0
        whole = model.encode(image, seg)
        for rows in (1, 4, 7, 34):  # the latent map has 35 rows
            model.fusion_tile_rows = rows
            tiled = model.encode(image, seg)
            assert tiled.shape == whole.shape
            assert (tiled - whole).abs().max() <= 1e-5 * (1 + whole.abs().max()), rows
        model.fusion_tile_rows = 0
        refined = model.refine(image[0].mul(50).add(120).clamp(0, 255), (seg[0, 0] > 0).float())
        model.fusion_tile_rows = 5
        refined_tiled = model.refine(
            image[0].mul(50).add(120).clamp(0, 255), (seg[0, 0] > 0).float()
        )
    assert (refined - refined_tiled).abs().max() <= 1e-4
    model.fusion_tile_rows = 512
    with pytest.raises(RuntimeError, match="eval mode"):
        model.train().fusion.forward_tiled([torch.zeros(1, 64, 4, 4)] * 3, 2, torch.nn.Identity())
    model.eval()


def test_module_runs_with_its_torch_threads():
    # TORCH_THREADS above, applied by tests/conftest.py's module fixture
    assert torch.get_num_threads() == TORCH_THREADS
