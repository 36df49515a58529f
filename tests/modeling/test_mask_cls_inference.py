"""Semantic / panoptic / instance inference of mask-classification models on designed cases."""

import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog

from seg_methods.config.common import add_common_config
from seg_methods.modeling.postprocessing import (
    instance_inference,
    mask_cls_inference_kwargs,
    mask_cls_postprocess,
    output_sizes_from_inputs,
    panoptic_inference,
    semantic_inference,
    thing_ids_from_metadata,
)


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_semantic_inference_equals_manual_sum():
    mask_cls = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]])  # Q = 2, C = 2
    mask_pred = torch.tensor([[[0.0, 1.0]], [[-1.0, 3.0]]])  # (2, 1, 2)
    out = semantic_inference(mask_cls, mask_pred)
    assert out.shape == (2, 1, 2)
    for c in range(2):
        for w in range(2):
            want = 0.0
            for q in range(2):
                z = [math.exp(v) for v in mask_cls[q].tolist()]
                want += z[c] / sum(z) * _sig(mask_pred[q, 0, w].item())
            assert out[c, 0, w].item() == pytest.approx(want, rel=1e-6)


def _panoptic_case():
    """H = 4, W = 8; C = 3 (class 0 thing, 1 and 2 stuff); six queries:

    q0 stuff 1, left half; q1 stuff 1, top-right; q2 thing 0, bottom-right;
    q3 low score (0.35), mask everywhere; q4 no-object, mask everywhere;
    q5 thing 0 with a lower score, covers q2's block but wins only pixel (3, 7) -> area 1/8.
    """
    h, w = 4, 8
    neg = -5.0
    masks = torch.full((6, h, w), neg)
    masks[0, :, :4] = 5.0
    masks[1, :2, 4:] = 5.0
    masks[2, 2:, 4:] = 5.0
    masks[3] = 10.0
    masks[4] = 10.0
    masks[5, 2:, 4:] = 5.0
    masks[5, 3, 7] = 8.0
    cls = torch.zeros(6, 4)
    cls[0, 1] = 10.0
    cls[1, 1] = 10.0
    cls[2, 0] = 10.0
    cls[3, 2] = 0.5  # max prob e^.5 / (e^.5 + 3) ~ 0.35
    cls[4, 3] = 10.0  # no-object
    cls[5, 0] = 8.0
    return cls, masks


def test_panoptic_merges_stuff_drops_low_score_and_overlap():
    cls, masks = _panoptic_case()
    seg, info = panoptic_inference(cls, masks, num_classes=3, thing_ids={0})
    assert seg.dtype == torch.int32 and seg.shape == (4, 8)
    assert info == [
        {"id": 1, "isthing": False, "category_id": 1},
        {"id": 2, "isthing": True, "category_id": 0},
    ]
    want = torch.zeros(4, 8, dtype=torch.int32)
    want[:, :4] = 1
    want[:2, 4:] = 1  # second stuff query of class 1 merged into segment 1
    want[2:, 4:] = 2
    want[3, 7] = 0  # won by q5, which is dropped (1/8 < 0.8); nobody else takes it
    assert torch.equal(seg, want)


def test_panoptic_overlap_threshold_is_a_ratio_of_areas():
    cls, masks = _panoptic_case()
    # q2 keeps 7 of its 8 pixels: kept at 0.875, dropped at 0.9
    _, info = panoptic_inference(cls, masks, thing_ids={0}, overlap_threshold=0.875)
    assert [s["category_id"] for s in info] == [1, 0]
    seg, info = panoptic_inference(cls, masks, thing_ids={0}, overlap_threshold=0.9)
    assert info == [{"id": 1, "isthing": False, "category_id": 1}]
    assert (seg[2:, 4:] == 0).all()


