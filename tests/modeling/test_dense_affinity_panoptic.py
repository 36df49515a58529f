"""Unifying Training and Inference (DenseAffinityPanoptic) on hand-built cases.

* Panoptic matching (Eq. 5): duplicates (the best detection is kept whatever its order),
  unmatched ground truth (ignored), class mismatch (IoU 0), IoU just below / at / above t = 0.5,
  the Hungarian choice, the per-pixel channel targets and the cross-entropy criterion.
* Dynamic potential (Eq. 1-2): variants A, B, C with and without masks, against numbers worked
  by hand; box regions on the stride-4 grid; soft mask pasting (with gradients).
* Argmax inference: segments from a hand-built P, void where no channel has a value; a model
  with zero detections gives a stuff-only panoptic output covering the image.
* The SE backbone keeps detectron2's parameter names; invalid switch combinations are refused.
* Table 1 variants A, B (with the Lovász-Softmax semantic loss) and D1 (potential C, heuristic
  merge): a training step (which losses exist, gradients to the affinity head) and inference
  (valid segments). C1 / C2 / D2 use the same code paths (the end-to-end test runs D2).
"""

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_backbone, build_model

import seg_methods  # noqa: F401  registers the meta-architecture and the backbone
from seg_methods.config import get_cfg
from seg_methods.modeling.criterion.panoptic_matching import (
    PanopticMatchingCriterion,
    match_segments_to_detections,
    panoptic_matching_target,
)
from seg_methods.modeling.meta_arch.dense_affinity_panoptic import (
    box_region_masks,
    dynamic_potential,
    panoptic_from_logits,
    paste_masks_soft,
)

IGN = 255
QUICK = "configs/quick_schedules/dense_affinity_panoptic_synthetic_panoptic_instant_test.yaml"


def _t(rows):
    return torch.tensor(rows, dtype=torch.float32)


# ----------------------------------------------------------------------------- matching (Eq. 5)
def test_duplicates_keep_the_best_detection_in_any_order():
    gt = _t([[0, 0, 10, 10]])
    for dets, best in (
        (_t([[0, 0, 10, 10], [0, 0, 10, 8]]), 0),  # IoU 1.0 and 0.8
        (_t([[0, 0, 10, 8], [0, 0, 10, 10]]), 1),  # same, reversed
    ):
        m = match_segments_to_detections(gt, torch.tensor([1]), dets, torch.tensor([1, 1]))
        assert m.det_for_gt.tolist() == [best]
        expected_keep = [False, False]
        expected_keep[best] = True
        assert m.keep.tolist() == expected_keep  # the duplicate is removed


def test_unmatched_gt_and_class_mismatch():
    gt = _t([[0, 0, 10, 10], [50, 50, 60, 60]])
    dets = _t([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]])
    # det 0 has the wrong class (IoU taken as 0), det 1 matches gt 0, det 2 overlaps nothing;
    # gt 1 has no detection.
    m = match_segments_to_detections(
        gt, torch.tensor([1, 1]), dets, torch.tensor([2, 1, 1]), threshold=0.5
    )
    assert m.det_for_gt.tolist() == [1, -1]
    assert m.iou[0, 0] == 0 and m.iou[0, 1] == 1
    # det 0 (other class) and det 2 (false positive) are not duplicates: they stay as channels
    assert m.keep.tolist() == [True, True, True]


@pytest.mark.parametrize(
    "y1, matched",
    [(4.9, False), (5.0, True), (5.1, True)],  # IoU 0.49, exactly 0.50, 0.51
)
def test_iou_threshold_is_inclusive(y1, matched):
    gt = _t([[0, 0, 10, 10]])
    det = _t([[0, 0, 10, y1]])
    m = match_segments_to_detections(gt, torch.tensor([0]), det, torch.tensor([0]), threshold=0.5)
    assert abs(float(m.iou[0, 0]) - y1 / 10) < 1e-6
    assert m.det_for_gt.tolist() == ([0] if matched else [-1])
    assert m.keep.tolist() == [True]  # below t it is a false positive, not a duplicate


def test_hungarian_maximises_the_total_iou():
    # det 0 overlaps gt 0 (0.9) and gt 1 (0.6); det 1 overlaps gt 0 (0.8) and gt 1 only below t
    # (0.34). A greedy match of det 0 to gt 0 would leave gt 1 unmatched; Eq. 5's permutation
    # (maximum total IoU) matches both.
    gt = _t([[0, 0, 10, 10], [0, 0, 10, 5.4]])
    dets = _t([[0, 0, 10, 9], [0, 2, 10, 10]])
    m = match_segments_to_detections(gt, torch.tensor([0, 0]), dets, torch.tensor([0, 0]))
    assert torch.allclose(m.iou, _t([[0.9, 0.8], [0.6, 0.34]]), atol=1e-5)
    assert m.det_for_gt.tolist() == [1, 0]
    assert m.keep.tolist() == [True, True]


