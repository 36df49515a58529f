"""Panoptic SegFormer: merging, box losses, query decoupling, query filter, encoder options,
box-reference deformable attention and the official-checkpoint key mapping, on hand-built cases.

(The model's train / eval / predictor / checkpoint / export path is covered by
tests/modeling/test_model_e2e.py with configs/quick_schedules/panoptic_segformer_*.)
"""

import os

import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

import seg_methods  # noqa: F401  registers everything
from seg_methods.config import get_cfg
from seg_methods.layers.deform_attn import MSDeformAttn
from seg_methods.modeling.box_losses import (
    box_cxcywh_to_xyxy,
    box_giou_loss,
    box_l1_loss,
    box_xyxy_to_cxcywh,
    focal_class_cost,
    pairwise_giou,
    pairwise_l1_cost,
    pairwise_vnet_dice_cost,
    vnet_dice_loss,
)
from seg_methods.modeling.criterion.panoptic_segformer import PanopticSegFormerCriterion
from seg_methods.modeling.meta_arch.panoptic_segformer import panoptic_segformer_classes
from seg_methods.modeling.postprocessing.panoptic_segformer import (
    mask_confidence,
    score_overlap_merge,
)
from repo_scripts import load_script

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = os.path.join(
    REPO, "configs/quick_schedules/panoptic_segformer_synthetic_panoptic_instant_test.yaml"
)


def _quick_cfg():
    cfg = get_cfg()
    cfg.merge_from_file(QUICK)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def _square(size, y0, y1, x0, x1, value=1.0):
    m = torch.zeros(size)
    m[y0:y1, x0:x1] = value
    return m


# ------------------------------------------------------------------ mask-wise merging
def test_mask_confidence_by_hand():
    m = torch.tensor([[[0.9, 0.7], [0.2, 0.0]]])  # two pixels above 0.5: sum 1.6, count 2
    assert torch.allclose(mask_confidence(m), torch.tensor([1.6 / 3]))
    assert mask_confidence(torch.zeros(1, 3, 3)).item() == 0.0


def test_merge_paints_in_score_order_and_applies_the_overlap_filter():
    size = (4, 10)
    a = _square(size, 0, 4, 0, 5)  # 20 px
    b = _square(size, 0, 4, 3, 10)  # 28 px, 8 of them in a: overlap 8/28 = 0.29 <= 0.4
    c = _square(size, 0, 4, 0, 4)  # 16 px, 16 in a: overlap 1.0 > 0.4 -> dropped
    masks = torch.stack([b, c, a])
    scores = torch.tensor([0.5, 0.8, 0.9])  # a first, then c (dropped), then b
    labels = torch.tensor([1, 2, 0])
    pan, info = score_overlap_merge(
        masks, scores, labels, torch.ones(3, dtype=torch.bool), thing_ids=[0, 1, 2]
    )
    assert [s["category_id"] for s in info] == [0, 1]  # a got id 1, b id 2; c dropped
    assert (pan[:, :5] == 1).all() and (pan[:, 5:] == 2).all()  # b keeps only unpainted pixels


def test_merge_thresholds_differ_for_things_and_stuff():
    size = (4, 10)
    first = _square(size, 0, 4, 0, 3)  # 12 px
    other = _square(size, 0, 4, 0, 10)  # 40 px, 12 painted: overlap 0.3
    masks = torch.stack([first, other])
    scores = torch.tensor([0.9, 0.8])
    # as a thing (0.3 <= 0.4) the second is kept; as stuff (0.3 > 0.2) it is dropped
    _, info = score_overlap_merge(
        masks, scores, torch.tensor([0, 1]), torch.tensor([True, True]), thing_ids=[0, 1]
    )
    assert len(info) == 2
    _, info = score_overlap_merge(
        masks, scores, torch.tensor([0, 1]), torch.tensor([True, False]), thing_ids=[0]
    )
    assert len(info) == 1
    # score thresholds: 0.24 < 0.25 is dropped, 0.25 kept; stuff threshold separate
    low = torch.tensor([0.24, 0.25])
    disjoint = torch.stack([_square(size, 0, 2, 0, 10), _square(size, 2, 4, 0, 10)])
    _, info = score_overlap_merge(
        disjoint, low, torch.tensor([0, 1]), torch.tensor([True, True]), thing_ids=[0, 1]
    )
    assert [s["category_id"] for s in info] == [1]
    _, info = score_overlap_merge(
        disjoint, low, torch.tensor([0, 1]), torch.tensor([False, False]), thing_ids=[],
        stuff_score_threshold=0.2,
    )  # fmt: skip
    assert len(info) == 2


