"""IoU and mean boundary accuracy (mBA) of seg_methods.evaluation.boundary, hand-computed cases.

Worked case used below (10 x 10 image, so every mBA radius is 1 and the kernel is the 3 x 3
cross): the ground truth is the 4 x 4 square rows 3-6, cols 3-6. Its dilation by the cross adds
one 4-pixel strip on each side (32 pixels), its erosion keeps the 2 x 2 centre (4 pixels), so the
boundary band has 28 pixels: the 12-pixel inner ring and the 16 pixels of the 4 outer strips.
The prediction is the square shifted one column right (cols 4-7). Wrong in the band: the inner
ring's left column (4 pixels) and the right outer strip (4 pixels): BA = 20 / 28 = 5 / 7.
IoU = 12 / 20.
"""

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from seg_methods.config import get_cfg
from seg_methods.evaluation import rows as row_evaluators
from seg_methods.evaluation.boundary import (
    RefinementEvaluator,
    binarize,
    boundary_accuracy,
    boundary_band,
    intersection_union,
    mba_radii,
    mean_boundary_accuracy,
)
from seg_methods.evaluation.build import build_evaluator
from seg_methods.evaluation.requirements import evaluation_problems


def _square(h=10, w=10, rows=(3, 7), cols=(3, 7)):
    m = np.zeros((h, w), dtype=bool)
    m[rows[0] : rows[1], cols[0] : cols[1]] = True
    return m


def test_radii_follow_cascadepsp_formula():
    # r_max = (H + W) / 300; r_i = 1 + int((r_max - 1) / 5 * i)
    assert mba_radii(2048, 2048) == [1, 3, 6, 8, 11]
    assert mba_radii(1024, 1024) == [1, 2, 3, 4, 5]
    # below H + W = 600 (r_max < 1) int() truncates the negative steps to 0: all radii are 1
    assert mba_radii(100, 100) == [1, 1, 1, 1, 1]
    assert mba_radii(1, 1499) == [1, 1, 2, 3, 4]


def test_band_and_accuracy_on_hand_built_square():
    gt = _square()
    band = boundary_band(gt, 1)
    assert band.sum() == 28
    assert (band & gt).sum() == 12  # inner ring
    pred = _square(cols=(4, 8))
    assert boundary_accuracy(gt, pred, 1) == pytest.approx(5 / 7)
    assert mean_boundary_accuracy(gt, pred) == pytest.approx(5 / 7)
    assert intersection_union(gt, pred) == (12, 20)
    # probabilities and 0..255 masks are binarised like the official "png > 128"
    assert mean_boundary_accuracy(gt.astype(np.uint8) * 255, pred * 0.9) == pytest.approx(5 / 7)


def test_radii_scale_with_image_on_straight_edge():
    # A straight vertical edge: the band at radius r is the 2r columns around it. Shifting the
    # prediction by one column makes one of them wrong: BA_r = 1 - 1 / (2r), radii 1..5 at 1024.
    gt = np.zeros((1024, 1024), dtype=bool)
    gt[:, :512] = True
    pred = np.zeros_like(gt)
    pred[:, :513] = True
    for r in (1, 3, 5):
        assert boundary_band(gt, r).sum() == 1024 * 2 * r
        assert boundary_accuracy(gt, pred, r) == pytest.approx(1 - 1 / (2 * r))
    expected = np.mean([1 - 1 / (2 * r) for r in (1, 2, 3, 4, 5)])
    assert mean_boundary_accuracy(gt, pred) == pytest.approx(expected)


def test_perfect_prediction_is_one():
    gt = _square(64, 80, rows=(5, 40), cols=(10, 70))
    gt[20:22, :] = True  # a thin bar too
    assert mean_boundary_accuracy(gt, gt.copy()) == 1.0
    assert mean_boundary_accuracy(gt, gt.astype(np.float32)) == 1.0


@pytest.mark.parametrize("value", [False, True])
def test_constant_masks_are_defined(value):
    gt = np.full((10, 10), value)
    assert mean_boundary_accuracy(gt, gt.copy()) == 1.0  # both constant and equal
    assert mean_boundary_accuracy(gt, ~gt) == 0.0  # both constant, different
    i, u = intersection_union(gt, gt)
    assert (i, u) == ((100, 100) if value else (0, 0))


