"""CMT-DeepLab: losses on hand-built cases (Eq. 13, Eq. 14, PQ-style matching), the residual
between assignments (Eq. 6), mask-wise merging, and a CPU train step, inference, --eval-only and
DefaultPredictor on the ``tiny_synthetic`` dataset."""

import math
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from seg_methods.config import get_cfg
from seg_methods.data.build import build_dataset_mapper
from seg_methods.engine import build_checkpointer, build_predictor, evaluate_checkpoint
from seg_methods.modeling.build import build_mask_cls_head
from seg_methods.modeling.criterion.cmt_deeplab import (
    CMTDeepLabCriterion,
    mask_approximation_loss,
    mask_extreme_points,
    pq_style_matching,
    targets_to_pixel_ids,
)
from seg_methods.modeling.criterion.pixel_contrastive import (
    pixel_instance_discrimination_loss,
    sample_pixels_by_inverse_area,
)
from seg_methods.modeling.postprocessing import mask_wise_merge, per_pixel_merge
from seg_methods.modeling.transformer_decoder.cmt_deeplab_decoder import (
    CMTDeepLabDecoder,
    CMTLayer,
    pixel_coordinates,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SYNTHETIC_CONFIG = os.path.join(
    REPO, "configs/synthetic/panoptic-segmentation/cmt_deeplab/cmt_deeplab_R18_bs8_1k.yaml"
)


# --------------------------------------------------------------------------- Eq. 13
def test_mask_extreme_points_on_a_known_mask():
    mask = torch.zeros(1, 5, 9, dtype=torch.bool)
    mask[0, 1:4, 2:7] = True  # rows 1..3, columns 2..6
    mask[0, 4, 6] = True  # one more pixel at the bottom row
    ext = mask_extreme_points(mask)[0]
    area = 16.0
    avg_h = (5 * (1 + 2 + 3) + 4) / area / 4  # row index sum / area, normalised by (h - 1)
    avg_w = (3 * (2 + 3 + 4 + 5 + 6) + 6) / area / 8
    expected = torch.tensor([1 / 4, 4 / 4, 2 / 8, 6 / 8, avg_h, avg_w])
    torch.testing.assert_close(ext, expected)


def test_mask_approximation_loss_by_hand():
    # M = 2 points: h = (0.1, 0.5), w = (0.2, 0.2); GT extremes chosen by hand.
    ref = torch.tensor([[0.1, 0.5, 0.2, 0.2]], requires_grad=True)
    gt = torch.tensor([[0.0, 0.5, 0.1, 0.4, 0.25, 0.2]])
    # ext: |0.1-0| + |0.5-0.5| + |0.2-0.1| + |0.2-0.4| = 0.4 -> / 4 = 0.1
    # cen: |0.3-0.25| + |0.2-0.2| = 0.05 -> / 2 = 0.025
    loss = mask_approximation_loss(ref, gt)
    assert loss.item() == pytest.approx(0.125)
    loss.backward()
    assert ref.grad.abs().sum() > 0
    assert mask_approximation_loss(torch.zeros(0, 4), torch.zeros(0, 6)).item() == 0.0


# --------------------------------------------------------------------------- Eq. 14
def test_instance_discrimination_loss_hand_built():
    # pixels 0, 1 in mask 0 with feature (1, 0); pixel 2 in mask 1 with (0, 1); pixel 3 void.
    f = torch.tensor([[[1.0, 1.0, 0.0, 5.0], [0.0, 0.0, 1.0, 5.0]]])  # (1, 2, 4)
    ids = torch.tensor([[0, 0, 1, -1]])
    tau = 0.5
    e = math.exp(1 / tau)
    # anchors 0, 1: logits (1/tau, 1/tau, 0), two positives -> log(2e + 1) - 1/tau each
    # anchor 2: logits (0, 0, 1/tau), one positive -> log(2 + e) - 1/tau
    expected = (2 * (math.log(2 * e + 1) - 1 / tau) + (math.log(2 + e) - 1 / tau)) / 3
    idx = [torch.tensor([0, 1, 2])]
    loss = pixel_instance_discrimination_loss(f, ids, temperature=tau, sample_indices=idx)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # with sampling: every non-void pixel is drawn (|A| >= 3), the void one never
    loss2 = pixel_instance_discrimination_loss(f, ids, temperature=tau, num_samples=4096)
    assert loss2.item() == pytest.approx(expected, rel=1e-6)
    # no valid pixel: zero, differentiable
    zero = pixel_instance_discrimination_loss(f.requires_grad_(), torch.full((1, 4), -1))
    assert zero.item() == 0.0 and zero.requires_grad


def test_pixel_sampling_excludes_void_and_favours_small_masks():
    # mask 0: 96 pixels, mask 1: 4 pixels, 28 void pixels
    ids = torch.cat([torch.zeros(96), torch.ones(4), -torch.ones(28)]).long()
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(2)
    for _ in range(200):
        idx = sample_pixels_by_inverse_area(ids, 8, sample_temperature=1.0, generator=g)
        assert (ids[idx] >= 0).all() and idx.unique().numel() == 8
        counts += torch.bincount(ids[idx], minlength=2)
    # uniform sampling would give mask 1 about 4% of the samples; with 1/area weights each mask
    # has the same total weight, so mask 1 gets about 3 of its 4 pixels in every draw of 8.
    assert counts[1] / counts.sum() > 0.3
    assert sample_pixels_by_inverse_area(ids, 500).numel() == 100  # capped by non-void pixels


# --------------------------------------------------------------------------- matching
def test_pq_style_matching_hand_built():
    gt = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])  # two GT masks
    probs = torch.tensor([[0.0, 0.0, 0.9, 0.9], [0.9, 0.9, 0.0, 0.0], [0.1, 0.1, 0.1, 0.1]])
    logits = torch.log(torch.tensor([[0.1, 0.8, 0.1], [0.8, 0.1, 0.1], [0.3, 0.3, 0.4]]))
    match = pq_style_matching(logits, probs, torch.tensor([0, 1]), gt)
    # slot 1 covers GT 0 (class 0 prob 0.8), slot 0 covers GT 1 (class 1 prob 0.8)
    assert match.pred_idx.tolist() == [0, 1] and match.gt_idx.tolist() == [1, 0]
    # weights of the pairs: unsmoothed Dice 2 * 1.8 / (2 + 1.8) and p(c) = 0.8
    torch.testing.assert_close(match.dice, torch.full((2,), 3.6 / 3.8))
    torch.testing.assert_close(match.class_prob, torch.full((2,), 0.8))