def test_panoptic_overlap_uses_argmax_area_not_visible_area():
    # One thing query; its own area (m >= 0.5) is 2 pixels, but it also wins the argmax on 2
    # pixels where m < 0.5 (no other query is kept). Mask2Former compares the argmax area (4)
    # with the own area (2): ratio 2 >= 0.8, kept, and only the 2 confident pixels are labelled.
    cls = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 10.0]])
    masks = torch.tensor([[[3.0, 3.0, -2.0, -2.0]], [[9.0, 9.0, 9.0, 9.0]]])  # (2, 1, 4)
    seg, info = panoptic_inference(cls, masks, thing_ids={0}, overlap_threshold=0.8)
    assert info == [{"id": 1, "isthing": True, "category_id": 0}]
    assert seg.tolist() == [[1, 1, 0, 0]]
    # A second query takes one of the two confident pixels: the first query's argmax area is 3
    # (own area 2) -> kept, although only 1 of its 2 confident pixels remains visible.
    cls2 = torch.tensor([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0]])
    masks2 = torch.tensor([[[3.0, 3.0, -2.0, -2.0]], [[5.0, -9.0, -9.0, -9.0]]])
    seg, info = panoptic_inference(cls2, masks2, thing_ids={0}, overlap_threshold=0.8)
    assert [s["category_id"] for s in info] == [0, 1]
    assert seg.tolist() == [[2, 1, 0, 0]]


def test_panoptic_things_of_one_class_are_not_merged():
    cls, masks = _panoptic_case()
    seg, info = panoptic_inference(cls, masks, thing_ids={0, 1})  # class 1 now a thing
    assert [(s["id"], s["category_id"], s["isthing"]) for s in info] == [
        (1, 1, True),
        (2, 1, True),
        (3, 0, True),
    ]
    assert (seg[:, :4] == 1).all() and (seg[:2, 4:] == 2).all()


def test_panoptic_object_mask_threshold_and_empty():
    cls, masks = _panoptic_case()
    # every kept class probability is ~0.9998 or 0.9992 (q5): threshold 0.9995 keeps q0..q2
    seg, info = panoptic_inference(cls, masks, thing_ids={0}, object_mask_threshold=0.9995)
    assert len(info) == 2 and seg[3, 7] == 2  # q5 gone, so q2 takes its pixel
    seg, info = panoptic_inference(cls[[3, 4]], masks[[3, 4]], thing_ids={0})
    assert info == [] and seg.shape == (4, 8) and (seg == 0).all()


def test_instance_topk_order_scores_and_classes():
    # Q = 3, C = 2 (+ no-object); class probabilities by hand
    cls = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    masks = torch.tensor(
        [
            [[2.0, -1.0], [0.5, -3.0]],
            [[1.0, 1.0], [1.0, -1.0]],
            [[-1.0, -1.0], [-1.0, -1.0]],
        ]
    )
    probs = []
    for q in range(3):
        z = [math.exp(v) for v in cls[q].tolist()]
        probs.append([z[0] / sum(z), z[1] / sum(z)])
    pairs = sorted(((probs[q][c], q, c) for q in range(3) for c in range(2)), reverse=True)[:3]

    res = instance_inference(cls, masks, test_topk_per_image=3, sort_topk=True)
    assert res.image_size == (2, 2)
    assert res.pred_classes.tolist() == [c for _, _, c in pairs]
    assert res.pred_masks.dtype == torch.bool
    mean_in = {
        0: (_sig(2.0) + _sig(0.5)) / 2,
        1: (3 * _sig(1.0)) / 3,
        2: 0.0,  # empty binary mask -> mask score 0
    }
    for k, (p, q, c) in enumerate(pairs):
        assert torch.equal(res.pred_masks[k], masks[q] > 0)
        assert res.scores[k].item() == pytest.approx(p * mean_in[q], rel=1e-5, abs=1e-9)
    assert torch.equal(res.pred_boxes.tensor, torch.zeros(3, 4))

    # default: Mask2Former's unsorted top-k; same set of (query, class) pairs
    res_u = instance_inference(cls, masks, test_topk_per_image=3)
    got = sorted(zip(res_u.scores.tolist(), res_u.pred_classes.tolist()))
    want = sorted(zip(res.scores.tolist(), res.pred_classes.tolist()))
    assert [c for _, c in got] == [c for _, c in want]
    assert [s for s, _ in got] == pytest.approx([s for s, _ in want])