def test_merge_skips_empty_masks_and_handles_no_candidate():
    size = (3, 3)
    masks = torch.stack([torch.full(size, 0.5), _square(size, 0, 3, 0, 3, 0.6)])  # 0.5 is not > 0.5
    pan, info = score_overlap_merge(
        masks, torch.tensor([0.9, 0.3]), torch.tensor([0, 1]), torch.tensor([True, False]),
        thing_ids=[0],
    )  # fmt: skip
    assert info == [{"id": 1, "isthing": False, "category_id": 1}] and (pan == 1).all()
    pan, info = score_overlap_merge(
        torch.zeros(0, *size), torch.zeros(0), torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.bool), thing_ids=[0],
    )  # fmt: skip
    assert info == [] and (pan == 0).all()


def test_zero_thing_detections_give_a_stuff_only_panoptic_output():
    cfg = _quick_cfg()
    model = build_model(cfg).eval()
    pred = model.sem_seg_head.predictor
    with torch.no_grad():
        for mask_head in (pred.thing_mask_decoder.tail, pred.stuff_mask_decoder.tail):
            mask_head.mask_fc.weight.zero_()
            mask_head.mask_fc.bias.fill_(2.0)  # every mask is 2 everywhere: confidence ~2
        pred.class_embed[-1].weight.zero_()
        pred.class_embed[-1].bias.fill_(-30.0)  # no thing scores above threshold
        pred.stuff_class_embed[-1].weight.zero_()
        pred.stuff_class_embed[-1].bias.fill_(30.0)
        (out,) = model([{"image": torch.randint(0, 255, (3, 64, 80), dtype=torch.uint8)}])
    pan, info = out["panoptic_seg"]
    assert info and not any(s["isthing"] for s in info)
    assert (pan > 0).all()  # the first stuff mask covers the image, the others overlap it


# ------------------------------------------------------------------ box losses
def test_box_conversions_and_l1():
    xyxy = torch.tensor([[0.0, 0.0, 2.0, 4.0]])
    assert torch.equal(box_xyxy_to_cxcywh(xyxy), torch.tensor([[1.0, 2.0, 2.0, 4.0]]))
    assert torch.equal(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(xyxy)), xyxy)
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]])
    tgt = torch.tensor([[0.4, 0.5, 0.2, 0.4]])
    assert torch.allclose(pairwise_l1_cost(pred, tgt), torch.tensor([[0.3], [1.1]]))
    assert torch.allclose(box_l1_loss(pred[:1], tgt, 2.0), torch.tensor(0.15))


def test_giou_by_hand():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [3.0, 0.0, 4.0, 1.0]])
    # overlapping: IoU 1/7, enclosing 9, union 7; identical: 1; disjoint: 0 - (8 - 5) / 8
    want = torch.tensor([[1 / 7 - 2 / 9, 1.0, -3 / 8]])
    assert torch.allclose(pairwise_giou(a, b), want)
    loss = box_giou_loss(a.expand(3, 4), b, num_pos=3.0)
    assert torch.allclose(loss, (1 - want).sum() / 3)
    assert box_giou_loss(torch.zeros(0, 4), torch.zeros(0, 4), 1.0).item() == 0.0


def test_focal_cost_prefers_the_confident_class_and_vnet_dice_by_hand():
    logits = torch.tensor([[4.0, -4.0], [-4.0, 4.0]])
    cost = focal_class_cost(logits, torch.tensor([0, 1]))
    assert cost[0, 0] < cost[1, 0] and cost[1, 1] < cost[0, 1]
    m = torch.tensor([[[1.0, 0.5], [0.0, 0.0]]])
    t = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    # 2 sum(m t) = 3, sum(m^2) = 1.25, sum(t^2) = 2; eps 1e-6 (loss) / 1e-3 (cost) on each sum
    want = 1 - 3.0 / (1.25 + 2.0 + 2e-6)
    assert torch.allclose(vnet_dice_loss(m, t, 2.0), torch.tensor(want / 2))
    want_cost = 1 - 3.0 / (1.25 + 2.0 + 2e-3)
    assert torch.allclose(pairwise_vnet_dice_cost(m, t), torch.tensor([[want_cost]]))