def test_targets_to_pixel_ids_resizes_and_marks_void():
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, :2] = True
    masks[1, 2:, 2:] = True
    masks_small, labels, ids, sem = targets_to_pixel_ids(
        [{"labels": torch.tensor([3, 5]), "masks": masks}], (2, 2), num_classes=8
    )
    assert ids.tolist() == [[0, 0, -1, 1]]
    assert sem.tolist() == [[3, 3, 8, 5]]
    assert masks_small[0].shape == (2, 4) and labels[0].tolist() == [3, 5]


# --------------------------------------------------------------------------- Eq. 6
@pytest.mark.parametrize("prev_size", [(3, 5), (2, 3)])
def test_cmt_layer_assignment_residual(prev_size):
    torch.manual_seed(0)
    layer = CMTLayer(
        pixel_channels=8, hidden_dim=16, num_heads=2, dim_feedforward=32, num_ref_points=4,
        cluster_impl="pytorch",
    ).eval()  # fmt: skip
    centers = torch.randn(2, 5, 16)
    pixels = torch.randn(2, 8, 3, 5)
    embed = torch.randn(2, 5, 8)
    prev = torch.randn(2, 5, *prev_size)
    with torch.no_grad():
        _, _, base, _, _ = layer(centers, pixels, None, embed)
        _, px, with_res, ref, new_embed = layer(centers, pixels, prev, embed)
    resized = torch.nn.functional.interpolate(prev, size=(3, 5), mode="bilinear")
    # Eq. 6: Z = softmax_N(S + K~ Q~^T): the logits differ exactly by S
    torch.testing.assert_close(with_res - base, resized, atol=1e-5, rtol=1e-5)
    assert ref.shape == (2, 5, 8) and ((ref > 0) & (ref < 1)).all()
    torch.testing.assert_close(ref, new_embed.sigmoid())
    assert px.shape == pixels.shape