def test_empty_inputs():
    m = match_segments_to_detections(
        torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), _t([[0, 0, 1, 1]]), torch.tensor([0])
    )
    assert m.det_for_gt.shape == (0,) and m.keep.tolist() == [True]
    m = match_segments_to_detections(
        _t([[0, 0, 1, 1]]), torch.tensor([0]), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    )
    assert m.det_for_gt.tolist() == [-1] and m.keep.shape == (0,)


def test_channel_targets_stuff_matched_unmatched_and_crowd():
    # 4x6 image: classes 0 (thing), 1 and 2 (stuff); void in the last column.
    sem = torch.tensor(
        [
            [1, 1, 0, 0, 2, IGN],
            [1, 1, 0, 0, 2, IGN],
            [0, 0, 2, 2, 2, IGN],
            [0, 0, 0, 2, 2, IGN],
        ]
    )
    masks = torch.zeros(2, 4, 6, dtype=torch.bool)
    masks[0, 0:2, 2:4] = True  # segment 0, matched to detection 2
    masks[1, 2:4, 0:2] = True  # segment 1, unmatched
    # pixel (3, 2) has the thing class but no segment (crowd): ignored
    keep = torch.tensor([True, False, True])  # detection 1 is a duplicate
    target = panoptic_matching_target(masks, torch.tensor([2, -1]), keep, sem, [1, 2], IGN)
    # kept detections 0 and 2 -> channels 0 and 1; stuff 1 -> channel 2, stuff 2 -> channel 3
    expected = torch.tensor(
        [
            [2, 2, 1, 1, 3, IGN],
            [2, 2, 1, 1, 3, IGN],
            [IGN, IGN, 3, 3, 3, IGN],
            [IGN, IGN, IGN, 3, 3, IGN],
        ]
    )
    assert torch.equal(target, expected)


def test_criterion_cross_entropy_and_degenerate_images():
    torch.manual_seed(0)
    logits = [torch.randn(3, 2, 2, requires_grad=True), torch.randn(0, 2, 2, requires_grad=True)]
    targets = [torch.tensor([[0, 2], [IGN, 1]]), torch.full((2, 2), IGN)]
    crit = PanopticMatchingCriterion(weight=0.5, ignore_value=IGN)
    loss = crit(logits, targets)["loss_panoptic"]
    flat = logits[0].permute(1, 2, 0).reshape(4, 3)
    want = F.cross_entropy(flat[[0, 1, 3]], torch.tensor([0, 2, 1]))
    assert torch.allclose(loss, want)
    assert torch.allclose(crit.apply_weights({"loss_panoptic": loss})["loss_panoptic"], want * 0.5)
    loss.backward()
    # all pixels ignored: a zero loss attached to the graph
    zero = crit([logits[0]], [torch.full((2, 2), IGN)])["loss_panoptic"]
    assert zero.item() == 0 and zero.requires_grad
    # logits at 1/2 the target size are upsampled
    up = crit([torch.zeros(2, 1, 1)], [torch.tensor([[0, 1], [1, 1]])])["loss_panoptic"]
    assert torch.allclose(up, torch.log(torch.tensor(2.0)))


# ----------------------------------------------------------------------------- potential (Eq. 1-2)
def test_box_region_on_the_stride_4_grid():
    # map pixel centres at 2, 6, 10, 14 input pixels; box x in [4, 10], y in [0, 2]
    region = box_region_masks(_t([[4, 0, 10, 2]]), (4, 4), 4)
    expected = torch.zeros(1, 4, 4)
    expected[0, 0, 1:3] = 1
    assert torch.equal(region, expected)


def test_paste_masks_soft_fills_the_box_and_has_gradients():
    masks = torch.ones(1, 28, 28, requires_grad=True)
    pasted = paste_masks_soft(masks, _t([[0, 0, 32, 16]]), (8, 10), 4)
    expected = torch.zeros(1, 8, 10)
    expected[0, :4, :8] = 1
    assert torch.allclose(pasted, expected, atol=1e-6)
    pasted.sum().backward()
    assert masks.grad.abs().sum() > 0
    # left half 0, right half 1: map pixel centres at 1/8, 3/8, 5/8, 7/8 of the box width
    half = torch.zeros(1, 28, 28)
    half[0, :, 14:] = 1
    pasted = paste_masks_soft(half, _t([[0, 0, 16, 16]]), (4, 4), 4)
    assert torch.allclose(pasted[0], torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 4), atol=1e-6)


