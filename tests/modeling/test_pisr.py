"""PISR (seg_methods/layers/pisr.py, seg_methods/modeling/meta_arch/pisr.py) on hand-built cases:
Panoptic Relational Attention, the panoptic encodings and their reweighting, top-K selection,
the Table 5 variants, Panoptic-DeepLab's centre / offset targets and the base-model check."""

import math
import os

import pytest
import torch
from detectron2.modeling import build_model

import seg_methods  # noqa: F401  registers the meta-architectures
from seg_methods.config import get_cfg
from seg_methods.layers.pisr import (
    PISR_VARIANTS,
    PanopticRelationalAttention,
    PISRModule,
    gather_rows,
    select_top_k,
)
from seg_methods.modeling.meta_arch.pisr import center_offset_targets

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK_M2F = os.path.join(
    REPO, "configs", "quick_schedules", "pisr_mask2former_synthetic_panoptic_instant_test.yaml"
)


def _identity_pra(dim):
    """PRA whose q, k, v and output projections are identities (hand-computable)."""
    pra = PanopticRelationalAttention(dim, dim, dim)
    with torch.no_grad():
        for lin in (pra.q, pra.k, pra.v, pra.out):
            lin.weight.copy_(torch.eye(dim))
            lin.bias.zero_()
    return pra


def test_pra_hand_built_attention():
    pra = _identity_pra(2)
    query = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # (1, 2, 2)
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])  # (1, 3, 2)
    valid = torch.tensor([[True, True, False]])
    ctx, attn = pra(query, keys, valid)
    s = 1 / math.sqrt(2)
    # query 0: logits (1, 0) * s over the two valid keys; query 1: (0, 2) * s
    e0 = torch.softmax(torch.tensor([s, 0.0]), 0)
    e1 = torch.softmax(torch.tensor([0.0, 2 * s]), 0)
    expected = torch.tensor([[[e0[0], e0[1], 0.0], [e1[0], e1[1], 0.0]]])
    torch.testing.assert_close(attn, expected)
    torch.testing.assert_close(attn.sum(-1), torch.ones(1, 2))
    torch.testing.assert_close(ctx, torch.einsum("bml,bld->bmd", expected, keys))
    # the masked key (5, 5) would dominate without the mask
    _, unmasked = pra(query, keys)
    assert unmasked[0, :, 2].min() > 0.5


def test_pra_no_valid_key_gives_zero_context():
    pra = _identity_pra(2)
    ctx, attn = pra(torch.ones(1, 3, 2), torch.ones(1, 2, 2), torch.zeros(1, 2, dtype=torch.bool))
    assert torch.equal(attn, torch.zeros(1, 3, 2))
    assert torch.isfinite(ctx).all()


def test_select_top_k_order_padding_and_exclusion():
    scores = torch.tensor([[0.1, 0.9, 0.5, float("-inf")], [0.3, 0.2, 0.8, 0.4]])
    idx, valid = select_top_k(scores, 3)
    assert idx.tolist() == [[1, 2, 0], [2, 3, 0]]
    assert valid.all()
    idx, valid = select_top_k(scores, 5)  # more than the candidates: padded, invalid
    assert valid.tolist() == [[True, True, True, False, False], [True] * 4 + [False]]
    assert idx[0, :3].tolist() == [1, 2, 0] and (idx[~valid] == 0).all()
    idx, valid = select_top_k(torch.zeros(2, 0), 2)  # no candidate at all
    assert not valid.any() and idx.shape == (2, 2)
    x = torch.arange(12.0).view(2, 3, 2)
    assert gather_rows(x, torch.tensor([[2, 0], [1, 1]])).tolist() == [
        [[4.0, 5.0], [0.0, 1.0]],
        [[8.0, 9.0], [8.0, 9.0]],
    ]


def _inputs(b=2, c=6, k=3, n=5, ci=4, h=4, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, c, h, w, generator=g),
        torch.randn(b, k, h, w, generator=g),
        torch.randn(b, n, ci, generator=g),
        torch.randn(b, n, generator=g),
        torch.rand(b, n, h, w, generator=g),
    )


def test_semantic_encodings_are_softmax_pooled_pixels():
    torch.manual_seed(0)
    m = PISRModule(6, 3, 4, channels=8, top_k=2)
    pixel, sem, *_ = _inputs()
    emb = m.pixel_proj(pixel)
    s = m.semantic_encodings(emb, sem)
    w = sem.flatten(2).softmax(-1)
    torch.testing.assert_close(s[1, 2], (w[1, 2][:, None] * emb[1].flatten(1).T).sum(0))