def test_pixel_coordinates():
    c = pixel_coordinates(3, 5)
    assert c.shape == (2, 3, 5)
    assert c[0, :, 0].tolist() == [0.0, 0.5, 1.0] and c[1, 0].tolist() == [0, 0.25, 0.5, 0.75, 1]


def test_eq12_pixel_stream_is_the_coord_convolved_features():
    # Eq. 11-12: F^ = Conv(Concat(F, r^p)) replaces F for the whole layer, as C^ replaces C; the
    # Eq. 8 update is added to F^. A fresh layer's update is zero (its BN scale starts at 0), so
    # it returns F^ itself, which differs from F through the coordinate channels.
    torch.manual_seed(0)
    kw = dict(pixel_channels=8, hidden_dim=16, num_heads=2, dim_feedforward=32,
              num_ref_points=4, cluster_impl="pytorch")  # fmt: skip
    layer = CMTLayer(**kw).eval()
    centers, pixels, embed = torch.randn(2, 5, 16), torch.randn(2, 8, 3, 5), torch.randn(2, 5, 8)
    coords = pixel_coordinates(3, 5)[None].expand(2, -1, -1, -1)
    with torch.no_grad():
        _, px, _, _, _ = layer(centers, pixels, None, embed)
        f_hat = layer.pixel_coord_conv(torch.cat([pixels, coords], dim=1))
    torch.testing.assert_close(px, f_hat)
    assert (px - pixels).abs().max() > 1e-4
    # without location-sensitive clustering the pixel stream starts from F
    plain = CMTLayer(**kw, location_sensitive=False).eval()
    with torch.no_grad():
        _, px_plain, _, _, _ = plain(centers, pixels, None, None)
    torch.testing.assert_close(px_plain, pixels)


# --------------------------------------------------------------------------- PQ-style loss
def _one_image_targets(masks_hw, labels):
    return [{"labels": torch.tensor(labels), "masks": torch.as_tensor(masks_hw, dtype=torch.bool)}]


def test_pq_class_term_is_weighted_by_unsmoothed_dice():
    # 1 x 4 image: GT mask of class 0 on pixels 0-1, pixels 2-3 void. Slot 0 takes 0.75 of
    # pixels 0-1 (slot 1 the rest); slot 0 is matched.
    masks = torch.tensor([[[1, 1, 0, 0]]])
    mask_logits = torch.tensor([[math.log(3.0)] * 4, [0.0] * 4]).reshape(1, 2, 1, 4)
    class_p = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])  # C = 2 + void
    outputs = {"pred_logits": class_p.log()[None], "pred_masks": mask_logits}
    crit = CMTDeepLabCriterion(num_classes=2, num_aux_outputs=0)
    losses = crit(outputs, _one_image_targets(masks, [0]))
    alpha, n = 0.75, 2
    dice = 2 * 1.5 / (2 + 1.5)  # Eq. 6 Dice, no smoothing (the smoothed one is 4 / 4.5)
    expected_cls = (alpha * dice * -math.log(0.6) + (1 - alpha) * -math.log(0.6)) / n
    assert losses["loss_pq_class"].item() == pytest.approx(expected_cls, rel=1e-5)
    # the Dice *loss* term keeps its +1 smoothing, weighted by the matched p(c)
    expected_dice = alpha * 0.6 * (1 - (2 * 1.5 + 1) / (2 + 1.5 + 1)) / n
    assert losses["loss_pq_dice"].item() == pytest.approx(expected_dice, rel=1e-5)