def _hand_inputs():
    # K = 3 classes: 0 thing, 1 and 2 stuff; 2x2 map at stride 4 (8x8 input)
    v = torch.tensor(
        [
            [[0.6, 0.2], [0.1, 0.5]],  # V(thing 0)
            [[0.3, 0.3], [0.8, 0.1]],  # V(stuff 1)
            [[0.1, 0.5], [0.1, 0.4]],  # V(stuff 2)
        ]
    )
    boxes = _t([[0, 0, 4, 8]])  # left column (centres x = 2)
    masks = torch.tensor([[[0.5, 0.9], [1.0, 0.2]]])
    return v, boxes, torch.tensor([0]), torch.tensor([0.5]), masks


@pytest.mark.parametrize(
    "variant, with_masks, left_column",
    [
        ("A", False, [0.6, 0.1]),  # V
        ("A", True, [0.6 + 0.5, 0.1 + 1.0]),  # V + M, no score
        ("B", False, [0.3, 0.05]),  # s V
        ("B", True, [0.5 * 0.6 * 0.5, 0.5 * 0.1 * 1.0]),  # s V M
        ("C", False, [0.3, 0.05]),  # s V (B = C without masks)
        ("C", True, [0.5 * (0.6 + 0.5), 0.5 * (0.1 + 1.0)]),  # s (V + M)
    ],
)
def test_dynamic_potential_variants_by_hand(variant, with_masks, left_column):
    v, boxes, classes, scores, masks = _hand_inputs()
    psi = dynamic_potential(
        v, boxes, classes, scores, [1, 2], variant=variant, masks=masks if with_masks else None
    )
    assert psi.shape == (3, 2, 2)  # D + S channels
    assert torch.allclose(psi[0, :, 0], torch.tensor(left_column))
    assert torch.equal(psi[0, :, 1], torch.zeros(2))  # outside the box
    assert torch.equal(psi[1:], v[1:])  # one full-image box per stuff class, score 1


def test_dynamic_potential_zero_detections_and_bad_variant():
    v, *_ = _hand_inputs()
    psi = dynamic_potential(
        v, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0), [1, 2]
    )
    assert torch.equal(psi, v[1:])
    with pytest.raises(ValueError, match="POTENTIAL"):
        dynamic_potential(
            v,
            torch.zeros(0, 4),
            torch.zeros(0, dtype=torch.long),
            torch.zeros(0),
            [1, 2],
            variant="D",
        )


def test_scores_and_masks_receive_gradients():
    v, boxes, classes, scores, masks = _hand_inputs()
    scores.requires_grad_(True)
    masks.requires_grad_(True)
    dynamic_potential(v, boxes, classes, scores, [1, 2], variant="B", masks=masks).sum().backward()
    assert scores.grad.item() != 0 and masks.grad[0, :, 0].abs().sum() > 0
    assert masks.grad[0, :, 1].abs().sum() == 0  # outside the box


# ----------------------------------------------------------------------------- argmax inference
def test_panoptic_from_logits_by_hand():
    # channels: detection 0 (thing 0), detection 1 (thing 0), stuff 1, stuff 2
    p = torch.zeros(4, 2, 3)
    p[0, 0, 0] = 2.0
    p[1, 0, 1] = 3.0
    p[1, 0, 0] = 1.0
    p[2, 1, :] = 0.5
    p[3, 1, 2] = 0.9
    # pixel (0, 2): every channel 0 -> void
    pan, info = panoptic_from_logits(p, [0, 0, 1, 2], thing_ids=[0], num_detections=2)
    assert pan.tolist() == [[1, 2, 0], [3, 3, 4]]
    assert [(s["id"], s["isthing"], s["category_id"]) for s in info] == [
        (1, True, 0),
        (2, True, 0),
        (3, False, 1),
        (4, False, 2),
    ]
    assert info[0]["instance_id"] == 0 and info[1]["instance_id"] == 1
    pan, info = panoptic_from_logits(torch.zeros(0, 2, 3), [], thing_ids=[0], num_detections=0)
    assert (pan == 0).all() and info == []


def _quick_cfg(**overrides):
    cfg = get_cfg()
    cfg.merge_from_file(QUICK)
    cfg.MODEL.DEVICE = "cpu"
    for k, v in overrides.items():
        cfg.merge_from_list([k, v])
    return cfg


def test_zero_detections_give_a_stuff_only_panoptic_output():
    torch.manual_seed(0)
    # scores are never > 1: the detector returns nothing
    model = build_model(_quick_cfg(**{"MODEL.ROI_HEADS.SCORE_THRESH_TEST": 1.0})).eval()
    image = torch.randint(0, 256, (3, 48, 56), dtype=torch.uint8)
    with torch.no_grad():
        (out,) = model([{"image": image, "height": 40, "width": 50}])
    pan, info = out["panoptic_seg"]
    assert pan.shape == (40, 50) and len(out["instances"]) == 0
    assert info and all(not s["isthing"] for s in info)
    assert {s["category_id"] for s in info} <= set(model.stuff_ids)
    assert (pan > 0).all()  # every pixel belongs to a stuff segment
    assert out["sem_seg"].shape == (8, 40, 50)