def test_constant_ground_truth_uses_the_prediction_band():
    # All-background ground truth, a 4x4 false positive: the 28-pixel band of the prediction,
    # whose 12-pixel inner ring is wrong: 16 / 28.
    gt = np.zeros((10, 10), dtype=bool)
    acc = mean_boundary_accuracy(gt, _square())
    assert np.isfinite(acc)
    assert acc == pytest.approx(16 / 28)


def test_object_smaller_than_kernel():
    # One foreground pixel: the erosion is empty, the band is the 5-pixel cross around it.
    gt = np.zeros((64, 64), dtype=bool)
    gt[30, 30] = True
    assert boundary_band(gt, 1).sum() == 5
    assert mean_boundary_accuracy(gt, np.zeros_like(gt)) == pytest.approx(4 / 5)
    assert mean_boundary_accuracy(gt, gt.copy()) == 1.0


def test_image_smaller_than_kernel():
    # 1 x 1499 image: radii [1, 1, 2, 3, 4], kernels up to 9 x 9, taller than the image. Outside
    # the image the dilation sees background and the erosion foreground, so the band of a
    # 10-pixel segment is its 2r pixels either side of each end (4r), and a one-pixel shift
    # makes 2 of them wrong.
    gt = np.zeros((1, 1499), dtype=bool)
    gt[0, 700:710] = True
    shifted = np.roll(gt, 1, axis=1)
    assert mean_boundary_accuracy(gt, gt.copy()) == 1.0
    expected = np.mean([(4 * r - 2) / (4 * r) for r in (1, 1, 2, 3, 4)])
    assert mean_boundary_accuracy(gt, shifted) == pytest.approx(expected)


def test_shape_mismatch_and_bad_rank_raise():
    with pytest.raises(ValueError, match="differ"):
        boundary_accuracy(np.zeros((4, 4), bool), np.zeros((4, 5), bool), 1)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        binarize(np.zeros((2, 4, 4)))


def _run(evaluator, inputs, outputs):
    evaluator.reset()
    evaluator.process(inputs, outputs)
    return evaluator.evaluate()["refinement"]


def test_evaluator_pools_iou_and_averages_mba():
    # Image A: 10x10 square, coarse = the shifted square, refined = perfect.
    # Image B: 10x10, ground truth one 2x2 block, coarse = perfect, refined = empty.
    gt_a, gt_b = _square(), _square(rows=(4, 6), cols=(4, 6))
    coarse_a = _square(cols=(4, 8)).astype(np.float32)
    inputs = [
        {
            "file_name": "a.jpg",
            "height": 10,
            "width": 10,
            "gt_mask": torch.from_numpy(gt_a),
            "coarse_mask": torch.from_numpy(coarse_a),
        },
        {
            "file_name": "b.jpg",
            "height": 10,
            "width": 10,
            "gt_mask": torch.from_numpy(gt_b),
            "coarse_mask": torch.from_numpy(gt_b.astype(np.float32)),
        },
    ]
    outputs = [
        {"refined_mask": torch.from_numpy(gt_a.astype(np.float32) * 0.8 + 0.1)},
        {"refined_mask": torch.zeros(10, 10)},
    ]
    res = _run(RefinementEvaluator("fake", distributed=False), inputs, outputs)
    # refined: pooled (16 + 0) / (16 + 4) = 80 %, not the 50 % mean of the per-image IoUs
    assert res["IoU"] == pytest.approx(80.0)
    # refined mBA: (1 + BA_B) / 2 with B empty: band of the 2x2 block = 4 + 8 = 12 pixels, the
    # 4 block pixels wrong -> 8/12
    assert res["mBA"] == pytest.approx(100 * (1 + 8 / 12) / 2)
    # coarse: A has 12 / 20, B is perfect (4 / 4): pooled 16 / 24; mBA (5/7 + 1) / 2
    assert res["coarse_IoU"] == pytest.approx(100 * 16 / 24)
    assert res["coarse_mBA"] == pytest.approx(100 * (5 / 7 + 1) / 2)
    assert res["delta_mBA"] == pytest.approx(res["mBA"] - res["coarse_mBA"])
    assert res["num_images"] == 2