def _swapped_aux_outputs():
    """Final prediction: slot 0 <-> GT 0, slot 1 <-> GT 1; the auxiliary prediction has the two
    slots swapped, so its own matching differs from the final one."""
    masks = torch.tensor([[[1, 1, 0, 0]], [[0, 0, 1, 1]]])  # two GT masks on a 1 x 4 image
    final_masks = torch.tensor([[4.0, 4, 0, 0], [0, 0, 4, 4], [1, 1, 1, 1]]).reshape(1, 3, 1, 4)
    final_cls = torch.tensor([[3.0, 0, 0], [0, 3, 0], [0, 0, 3]])[None]
    aux_masks = final_masks[:, [1, 0, 2]]
    aux_cls = final_cls[:, [1, 0, 2]]
    outputs = {
        "pred_logits": final_cls,
        "pred_masks": final_masks,
        "aux_outputs": [{"pred_logits": aux_cls, "pred_masks": aux_masks}],
    }
    return outputs, _one_image_targets(masks, [0, 1])


def test_aux_outputs_reuse_the_final_matching_by_default(monkeypatch):
    outputs, targets = _swapped_aux_outputs()
    crit = CMTDeepLabCriterion(num_classes=2, num_aux_outputs=1)
    assert crit.aux_matching == "final"
    calls = []
    real_match = CMTDeepLabCriterion.match

    def counting_match(*args):
        calls.append(1)
        return real_match(*args)

    monkeypatch.setattr(CMTDeepLabCriterion, "match", staticmethod(counting_match))
    losses = crit(outputs, targets)
    assert len(calls) == 1  # the final prediction only
    # every auxiliary loss equals the loss computed with the final indices and weights
    size = (1, 4)
    gt_masks, gt_labels, ids, _ = targets_to_pixel_ids(targets, size, 2)
    non_void = (ids >= 0).float()
    final_logits = crit.mask_logits_at(outputs["pred_masks"], size)
    final = real_match(outputs["pred_logits"], final_logits, gt_masks, gt_labels, non_void)
    assert final[0].pred_idx.tolist() == [0, 1] and final[0].gt_idx.tolist() == [0, 1]
    aux = outputs["aux_outputs"][0]
    expected = crit.prediction_losses(
        aux["pred_logits"], crit.mask_logits_at(aux["pred_masks"], size), final,
        gt_masks, gt_labels, non_void,
    )  # fmt: skip
    for k, v in expected.items():
        torch.testing.assert_close(losses[f"{k}_0"], v)
    # the swapped auxiliary slots are wrong under the final matching: high mask-ID loss
    assert losses["loss_mask_id_0"] > 10 * losses["loss_mask_id"]

    # per-layer re-matching: the auxiliary prediction is matched on its own (slots swapped),
    # so its losses equal the final prediction's
    calls.clear()
    per_layer = CMTDeepLabCriterion(num_classes=2, num_aux_outputs=1, aux_matching="per_layer")
    losses_pl = per_layer(outputs, targets)
    assert len(calls) == 2
    for k in ("loss_pq_class", "loss_pq_dice", "loss_mask_id"):
        torch.testing.assert_close(losses_pl[f"{k}_0"], losses_pl[k])
    assert losses_pl["loss_mask_id_0"] < losses["loss_mask_id_0"]


def test_deep_supervision_off_and_bad_aux_matching():
    outputs, targets = _swapped_aux_outputs()
    crit = CMTDeepLabCriterion(num_classes=2, num_aux_outputs=1, deep_supervision=False)
    assert not any(k.endswith("_0") for k in crit.weight_dict)
    assert set(crit(outputs, targets)) == {"loss_pq_class", "loss_pq_dice", "loss_mask_id"}
    with pytest.raises(ValueError, match="MODEL.CMT_DEEPLAB.AUX_MATCHING"):
        CMTDeepLabCriterion(num_classes=2, aux_matching="every")