# ----------------------------------------------------------------------------- model pieces
def test_se_backbone_keeps_detectron2_names():
    cfg = _quick_cfg()
    backbone = build_backbone(cfg)
    names = set(backbone.state_dict())
    assert "bottom_up.res5.se.fc1.weight" in names and "bottom_up.res5.0.conv1.weight" in names
    assert "fpn_lateral5.weight" in names
    assert backbone.bottom_up.res5.se.fc1.out_channels == 512 // 16
    feats = backbone(torch.zeros(1, 3, 64, 64))
    assert set(feats) == {"p2", "p3", "p4", "p5", "p6"}


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"MODEL.DENSE_AFFINITY_PANOPTIC.PANOPTIC_LOSS": False}, "PANOPTIC_LOSS"),
        (
            {"MODEL.MASK_ON": False, "MODEL.DENSE_AFFINITY_PANOPTIC.INFERENCE": "heuristic"},
            "MASK_ON",
        ),
        ({"MODEL.ROI_HEADS.NUM_CLASSES": 5}, "NUM_CLASSES"),
    ],
)
def test_invalid_switches_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        build_model(_quick_cfg(**overrides))


# ----------------------------------------------------------------------------- Table 1 variants
U = "MODEL.DENSE_AFFINITY_PANOPTIC."
TABLE1 = {
    "A": {"MODEL.MASK_ON": False, U + "AFFINITY": False, U + "PANOPTIC_LOSS": False},
    "B": {"MODEL.MASK_ON": False, U + "SEMANTIC_LOSS": "lovasz"},
    "D1": {U + "INFERENCE": "heuristic", U + "POTENTIAL": "C"},
}


@pytest.mark.parametrize("variant", sorted(TABLE1))
def test_table1_variants_train_and_infer(variant, tiny_synthetic):
    from detectron2.data import DatasetCatalog
    from detectron2.utils.events import EventStorage

    from seg_methods.data.build import build_dataset_mapper

    torch.manual_seed(0)
    small = {  # fewer proposals and detections: a fast step that still has detections
        "MODEL.RPN.POST_NMS_TOPK_TRAIN": 40,
        "MODEL.RPN.POST_NMS_TOPK_TEST": 40,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 32,
        "TEST.DETECTIONS_PER_IMAGE": 8,
    }
    cfg = _quick_cfg(**small, **TABLE1[variant])
    cfg.DATASETS.TRAIN = (tiny_synthetic["panoptic_train"],)
    model = build_model(cfg)
    assert (model.affinity_head is None) == (variant == "A")
    assert model.roi_heads.mask_on == (variant == "D1")
    mapper = build_dataset_mapper(cfg, is_train=True)
    batch = [mapper(d) for d in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:2]]
    with EventStorage():
        losses = model.train()(batch)
    assert ("loss_panoptic" in losses) == (variant in ("B", "D1"))
    assert ("loss_mask" in losses) == (variant == "D1")
    sum(losses.values()).backward()
    if variant in ("B", "D1"):
        assert model.affinity_head.phi0.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": batch[0]["image"]}])
    pan, info = out["panoptic_seg"]
    assert pan.shape == batch[0]["image"].shape[-2:]
    ids = {int(i) for i in pan.unique()} - {0}
    assert ids == {s["id"] for s in info}
    for s in info:
        assert s["isthing"] == (s["category_id"] in model.thing_ids)
        assert s["category_id"] in (model.thing_ids if s["isthing"] else model.stuff_ids)


def test_instances_export_with_a_different_number_of_detections(tmp_path):
    """TorchScript export of the instances (panoptic off), verified on a second image with a
    different number of detections: the ROI heads are traced under detectron2's
    patch_builtin_len (mask_rcnn_inference's split by len() would otherwise be frozen)."""
    from seg_methods.export import export_model

    torch.manual_seed(0)
    cfg = _quick_cfg(**{"TEST.PANOPTIC_ON": False, "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.23})
    model = build_model(cfg).eval()
    image = torch.randint(
        0, 256, (3, 61, 83), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    with torch.no_grad():
        counts = [len(model([{"image": im}])[0]["instances"]) for im in (image, image.flip(1, 2))]
    assert counts[0] != counts[1], counts  # the case this test is about
    result = export_model(
        cfg, model, "torchscript", str(tmp_path), sample_image=image, outputs=["instances"]
    )
    assert result.verified
    for diffs in result.max_abs_diff.values():
        assert all(d == 0 for d in diffs.values()), result.max_abs_diff