def test_reweighting_changes_only_instance_encodings():
    torch.manual_seed(0)
    m = PISRModule(6, 3, 4, channels=8, top_k=2, variant="pisr")
    with torch.no_grad():  # an importance far from 1 for every instance
        m.importance[-1].bias.fill_(-1.0)
    pixel, sem, inst, scores, _ = _inputs()
    emb = m.pixel_proj(pixel)
    on = m.panoptic_encodings(emb, sem, inst, scores, reweight=True)
    off = m.panoptic_encodings(emb, sem, inst, scores, reweight=False)
    k = 3
    assert torch.equal(on["encodings"][:, :k], off["encodings"][:, :k])  # semantic rows
    assert not torch.allclose(on["encodings"][:, k:], off["encodings"][:, k:])  # instance rows
    w = on["weights"]
    assert ((w > 0) & (w < 1)).all() and torch.equal(off["weights"], torch.ones_like(w))
    torch.testing.assert_close(on["encodings"][:, k:], off["encodings"][:, k:] * w[..., None])
    # the instance rows are the top-2 candidates by score, in score order
    assert on["indices"].tolist() == scores.topk(2, dim=1).indices.tolist()


def test_pisr_attention_rows_sum_to_one_and_padding_is_ignored():
    torch.manual_seed(0)
    m = PISRModule(6, 3, 4, channels=8, top_k=4, variant="pisr")
    pixel, sem, inst, scores, _ = _inputs(n=5)
    scores[0, 1:] = float("-inf")  # image 0 has one instance: 3 padded slots
    out = m(pixel, sem, inst, scores)
    a1, a2 = out["attn_stage1"], out["attn_stage2"]
    assert a1.shape == (2, 7, 7) and a2.shape == (2, 20, 7)
    torch.testing.assert_close(a1.sum(-1), torch.ones(2, 7))
    torch.testing.assert_close(a2.sum(-1), torch.ones(2, 20))
    assert out["valid"][0].tolist() == [True] * 4 + [False] * 3
    assert (a1[0, :, 4:] == 0).all() and (a2[0, :, 4:] == 0).all()
    # changing a padded candidate's features changes nothing
    inst2 = inst.clone()
    inst2[0, 3] += 10.0
    torch.testing.assert_close(m(pixel, sem, inst2, scores)["features"], out["features"])


def test_fuse_starts_at_identity_and_learns():
    torch.manual_seed(0)
    m = PISRModule(6, 3, 4, channels=8, top_k=2)
    pixel, sem, inst, scores, _ = _inputs()
    out = m(pixel, sem, inst, scores)
    assert torch.equal(out["features"], pixel)  # zero-initialised fuse: the base features
    out["features"].sum().backward()
    assert m.fuse.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", PISR_VARIANTS)
def test_every_table5_variant(variant):
    torch.manual_seed(0)
    m = PISRModule(6, 3, 4, channels=8, top_k=2, variant=variant)
    with torch.no_grad():
        m.fuse.weight.normal_()
    pixel, sem, inst, scores, maps = _inputs()
    out = m(pixel, sem, inst, scores, maps)
    assert out["features"].shape == pixel.shape and out["context"].shape == (2, 8, 4, 5)
    out["features"].sum().backward()
    uses_instances = variant != "ocr"
    pixel2 = _inputs(seed=1)
    changed = m(pixel, sem, pixel2[2], pixel2[3], pixel2[4])["features"]
    assert (not torch.allclose(changed, out["features"])) == uses_instances, variant
    assert hasattr(m, "importance") == (variant == "pisr")


def test_bad_variant_and_missing_instances_fail():
    with pytest.raises(ValueError, match="MODEL.PISR.VARIANT"):
        PISRModule(6, 3, 4, variant="sum")
    m = PISRModule(6, 3, 4, channels=8, top_k=2)
    with pytest.raises(ValueError, match="instance features"):
        m(*_inputs()[:2])


def test_center_offset_targets_hand_built():
    ids = torch.full((5, 6), 0, dtype=torch.int64)
    ids[1:3, 1:3] = 1  # a 2x2 instance, centre (1.5, 1.5)
    ids[4, 5] = -1  # void
    t = center_offset_targets(
        ids, torch.tensor([[1.5, 1.5]]), sigma=1.0, small_area=10, small_weight=3.0
    )
    assert t["center"][1, 1] == pytest.approx(math.exp(-0.25))
    assert t["offset"][:, 1, 1].tolist() == [0.5, 0.5]
    assert t["offset"][:, 2, 2].tolist() == [-0.5, -0.5]
    assert t["offset"][:, 0, 0].tolist() == [0.0, 0.0]  # stuff
    assert t["offset_weights"].sum() == 4 and t["center_weights"][0, 4, 5] == 0
    # detectron2's layout: weights (1, H, W), so that they broadcast per image in its losses
    assert t["center_weights"].shape == t["offset_weights"].shape == (1, 5, 6)
    assert t["center"].shape == t["sem_seg_weights"].shape == (5, 6)
    assert t["offset"].shape == (2, 5, 6)
    assert t["sem_seg_weights"][1, 1] == 3.0 and t["sem_seg_weights"][0, 0] == 1.0


@pytest.mark.parametrize("base", ["PerPixelSemantic", "SemanticSegmentor"])
def test_base_without_instance_features_is_refused(base):
    cfg = get_cfg()
    cfg.merge_from_file(QUICK_M2F)
    cfg.MODEL.PISR.BASE = base
    with pytest.raises(ValueError, match=r"MODEL\.PISR\.BASE.*instance features"):
        build_model(cfg)