# --------------------------------------------------------------------------- inference
def test_mask_wise_merge_hand_built():
    # 3 queries over a 1 x 4 image; query 2 has class confidence below the threshold.
    mask_probs = torch.tensor(
        [[[0.8, 0.7, 0.1, 0.1]], [[0.1, 0.2, 0.6, 0.45]], [[0.1, 0.1, 0.3, 0.45]]]
    )
    class_probs = torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.5, 0.1, 0.4]])
    seg, info = mask_wise_merge(class_probs, mask_probs, thing_ids=[0], class_threshold=0.7)
    assert seg.tolist() == [[1, 1, 2, 2]]
    assert info == [
        {"id": 1, "isthing": True, "category_id": 0},
        {"id": 2, "isthing": False, "category_id": 1},
    ]
    # pixel 3 is tied between queries 1 and 2 (0.45): the argmax takes the first, query 1.
    # No query reaches a class confidence of 0.95: everything is void.
    seg2, _ = mask_wise_merge(class_probs, mask_probs, class_threshold=0.95)
    assert seg2.abs().sum() == 0
    # with a low class threshold query 2 (class 0, 0.5) passes, but it is the argmax of no pixel
    # (its own mask is empty), so it adds no segment.
    seg4, info4 = mask_wise_merge(class_probs, mask_probs, class_threshold=0.3)
    assert seg4.tolist() == [[1, 1, 2, 2]] and len(info4) == 2
    seg3, info3 = per_pixel_merge(class_probs, mask_probs, thing_ids=[0], class_threshold=0.7)
    assert seg3.tolist() == [[1, 1, 2, 2]] and len(info3) == 2


def test_mask_wise_merge_overlap_filter():
    # q0 owns pixels 0-2 but loses pixel 2 to q1 (0.99 * 0.45 > 0.75 * 0.55): it keeps 2/3 of
    # its own mask, below 0.8 -> dropped; q1 keeps pixel 3 (its own mask).
    mask_probs = torch.tensor([[[0.6, 0.6, 0.55, 0.2]], [[0.4, 0.4, 0.45, 0.8]]])
    class_probs = torch.tensor([[0.75, 0.2, 0.05], [0.005, 0.99, 0.005]])
    seg, info = mask_wise_merge(class_probs, mask_probs, thing_ids=[0, 1], class_threshold=0.7)
    assert seg.tolist() == [[0, 0, 0, 1]] and [s["category_id"] for s in info] == [1]
    seg, info = mask_wise_merge(
        class_probs, mask_probs, thing_ids=[0, 1], class_threshold=0.7, overlap_threshold=0.5
    )
    assert seg.tolist() == [[1, 1, 0, 2]] and [s["category_id"] for s in info] == [0, 1]


# --------------------------------------------------------------------------- whole model
def _tiny_cfg(tiny_synthetic, out_dir="", **extra):
    cfg = get_cfg()
    cfg.merge_from_file(SYNTHETIC_CONFIG)
    opts = [
        "DATASETS.TRAIN", (tiny_synthetic["panoptic_train"],),
        "DATASETS.TEST", (tiny_synthetic["panoptic_val"],),
        "INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 64,
        "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 64,
        "MODEL.CMT_DEEPLAB.NUM_OBJECT_QUERIES", 8,
        "MODEL.CMT_DEEPLAB.HIDDEN_DIM", 32,
        "MODEL.CMT_DEEPLAB.DIM_FEEDFORWARD", 32,
        "MODEL.CMT_DEEPLAB.DECODER_DIM", 32,
        "MODEL.CMT_DEEPLAB.MASK_DIM", 16,
        "MODEL.CMT_DEEPLAB.INSDIS_NUM_SAMPLES", 64,
        "SOLVER.IMS_PER_BATCH", 2,
        "DATALOADER.NUM_WORKERS", 0,
        "TEST.NUM_VIS_IMAGES", 0,
        "OUTPUT_DIR", out_dir,
    ]  # fmt: skip
    for k, v in extra.items():
        opts += [k, v]
    cfg.merge_from_list(opts)
    return cfg


