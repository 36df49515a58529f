"""Superpixel metrics (ASA, CO) on hand-built segmentations, the region readers (PNG and BSDS500
.mat) and the evaluator."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from seg_methods.data.datasets.superpixel import read_regions
from seg_methods.evaluation.superpixel import (
    SuperpixelEvaluator,
    achievable_segmentation_accuracy,
    compactness,
)

# ground truth: left 4 columns = segment 7, right 2 columns = segment 3 (4 x 6 image)
GT = np.array([[7, 7, 7, 7, 3, 3]] * 4)


def test_asa_perfect_and_single_superpixel():
    assert achievable_segmentation_accuracy(GT, GT) == 1.0
    # superpixels that refine the ground truth are perfect too
    assert achievable_segmentation_accuracy(np.arange(24).reshape(4, 6), GT) == 1.0
    # one superpixel: best label covers 16 of 24 pixels
    assert achievable_segmentation_accuracy(np.zeros((4, 6), int), GT) == pytest.approx(16 / 24)


def test_asa_hand_computed_straddling_superpixels():
    # three vertical superpixels of 2 columns: cols 0-1 | 2-3 | 4-5 -> all pure -> 1.0
    sp = np.repeat(np.array([[0, 0, 1, 1, 2, 2]]), 4, axis=0)
    assert achievable_segmentation_accuracy(sp, GT) == 1.0
    # cols 0-2 | 3-5: second one straddles (1 column of 7, 2 of 3) -> (12 + 8) / 24
    sp = np.repeat(np.array([[0, 0, 0, 1, 1, 1]]), 4, axis=0)
    assert achievable_segmentation_accuracy(sp, GT) == pytest.approx(20 / 24)


def test_asa_ignores_void_ground_truth():
    gt = GT.copy()
    gt[:, 3] = -1  # void column
    sp = np.repeat(np.array([[0, 0, 0, 1, 1, 1]]), 4, axis=0)
    # valid pixels: 20; superpixel 0: 12 pixels of 7; superpixel 1: 8 valid pixels of 3
    assert achievable_segmentation_accuracy(sp, gt) == 1.0
    assert achievable_segmentation_accuracy(sp, np.full((4, 6), -1)) == 1.0
    with pytest.raises(ValueError, match="differ"):
        achievable_segmentation_accuracy(sp, GT[:, :5])


def test_compactness_squares_and_strips():
    # four 2x2 squares in a 4x4 image: area 4, perimeter 8 (border and neighbours) -> pi / 4
    squares = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    assert compactness(squares) == pytest.approx(math.pi / 4)
    # four 1x4 horizontal strips: area 4, perimeter 2 * (1 + 4) = 10 -> 4 pi 4 / 100
    strips = np.repeat(np.arange(4)[:, None], 4, axis=1)
    assert compactness(strips) == pytest.approx(16 * math.pi / 100)
    # the whole 4x4 image as one superpixel: area 16, perimeter 16 -> pi / 4
    assert compactness(np.zeros((4, 4), int)) == pytest.approx(math.pi / 4)


def test_compactness_mixed_hand_computed():
    # 3 x 3: a 2x2 square (id 5) in the top-left corner, the L-shaped rest (id 9)
    sp = np.array([[5, 5, 9], [5, 5, 9], [9, 9, 9]])
    # square: A = 4, P = 8 -> Q = pi / 4
    # L: A = 5; edges: border 3 (right) + 3 (bottom) + 1 (top) + 1 (left) = 8, to square 4 -> 12
    q_square = 4 * math.pi * 4 / 64
    q_l = 4 * math.pi * 5 / 144
    assert compactness(sp) == pytest.approx((4 * q_square + 5 * q_l) / 9)


def test_read_regions_png_and_bsds_mat(tmp_path):
    png = tmp_path / "r.png"
    Image.fromarray(np.array([[1000, 2], [2, 65535]], dtype=np.uint16)).save(png)
    maps = read_regions(str(png))
    assert len(maps) == 1 and maps[0].tolist() == [[1000, 2], [2, 65535]]

    scipy_io = pytest.importorskip("scipy.io")
    a1 = np.array([[1, 1, 2], [1, 1, 2]], dtype=np.uint16)
    a2 = np.array([[1, 2, 2], [1, 2, 2]], dtype=np.uint16)
    cells = np.empty((1, 2), dtype=object)
    for i, seg in enumerate((a1, a2)):
        s = np.empty((1, 1), dtype=[("Segmentation", object), ("Boundaries", object)])
        s[0, 0]["Segmentation"] = seg
        s[0, 0]["Boundaries"] = np.zeros_like(seg, dtype=bool)
        cells[0, i] = s
    mat = tmp_path / "100007.mat"
    scipy_io.savemat(str(mat), {"groundTruth": cells})
    maps = read_regions(str(mat))
    assert [m.tolist() for m in maps] == [a1.tolist(), a2.tolist()]


def test_evaluator_averages_over_annotators_and_images(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    a1 = np.array([[1, 1, 2, 2]] * 2, dtype=np.uint16)
    a2 = np.array([[1, 2, 2, 2]] * 2, dtype=np.uint16)
    cells = np.empty((1, 2), dtype=object)
    for i, seg in enumerate((a1, a2)):
        s = np.empty((1, 1), dtype=[("Segmentation", object)])
        s[0, 0]["Segmentation"] = seg
        cells[0, i] = s
    mat = tmp_path / "img.mat"
    scipy_io.savemat(str(mat), {"groundTruth": cells})
    png = tmp_path / "img.png"
    Image.fromarray(a1).save(png)

    ev = SuperpixelEvaluator("unused", distributed=False)
    ev.reset()
    pred = torch.tensor([[0, 0, 1, 1]] * 2)
    ev.process(
        [{"regions_file_name": str(mat)}, {"regions_file_name": str(png)}],
        [{"superpixels": pred}, {"superpixels": pred}],
    )
    res = ev.evaluate()["superpixel"]
    # image 1: ASA 1.0 w.r.t. a1, 6/8 w.r.t. a2 -> 0.875; image 2: 1.0 -> mean 0.9375
    assert res["ASA"] == pytest.approx(100 * 0.9375)
    # two 2x2 squares: CO = pi / 4
    assert res["CO"] == pytest.approx(100 * math.pi / 4)
    assert res["num_superpixels"] == 2.0
    with pytest.raises(KeyError, match="superpixels"):
        ev.process([{"regions_file_name": str(png)}], [{"sem_seg": pred}])