def test_enabled_switch_adds_only_pisr_parameters():
    cfg = get_cfg()
    cfg.merge_from_file(QUICK_M2F)
    cfg.MODEL.DEVICE = "cpu"
    on = set(build_model(cfg).state_dict())
    cfg.MODEL.PISR.ENABLED = False
    off = set(build_model(cfg).state_dict())
    assert off < on and all(k.startswith("pisr.") for k in on - off)


def _fpn_model():
    cfg = get_cfg()
    cfg.merge_from_file(QUICK_M2F.replace("pisr_mask2former", "pisr_panoptic_fpn"))
    cfg.MODEL.DEVICE = "cpu"
    return build_model(cfg).eval()


def test_panoptic_fpn_merge_stuff_only_and_overlap():
    from detectron2.structures import Instances

    model = _fpn_model()  # things 0-3, stuff 4-7; stuff area limit 64, overlap 0.5, score 0.5
    assert model.thing_ids == [0, 1, 2, 3] and model.stuff_ids == [4, 5, 6, 7]
    sem = torch.zeros(8, 20, 20)
    sem[4, :, :10] = 1.0  # stuff 4 on the left half, stuff 5 on the right half
    sem[5, :, 10:] = 1.0
    none = Instances((20, 20))
    none.scores = torch.zeros(0)
    none.pred_classes = torch.zeros(0, dtype=torch.int64)
    none.pred_masks = torch.zeros(0, 20, 20, dtype=torch.bool)
    pan, info = model._merge(sem, none)  # zero detections: a stuff-only output
    assert [(s["category_id"], s["isthing"]) for s in info] == [(4, False), (5, False)]
    assert set(pan.unique().tolist()) == {1, 2}

    det = Instances((20, 20))
    det.scores = torch.tensor([0.9, 0.8, 0.3])
    det.pred_classes = torch.tensor([1, 2, 3])
    masks = torch.zeros(3, 20, 20, dtype=torch.bool)
    masks[0, 2:8, 2:8] = True  # 36 px
    masks[1, 4:8, 2:8] = True  # inside the first: fully overlapped -> dropped
    masks[2, 12:18, 12:18] = True  # score below 0.5 -> dropped
    det.pred_masks = masks
    pan, info = model._merge(sem, det)
    assert [(s["category_id"], s["isthing"]) for s in info] == [(1, True), (4, False), (5, False)]
    assert (pan[2:8, 2:8] == 1).all() and (pan[12:18, 12:18] == 3).all()


def test_fuse_init_switch():
    torch.manual_seed(0)
    m = PISRModule(6, 3, 4, channels=8, top_k=2, zero_init_fuse=False)
    pixel, sem, inst, scores, _ = _inputs()
    assert m.fuse.weight.abs().sum() > 0
    assert not torch.allclose(m(pixel, sem, inst, scores)["features"], pixel)


def test_panoptic_deeplab_losses_weigh_each_image_with_its_own_targets():
    """A training batch of 3 images (the quick config's batch of 2 hid a broadcast of every
    image's weights against the others'): detectron2's centre loss equals the hand-computed
    per-image weighted MSE, and the offset loss the weighted L1."""
    import torch.nn.functional as F

    from seg_methods.data.build import build_train_loader

    cfg = get_cfg()
    cfg.merge_from_file(QUICK_M2F.replace("pisr_mask2former", "pisr_panoptic_deeplab"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.SOLVER.IMS_PER_BATCH = 3
    cfg.DATALOADER.NUM_WORKERS = 0
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = next(iter(build_train_loader(cfg)))
    assert len(batch) == 3
    head = model.ins_embed_head
    seen = {}

    def spy(name):
        original = getattr(head, name)

        def wrapped(predictions, targets, weights):
            seen[name] = (predictions.detach(), targets, weights)
            return original(predictions, targets, weights)

        return wrapped

    for name in ("center_losses", "offset_losses"):
        setattr(head, name, spy(name))  # instance attributes shadow the methods
    losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    # recompute both losses image by image from the head's predictions and targets
    stride = head.common_stride
    center, center_t, center_w = seen["center_losses"]
    offset, offset_t, offset_w = seen["offset_losses"]
    center = F.interpolate(center, scale_factor=stride, mode="bilinear", align_corners=False)
    offset = F.interpolate(offset, scale_factor=stride, mode="bilinear", align_corners=False)
    offset = offset * stride
    assert center_w.shape == (3, 1) + center.shape[2:] and offset_w.shape == center_w.shape
    num = sum(((center[i] - center_t[i]) ** 2 * center_w[i]).sum() for i in range(3))
    want_center = num / center_w.sum() * head.center_loss_weight
    num = sum(((offset[i] - offset_t[i]).abs() * offset_w[i]).sum() for i in range(3))
    want_offset = num / offset_w.sum() * head.offset_loss_weight
    assert float(losses["loss_center"]) == pytest.approx(float(want_center), rel=1e-4)
    assert float(losses["loss_offset"]) == pytest.approx(float(want_offset), rel=1e-4)