def test_cmt_deeplab_train_step_and_inference_on_tiny_synthetic(tiny_synthetic):
    cfg = _tiny_cfg(tiny_synthetic)
    model = build_model(cfg)
    mapper = build_dataset_mapper(cfg, is_train=True)
    batch = [mapper(d) for d in DatasetCatalog.get(tiny_synthetic["panoptic_train"])[:2]]
    model.train()
    with EventStorage():
        losses = model(batch)
    per_output = {"loss_pq_class", "loss_pq_dice", "loss_mask_id", "loss_loc"}
    want = per_output | {f"{k}_{i}" for k in per_output for i in range(2)}
    assert set(losses) == want | {"loss_insdis", "loss_sem"}
    for k, v in losses.items():
        assert v.dim() == 0 and torch.isfinite(v) and v.item() > 0, k
    sum(losses.values()).backward()
    for prefix in ("backbone.", "sem_seg_head.stages.", "sem_seg_head.query_feat"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]
        assert grads and sum(float(g.abs().sum()) for g in grads if g is not None) > 0, prefix

    model.eval()
    test_mapper = build_dataset_mapper(cfg, is_train=False)
    inputs = [test_mapper(d) for d in DatasetCatalog.get(tiny_synthetic["panoptic_val"])[:2]]
    inputs[1]["height"], inputs[1]["width"] = 48, 80
    with torch.no_grad():
        outputs = model(inputs)
    for x, out in zip(inputs, outputs):
        h, w = x["height"], x["width"]
        assert set(out) == {"sem_seg", "panoptic_seg", "instances"}
        assert out["sem_seg"].shape == (8, h, w)
        # semantic scores: sum over centres of p(c) * m, with softmax masks -> sum_c <= 1
        assert (out["sem_seg"].sum(0) <= 1 + 1e-5).all()
        seg, info = out["panoptic_seg"]
        assert seg.shape == (h, w) and set(seg.unique().tolist()) <= {0} | {s["id"] for s in info}
        assert out["instances"].pred_masks.shape[1:] == (h, w)


def test_cmt_deeplab_rfn_and_ablation_switches(tiny_synthetic):
    cfg = _tiny_cfg(
        tiny_synthetic,
        **{
            "MODEL.BACKBONE.NAME": "AxialResNet",
            "MODEL.AXIAL_RESNET.STEM_CHANNELS": 16,
            "MODEL.AXIAL_RESNET.WIDTHS": [32, 64, 128, 256],
            "MODEL.AXIAL_RESNET.NUM_HEADS": 2,
            "MODEL.CMT_DEEPLAB.AXIAL_HEADS": 2,
            "MODEL.CMT_DEEPLAB.RFN": True,
            "MODEL.CMT_DEEPLAB.LOCATION_SENSITIVE": False,
            "MODEL.CMT_DEEPLAB.PANOPTIC_MERGE": "per_pixel",
        },
    )
    model = build_model(cfg)
    assert (
        model.rfn_backbone is not None and float(model.rfn_connect.weight.detach().abs().sum()) == 0
    )
    mapper = build_dataset_mapper(cfg, is_train=True)
    batch = [mapper(d) for d in DatasetCatalog.get(tiny_synthetic["panoptic_train"])[:1]]
    model.train()
    with EventStorage():
        losses = model(batch)
    assert "loss_loc" not in losses and "loss_pq_class_3" in losses  # 2 + 2 supervised layers
    sum(losses.values()).backward()
    assert model.rfn_connect.weight.grad.abs().sum() > 0