def test_evaluator_reads_files_and_sem_seg(tmp_path):
    gt = _square()
    Image.fromarray(gt.astype(np.uint8) * 255).save(tmp_path / "a_gt.png")
    Image.fromarray(_square(cols=(4, 8)).astype(np.uint8) * 255).save(tmp_path / "a_seg.png")
    x = {
        "file_name": str(tmp_path / "a_im.jpg"),
        "height": 10,
        "width": 10,
        "mask_file_name": str(tmp_path / "a_gt.png"),
        "coarse_mask_file_name": str(tmp_path / "a_seg.png"),
    }
    p = torch.from_numpy(gt.astype(np.float32))
    res = _run(
        RefinementEvaluator("fake", distributed=False), [x], [{"sem_seg": torch.stack([1 - p, p])}]
    )
    assert res["IoU"] == 100.0 and res["mBA"] == 100.0
    assert res["coarse_IoU"] == pytest.approx(60.0)
    assert res["coarse_mBA"] == pytest.approx(500 / 7)
    with pytest.raises(KeyError, match="refined_mask"):
        _run(
            RefinementEvaluator("fake", distributed=False),
            [x],
            [{"sem_seg": torch.zeros(3, 10, 10)}],
        )
    bad = {k: v for k, v in x.items() if k != "mask_file_name"}
    with pytest.raises(KeyError, match="mask_file_name"):
        _run(RefinementEvaluator("fake", distributed=False), [bad], [{"refined_mask": p}])


def test_build_evaluator_selects_refinement():
    name = "test_boundary_refinement_fake"
    MetadataCatalog.get(name).set(evaluator_type="refinement")
    try:
        cfg = get_cfg()
        evaluators = build_evaluator(cfg, name, output_folder="unused")
        assert [type(e).__name__ for e in evaluators._evaluators] == ["RefinementEvaluator"]
    finally:
        MetadataCatalog.remove(name)


def test_requirements_check_names_the_missing_ground_truth():
    name = "test_boundary_refinement_no_gt"
    DatasetCatalog.register(name, lambda: [{"file_name": "a_im.jpg", "height": 4, "width": 4}])
    MetadataCatalog.get(name).set(evaluator_type="refinement")
    try:
        (problem,) = evaluation_problems(get_cfg(), name)
        assert "RefinementEvaluator" in problem and "mask_file_name" in problem
        assert "TEST.SEMANTIC_ON=False" in problem
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _two_images():
    """(inputs, outputs) of test_evaluator_pools_iou_and_averages_mba, one image per rank."""
    gt_a, gt_b = _square(), _square(rows=(4, 6), cols=(4, 6))
    inputs = [
        {
            "file_name": "a.jpg",
            "gt_mask": torch.from_numpy(gt_a),
            "coarse_mask": torch.from_numpy(_square(cols=(4, 8)).astype(np.float32)),
        },
        {
            "file_name": "b.jpg",
            "gt_mask": torch.from_numpy(gt_b),
            "coarse_mask": torch.from_numpy(gt_b.astype(np.float32)),
        },
    ]
    outputs = [
        {"refined_mask": torch.from_numpy(gt_a.astype(np.float32))},
        {"refined_mask": torch.zeros(10, 10)},
    ]
    return inputs, outputs


def test_distributed_evaluate_gathers_every_rank(monkeypatch):
    """Rank 0 scores the rows of every rank (comm.gather simulated: two real processes cost
    40 s here; the gather convention is the one tests/evaluation/test_distributed_evaluation.py
    checks end to end for the other evaluators)."""
    inputs, outputs = _two_images()
    single = _run(RefinementEvaluator("fake", distributed=False), inputs, outputs)
    rank1 = RefinementEvaluator("fake", distributed=False)
    rank1.process(inputs[1:], outputs[1:])
    monkeypatch.setattr(row_evaluators.comm, "synchronize", lambda: None)
    monkeypatch.setattr(row_evaluators.comm, "gather", lambda rows, dst=0: [rows, rank1._rows])
    monkeypatch.setattr(row_evaluators.comm, "is_main_process", lambda: True)
    rank0 = RefinementEvaluator("fake", distributed=True)
    gathered = _run(rank0, inputs[:1], outputs[:1])
    assert gathered == pytest.approx(dict(single))
    assert _run(RefinementEvaluator("fake", distributed=False), inputs[:1], outputs[:1])[
        "IoU"
    ] != pytest.approx(single["IoU"])
    monkeypatch.setattr(row_evaluators.comm, "is_main_process", lambda: False)
    rank0.reset()
    rank0.process(inputs[:1], outputs[:1])
    assert rank0.evaluate() == {}