# ------------------------------------------------------------------ decoupled queries
def test_query_counts_come_from_the_metadata():
    name = "psf_test_meta_7_classes"
    meta = MetadataCatalog.get(name)
    if not hasattr(meta, "stuff_classes"):
        meta.set(
            stuff_classes=[f"c{i}" for i in range(7)],
            thing_dataset_id_to_contiguous_id={10: 1, 20: 4, 30: 5},
        )
    cfg = _quick_cfg()
    cfg.DATASETS.TRAIN = (name,)
    cfg.DATASETS.TEST = ()
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 7
    assert panoptic_segformer_classes(cfg) == (7, [1, 4, 5], [0, 2, 3, 6])
    model = build_model(cfg)
    pred = model.sem_seg_head.predictor
    assert pred.class_embed[0].out_features == 3  # one logit per thing class
    assert pred.stuff_query.weight.shape[0] == 4  # one query per stuff class
    assert pred.query_embed.weight.shape[0] == cfg.MODEL.PANOPTIC_SEGFORMER.NUM_QUERIES
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 8
    with pytest.raises(ValueError, match="NUM_CLASSES"):
        panoptic_segformer_classes(cfg)


# ------------------------------------------------------------------ query filter
def test_query_filter_takes_up_to_max_pos_queries_per_thing():
    crit = PanopticSegFormerCriterion(weight_dict={}, filter_max_pos=3)
    gt = torch.tensor([[0.2, 0.2, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])
    boxes = torch.tensor(
        [
            [0.2, 0.2, 0.2, 0.2],  # = gt 0
            [0.25, 0.2, 0.2, 0.2],  # near gt 0
            [0.9, 0.1, 0.1, 0.1],  # far from both
            [0.7, 0.7, 0.2, 0.2],  # = gt 1
            [0.7, 0.75, 0.2, 0.2],  # near gt 1
        ]
    )
    outputs = {"pred_logits": torch.zeros(1, 5, 2), "pred_boxes": boxes[None]}
    targets = [{"labels": torch.tensor([0, 1]), "boxes": gt}]
    (first,), (selected,) = crit.filter_queries(outputs, targets)
    assert first[0].tolist() == [0, 3] and first[1].tolist() == [0, 1]
    # rounds = min(3, 5 // 2) = 2: the second round takes the next-best query of each thing
    assert selected.tolist() == [0, 1, 3, 4]
    (first,), (selected,) = crit.filter_queries(
        outputs, [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    )
    assert len(first[0]) == 0 and len(selected) == 0


# ------------------------------------------------------------------ layers and encoder options
def test_deformable_attention_with_box_references():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2, impl="pytorch")
    shapes = torch.tensor([[4, 4], [2, 2]])
    start = torch.tensor([0, 16])
    value = torch.randn(1, 20, 16)
    query = torch.randn(1, 3, 16)
    centre = torch.rand(1, 3, 2, 2) * 0.6 + 0.2
    wh = torch.rand(1, 3, 2, 2) * 0.3
    # a box of size 0 samples its centre whatever the offsets: equal to a point reference with
    # zero offsets
    zero_box = attn(query, torch.cat((centre, torch.zeros_like(wh)), -1), value, shapes, start)
    with torch.no_grad():
        attn.sampling_offsets.weight.zero_()
        attn.sampling_offsets.bias.zero_()
    point = attn(query, centre, value, shapes, start)
    assert torch.allclose(zero_box, point, atol=1e-6)
    # with zero offsets any box samples its centre too
    assert torch.allclose(attn(query, torch.cat((centre, wh), -1), value, shapes, start), point)


def test_encoder_extra_level_and_no_mask_features_options():
    cfg = _quick_cfg()
    model = build_model(cfg)
    enc = model.sem_seg_head.pixel_decoder
    assert enc.mask_features is None and len(enc.extra_proj) == 1
    feats = model.backbone(torch.randn(1, 3, 64, 96))
    mask_features, _, maps = enc.forward_features(feats)
    assert mask_features is None
    assert [tuple(m.shape[-2:]) for m in maps] == [(1, 2), (2, 3), (4, 6), (8, 12)]
    # defaults (Mask2Former) are unchanged: no extra level parameters
    m2f = get_cfg()
    m2f.merge_from_file(
        os.path.join(
            REPO, "configs/quick_schedules/mask2former_synthetic_panoptic_instant_test.yaml"
        )
    )
    names = build_model(m2f).state_dict().keys()
    assert not any("extra_proj" in k for k in names) and any("mask_features" in k for k in names)


# ------------------------------------------------------------------ checkpoint conversion
def _converter():
    return load_script("tools/convert_panoptic_segformer_weights.py", "convert_psf")


def _official_names(cfg):
    """Official parameter names of the quick model, written from the official modules
    (mmdet ResNet-18, ChannelMapper, mmcv deformable transformer, PanformerHead, MaskHead)."""
    m = cfg.MODEL.PANOPTIC_SEGFORMER
    enc = cfg.MODEL.MSDEFORM_PIXEL_DECODER
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    names = ["backbone.conv1.weight"] + [f"backbone.bn1.{s}" for s in bn]
    for layer in range(1, 5):
        for block in range(2):
            p = f"backbone.layer{layer}.{block}"
            for i in (1, 2):
                names += [f"{p}.conv{i}.weight"] + [f"{p}.bn{i}.{s}" for s in bn]
            if layer > 1 and block == 0:
                names += [f"{p}.downsample.0.weight"] + [f"{p}.downsample.1.{s}" for s in bn]
    for i in range(3):
        names += [
            f"neck.convs.{i}.conv.weight",
            f"neck.convs.{i}.gn.weight",
            f"neck.convs.{i}.gn.bias",
        ]
    names += [
        "neck.extra_convs.0.conv.weight",
        "neck.extra_convs.0.gn.weight",
        "neck.extra_convs.0.gn.bias",
    ]
    lin = ["weight", "bias"]
    deform = ["sampling_offsets", "attention_weights", "value_proj", "output_proj"]
    t = "bbox_head.transformer"
    names += [f"{t}.level_embeds"] + [f"{t}.reference_points.{s}" for s in lin]
    for i in range(enc.TRANSFORMER_ENC_LAYERS):
        p = f"{t}.encoder.layers.{i}"
        names += [f"{p}.attentions.0.{d}.{s}" for d in deform for s in lin]
        names += [f"{p}.ffns.0.layers.0.0.{s}" for s in lin] + [
            f"{p}.ffns.0.layers.1.{s}" for s in lin
        ]
        names += [f"{p}.norms.{j}.{s}" for j in range(2) for s in lin]
    for i in range(m.DEC_LAYERS):
        p = f"{t}.decoder.layers.{i}"
        names += [f"{p}.attentions.0.attn.in_proj_{s}" for s in lin]
        names += [f"{p}.attentions.0.attn.out_proj.{s}" for s in lin]
        names += [f"{p}.attentions.1.{d}.{s}" for d in deform for s in lin]
        names += [f"{p}.ffns.0.layers.0.0.{s}" for s in lin] + [
            f"{p}.ffns.0.layers.1.{s}" for s in lin
        ]
        names += [f"{p}.norms.{j}.{s}" for j in range(3) for s in lin]
        names += [f"bbox_head.cls_branches.{i}.{s}" for s in lin]
        names += [f"bbox_head.reg_branches.{i}.{j}.{s}" for j in (0, 2, 4) for s in lin]
    names += ["bbox_head.query_embedding.weight", "bbox_head.stuff_query.weight"]
    for kind, layers, self_attn in (
        ("things", m.THING_MASK_LAYERS, False),
        ("stuff", m.STUFF_MASK_LAYERS, True),
    ):
        p = f"bbox_head.{kind}_mask_head"
        for j in range(layers):
            b = f"{p}.blocks.{j}"
            names += [f"{b}.attn.{x}.{s}" for x in ("q", "k", "v", "proj") for s in lin]
            names += [f"{b}.attn.linear_l{n}.0.{s}" for n in (1, 2, 3) for s in lin]
            names += [f"{b}.attn.linear.0.{s}" for s in lin]
            names += [f"{b}.{x}.{s}" for x in ("head_norm1", "head_norm2") for s in lin]
            names += [f"{b}.mlp.{x}.{s}" for x in ("fc1", "fc2") for s in lin]
            if self_attn:
                names += [f"{b}.self_attention.{x}.{s}" for x in ("qkv", "proj") for s in lin]
                names += [f"{b}.norm3.{s}" for s in lin]
        names += [f"{p}.attnen.{x}.{s}" for x in ("q", "k") for s in lin]
        names += [f"{p}.attnen.linear_l{n}.0.{s}" for n in (1, 2, 3) for s in lin]
        names += [f"{p}.attnen.linear.0.{s}" for s in lin]
    names += [
        f"bbox_head.cls_stuff_branches.{j}.{s}" for j in range(m.STUFF_MASK_LAYERS) for s in lin
    ]
    # present in the official head but unused (zero-weighted losses): dropped by the converter
    dropped = [
        f"bbox_head.cls_thing_branches.{j}.{s}" for j in range(m.THING_MASK_LAYERS) for s in lin
    ]
    dropped += [
        f"bbox_head.reg_branches2.{j}.4.{s}" for j in range(m.THING_MASK_LAYERS) for s in lin
    ]
    return names, dropped


def test_official_key_mapping_round_trip(tmp_path):
    conv = _converter()
    cfg = _quick_cfg()
    model = build_model(cfg)
    ours_state = model.state_dict()
    names, unused = _official_names(cfg)
    mapped = {n: conv.convert_key(n) for n in names}
    kept = {n: k for n, k in mapped.items() if k is not None}
    assert len(set(kept.values())) == len(kept), "two official tensors map to one name"
    added_biases = {k for k in ours_state if ".input_proj." in k and k.endswith("0.bias")}
    added_biases |= {k for k in ours_state if ".extra_proj." in k and k.endswith("0.bias")}
    want = {k for k in ours_state if not k.endswith("num_batches_tracked")} - added_biases
    assert set(kept.values()) == want
    assert all(conv.convert_key(n) is None for n in unused)

    # random official tensors (shapes as the model's: the mapping keeps shapes), converted and
    # loaded strictly, then mapped back
    official = {n: torch.randn(ours_state[k].shape) for n, k in kept.items()}
    official.update({n: torch.randn(3) for n in unused})
    heads, levels = cfg.MODEL.MSDEFORM_PIXEL_DECODER.NHEADS, 4
    converted, origin, dropped = conv.convert_state_dict(official, heads=heads, levels=levels)
    assert sorted(dropped) == sorted(unused)
    for k in added_biases:
        assert torch.equal(converted[k], torch.zeros_like(converted[k]))
    for k, v in ours_state.items():
        if k.endswith("num_batches_tracked"):
            converted[k] = v
    model.load_state_dict(converted, strict=True)
    back = conv.to_official(model.state_dict(), origin, heads=heads, levels=levels)
    for n, v in official.items():
        if n in kept:
            assert torch.equal(back[n], v), n

    # the level order is reversed: official level l is our level L - 1 - l
    p = "bbox_head.transformer.decoder.layers.0.attentions.1.sampling_offsets.bias"
    ours_b = converted["sem_seg_head.predictor.layers.0.cross_attn.sampling_offsets.bias"]
    npts = cfg.MODEL.PANOPTIC_SEGFORMER.DEC_N_POINTS
    o = official[p].view(heads, levels, npts, 2)
    assert torch.equal(ours_b.view(heads, levels, npts, 2)[:, 0], o[:, levels - 1])
    emb = converted["sem_seg_head.pixel_decoder.transformer.level_embed"]
    assert torch.equal(emb[0], official["bbox_head.transformer.level_embeds"][levels - 1])
    # ChannelMapper input 0 (res3) is our finest projection (last)
    assert torch.equal(
        converted["sem_seg_head.pixel_decoder.input_proj.2.0.weight"],
        official["neck.convs.0.conv.weight"],
    )

    # the command line on an mmcv-format file, checked against the quick config's model
    src, dst = tmp_path / "official.pth", tmp_path / "ours.pth"
    torch.save({"meta": {"epoch": 24}, "state_dict": official}, src)
    assert conv.main([str(src), str(dst), "--config-file", QUICK]) == 0
    # the check runs with --config-file after IN OUT (it was once swallowed by the overrides)
    bad = tmp_path / "bad.pth"
    opts = ["MODEL.PANOPTIC_SEGFORMER.NUM_QUERIES", "7"]
    assert conv.main([str(src), str(bad), "--config-file", QUICK] + opts) == 1
    assert not bad.exists()
    saved = torch.load(dst, weights_only=True)["model"]
    assert torch.equal(saved["sem_seg_head.predictor.stuff_query.weight"],
                       official["bbox_head.stuff_query.weight"])  # fmt: skip


def test_pvt_backbone_names_map_to_the_timm_wrapper():
    conv = _converter()
    official = {
        "backbone.patch_embed1.proj.weight": torch.zeros(1),
        "backbone.patch_embed2.proj.weight": torch.zeros(1),
        "backbone.block1.0.mlp.dwconv.dwconv.weight": torch.zeros(1),
        "backbone.norm4.weight": torch.zeros(1),
    }
    out, _, _ = conv.convert_state_dict(official)
    assert sorted(out) == [
        "backbone.model.patch_embed.proj.weight",
        "backbone.model.stages_0.blocks.0.mlp.dwconv.weight",
        "backbone.model.stages_1.downsample.proj.weight",
        "backbone.model.stages_3.norm.weight",
    ]