def test_instance_keeps_only_things_when_panoptic_trained():
    cls = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    masks = torch.ones(2, 2, 2)
    res = instance_inference(cls, masks, test_topk_per_image=4, thing_ids={1}, sort_topk=True)
    assert res.pred_classes.tolist() == [1, 1] and len(res) == 2
    # the top-k is taken before the filter: with k = 1 the best pair is class 0 -> nothing left
    res = instance_inference(cls, masks, test_topk_per_image=1, thing_ids={1})
    assert len(res) == 0


def test_instance_boxes_from_masks():
    masks = torch.full((1, 4, 5), -1.0)
    masks[0, 1:3, 2:4] = 1.0
    res = instance_inference(torch.tensor([[3.0, 0.0]]), masks, boxes_from_masks=True)
    assert res.pred_boxes.tensor.tolist() == [[2.0, 1.0, 4.0, 3.0]]


def _gather_then_score(mask_cls, mask_pred, k, thing_ids):
    """Mask2Former's instance inference as its code reads: gather the float logits of the top-k
    queries, binarise, score (the formula instance_inference computes per query instead)."""
    num_classes = mask_cls.shape[-1] - 1
    scores = F.softmax(mask_cls, dim=-1)[:, :-1]
    labels = torch.arange(num_classes).unsqueeze(0).repeat(mask_cls.shape[0], 1).flatten(0, 1)
    scores_per_image, topk = scores.flatten(0, 1).topk(k, sorted=False)
    labels_per_image = labels[topk]
    masks = mask_pred[topk // num_classes]
    keep = torch.tensor([int(x) in thing_ids for x in labels_per_image], dtype=torch.bool)
    scores_per_image, labels_per_image, masks = scores_per_image[keep], labels_per_image[keep], masks[keep]
    binary = (masks > 0).float()
    mask_scores = (masks.sigmoid().flatten(1) * binary.flatten(1)).sum(1) / (
        binary.flatten(1).sum(1) + 1e-6
    )
    return binary, scores_per_image * mask_scores, labels_per_image


@pytest.mark.parametrize("shape", [(7, 5, 33, 29), (100, 133, 64, 64)])
def test_instance_inference_equals_gather_then_score_bit_for_bit(shape):
    # Scores are computed once per query and gathered; a query often appears with several
    # classes in the top-k, and the thing filter drops some pairs. Equal, not close.
    q, c, h, w = shape
    g = torch.Generator().manual_seed(3)
    mask_cls = torch.randn(q, c + 1, generator=g) * 3
    mask_pred = torch.randn(q, h, w, generator=g) * 4
    mask_pred[0] = -1.0  # an empty binary mask: score 0
    things = set(range(0, c, 2))
    k = min(q * c, 50)
    res = instance_inference(mask_cls, mask_pred, test_topk_per_image=k, thing_ids=things)
    binary, scores, labels = _gather_then_score(mask_cls, mask_pred, k, things)
    assert torch.equal(res.pred_masks, binary.bool())
    assert torch.equal(res.scores, scores)
    assert torch.equal(res.pred_classes, labels)
    shared = instance_inference(
        mask_cls, mask_pred, test_topk_per_image=k, thing_ids=things, mask_prob=mask_pred.sigmoid()
    )
    assert torch.equal(shared.scores, res.scores)


def test_postprocess_equals_detectron2_resize_bit_for_bit():
    # The bilinear resize is skipped when the crop already has the output size (it is the
    # identity there); at other sizes detectron2's sem_seg_postprocess runs.
    from detectron2.modeling.postprocessing import sem_seg_postprocess

    g = torch.Generator().manual_seed(0)
    cls = torch.randn(2, 6, 4, generator=g)
    masks = torch.randn(2, 6, 9, 11, generator=g) * 5
    image_sizes, output_sizes = [(36, 40), (33, 44)], [(36, 40), (50, 61)]
    for before in (False, True):
        out = mask_cls_postprocess(
            cls,
            masks,
            padded_size=(36, 44),
            image_sizes=image_sizes,
            output_sizes=output_sizes,
            semantic_on=True,
            sem_seg_postprocess_before_inference=before,
        )
        up = F.interpolate(masks, size=(36, 44), mode="bilinear", align_corners=False)
        for b in range(2):
            (hh, ww), size = output_sizes[b], image_sizes[b]
            if before:
                m = sem_seg_postprocess(up[b], size, hh, ww)
                want = semantic_inference(cls[b], m)
            else:
                want = sem_seg_postprocess(semantic_inference(cls[b], up[b]), size, hh, ww)
            assert out[b]["sem_seg"].is_contiguous()
            assert torch.equal(out[b]["sem_seg"], want), (before, b)


def test_postprocess_crops_padding_and_resizes():
    # Decoder masks already at the padded size (4, 4): upsampling is the identity. The image is
    # 2x3 inside the padding and the requested output is also 2x3, so only the crop acts.
    torch.manual_seed(0)
    cls = torch.randn(1, 3, 3)
    masks = torch.randn(1, 3, 4, 4)
    out = mask_cls_postprocess(
        cls,
        masks,
        padded_size=(4, 4),
        image_sizes=[(2, 3)],
        output_sizes=[(2, 3)],
        semantic_on=True,
    )
    assert list(out[0]) == ["sem_seg"]
    torch.testing.assert_close(out[0]["sem_seg"], semantic_inference(cls[0], masks[0, :, :2, :3]))

    # Constant masks stay constant through the resizes: sem_seg = sum_q p_q * sigmoid(m_q).
    const = torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    out = mask_cls_postprocess(
        cls,
        const,
        padded_size=(8, 8),
        image_sizes=[(5, 7)],
        output_sizes=[(10, 14)],
        semantic_on=True,
        panoptic_on=True,
        instance_on=True,
        thing_ids={0},
        test_topk_per_image=2,
    )
    r = out[0]
    assert set(r) == {"sem_seg", "panoptic_seg", "instances"}
    assert r["sem_seg"].shape == (2, 10, 14)
    want = torch.einsum("qc,q->c", F.softmax(cls[0], -1)[:, :-1], torch.sigmoid(const[0, :, 0, 0]))
    torch.testing.assert_close(r["sem_seg"], want.view(2, 1, 1).expand(2, 10, 14))
    assert r["panoptic_seg"][0].shape == (10, 14)
    assert r["instances"].image_size == (10, 14)
    assert set(r["instances"].pred_classes.tolist()) <= {0}


def test_inference_kwargs_from_config():
    name = "seg_methods_test_mask_cls_meta"
    MetadataCatalog.get(name).set(thing_dataset_id_to_contiguous_id={5: 0, 9: 2})
    cfg = get_cfg()
    add_common_config(cfg)
    cfg.DATASETS.TRAIN = (name,)
    cfg.TEST.PANOPTIC_ON = True
    kw = mask_cls_inference_kwargs(cfg)
    assert kw == {
        "semantic_on": True,
        "instance_on": False,
        "panoptic_on": True,
        "sem_seg_postprocess_before_inference": True,
        "object_mask_threshold": 0.8,
        "overlap_threshold": 0.8,
        "test_topk_per_image": 100,
        "thing_ids": {0, 2},
    }
    assert thing_ids_from_metadata(MetadataCatalog.get(name + "_none")) == set()
    assert output_sizes_from_inputs([{"height": 7, "width": 9}, {}], [(3, 4), (5, 6)]) == [
        (7, 9),
        (5, 6),
    ]