def test_cmt_deeplab_eval_only_and_predictor(tiny_synthetic, tmp_path):
    cfg = _tiny_cfg(tiny_synthetic, out_dir=str(tmp_path))
    model = build_model(cfg)
    build_checkpointer(model, save_dir=str(tmp_path)).save("weights")
    cfg.MODEL.WEIGHTS = str(tmp_path / "weights.pth")
    cfg.TEST.INSTANCE_ON = False
    results = evaluate_checkpoint(cfg)  # the path of `train_net.py --eval-only`
    assert "panoptic_seg" in results and "sem_seg" in results
    assert 0.0 <= results["panoptic_seg"]["PQ"] <= 100.0

    predictor = build_predictor(cfg)
    image = np.random.RandomState(0).randint(0, 255, (40, 52, 3), dtype=np.uint8)
    out = predictor(image)
    assert out["sem_seg"].shape == (8, 40, 52)
    assert out["panoptic_seg"][0].shape == (40, 52)
    # weights were loaded: predictor's parameters equal the saved model's
    for (n, p), (_, q) in zip(model.state_dict().items(), predictor.model.state_dict().items()):
        assert torch.equal(p, q), n


def test_criterion_weights_follow_the_papers():
    crit = CMTDeepLabCriterion(num_classes=3, num_aux_outputs=1)
    assert crit.weight_dict == {
        "loss_pq_class": 3.0, "loss_pq_dice": 3.0, "loss_mask_id": 0.3, "loss_loc": 1.0,
        "loss_pq_class_0": 3.0, "loss_pq_dice_0": 3.0, "loss_mask_id_0": 0.3, "loss_loc_0": 1.0,
        "loss_insdis": 1.0, "loss_sem": 1.0,
    }  # fmt: skip


def test_config_nodes_and_head_registry(tiny_synthetic):
    cfg = _tiny_cfg(
        tiny_synthetic,
        **{"MODEL.MASK_CLS.DEEP_SUPERVISION": False, "MODEL.CMT_DEEPLAB.AUX_MATCHING": "per_layer"},
    )
    # one knob per fact: deep supervision is the shared MASK_CLS key; the backbone has its node
    assert "DEEP_SUPERVISION" not in cfg.MODEL.CMT_DEEPLAB
    assert "AXIAL_RESNET" not in cfg.MODEL.CMT_DEEPLAB and cfg.MODEL.AXIAL_RESNET.DEPTH == 50
    model = build_model(cfg)
    assert isinstance(model.sem_seg_head, CMTDeepLabDecoder)
    assert model.sem_seg_head.num_queries == 8
    assert not model.criterion.deep_supervision and model.criterion.aux_matching == "per_layer"
    assert not any(k.endswith("_0") for k in model.criterion.weight_dict)
    # the head is built by name from its own from_config
    shapes = model.backbone.output_shape()
    head = build_mask_cls_head(cfg, "CMTDeepLabDecoder", shapes)
    assert isinstance(head, CMTDeepLabDecoder) and head.mask_dim == 16
    cfg.MODEL.CMT_DEEPLAB.HEAD_NAME = "NoSuchHead"
    with pytest.raises(KeyError, match="MODEL.CMT_DEEPLAB.HEAD_NAME"):
        build_model(cfg)


def test_axial_resnet_reads_its_own_node():
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_backbone

    cfg = get_cfg()
    cfg.merge_from_list([
        "MODEL.BACKBONE.NAME", "AxialResNet",
        "MODEL.AXIAL_RESNET.STEM_CHANNELS", 8,
        "MODEL.AXIAL_RESNET.WIDTHS", [16, 32, 64, 128],
        "MODEL.AXIAL_RESNET.NUM_HEADS", 2,
        "MODEL.AXIAL_RESNET.OUT_FEATURES", ["res3", "res5"],
    ])  # fmt: skip
    backbone = build_backbone(cfg, ShapeSpec(channels=3))
    assert backbone.output_shape() == {
        "res3": ShapeSpec(channels=32, stride=8),
        "res5": ShapeSpec(channels=128, stride=32),
    }
    out = backbone(torch.randn(1, 3, 64, 96))
    assert out["res5"].shape == (1, 128, 2, 3)
