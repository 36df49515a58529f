"""The high-resolution synthetic split, the refinement mapper and the BIG registration.

A tiny twin of ``synthetic_highres_*`` (2 train scenes of 128 px, 2 val scenes of 384 px) is
generated once per module; BIG is a fake folder of two triplets written in a tmp dir.
"""

import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from PIL import Image

from seg_methods.config import get_cfg
from seg_methods.data.build import build_dataset_mapper
from seg_methods.data.datasets import datasets_root
from seg_methods.data.datasets.layout import DatasetLayoutError
from seg_methods.data.datasets.register_big import register_all_big, register_big
from seg_methods.data.datasets.synthetic_highres import (
    HighResConfig,
    register_synthetic_highres,
    render_highres_scene,
    scene_rng,
)
from seg_methods.evaluation.boundary import (
    RefinementEvaluator,
    intersection_union,
    mean_boundary_accuracy,
)

TINY = dict(num_train=2, num_val=2, train_size=128, val_size=384)


@pytest.fixture(scope="module")
def tiny_highres(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_highres") / "synthetic_highres"
    return register_synthetic_highres(
        "tiny_synthetic_highres", root=str(root), generate=True, num_workers=1, **TINY
    )


def _grey(path):
    return np.asarray(Image.open(path).convert("L"))


def _cfg(train_name, **input_refinement):
    cfg = get_cfg()
    cfg.INPUT.DATASET_MAPPER_NAME = "refinement"
    cfg.DATASETS.TRAIN = (train_name,)
    for k, v in input_refinement.items():
        cfg.INPUT.REFINEMENT[k] = v
    return cfg


def test_generation_is_deterministic():
    cfg = HighResConfig(**TINY)
    a = render_highres_scene(cfg, scene_rng(0, "val", 1), 256, True)
    b = render_highres_scene(cfg, scene_rng(0, "val", 1), 256, True)
    c = render_highres_scene(cfg, scene_rng(0, "val", 0), 256, True)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert np.array_equal(a.coarse, b.coarse)
    assert not np.array_equal(a.mask, c.mask)


def test_records_files_and_sizes(tiny_highres):
    assert MetadataCatalog.get(tiny_highres["val"]).evaluator_type == "refinement"
    for split, size in (("train", 128), ("val", 384)):
        records = DatasetCatalog.get(tiny_highres[split])
        assert len(records) == 2
        for r in records:
            assert (r["height"], r["width"]) == (size, size)
            assert Image.open(r["file_name"]).size == (size, size)
            gt = _grey(r["mask_file_name"])
            assert gt.shape == (size, size) and set(np.unique(gt)) == {0, 255}
            assert ("coarse_mask_file_name" in r) == (split == "val")


def test_thin_structures_and_holes_present(tiny_highres):
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))  # removes parts < 7 px wide
    for r in DatasetCatalog.get(tiny_highres["val"]):
        gt = (_grey(r["mask_file_name"]) > 128).astype(np.uint8)
        opened = cv2.morphologyEx(gt, cv2.MORPH_OPEN, kernel)
        thin = int((gt & (1 - opened)).sum())
        assert thin > 0.02 * gt.sum(), "branches / rings 2-6 px wide should be a visible share"
        # holes: background enclosed by the solid body (rings, also enclosing background, are
        # thin and gone after the opening)
        n_background = cv2.connectedComponents(1 - opened, connectivity=4)[0] - 1
        assert n_background >= 2, "holes (enclosed background) expected in the body"


def test_coarse_masks_differ_but_overlap(tiny_highres):
    for r in DatasetCatalog.get(tiny_highres["val"]):
        gt, coarse = _grey(r["mask_file_name"]), _grey(r["coarse_mask_file_name"])
        assert set(np.unique(coarse)) <= {0, 255}
        i, u = intersection_union(gt, coarse)
        assert 0.4 < i / u < 0.99
        assert mean_boundary_accuracy(gt, coarse) < 0.95


def test_train_mapper_pads_small_images_and_makes_coarse_online(tiny_highres):
    cfg = _cfg(tiny_highres["train"], COLOR_JITTER=False)
    cfg.INPUT.RANDOM_FLIP = "none"
    mapper = build_dataset_mapper(cfg, is_train=True)
    r = DatasetCatalog.get(tiny_highres["train"])[0]
    out = mapper(r)
    assert out["image"].shape == (3, 224, 224) and out["image"].dtype == torch.uint8
    assert out["gt_mask"].shape == (224, 224) and out["gt_mask"].dtype == torch.bool
    coarse = out["coarse_mask"]
    assert coarse.shape == (224, 224) and coarse.dtype == torch.float32
    assert 0.0 <= coarse.min() and coarse.max() <= 1.0
    gt = _grey(r["mask_file_name"]) > 128
    # 128 px image < 224 crop: the whole image at the top-left, zero padding elsewhere
    assert np.array_equal(out["gt_mask"][:128, :128].numpy(), gt)
    assert not out["gt_mask"][128:].any() and not coarse[:, 128:].any()
    image = read_image(r["file_name"], format=cfg.INPUT.FORMAT).transpose(2, 0, 1)
    assert np.array_equal(out["image"][:, :128, :128].numpy(), image)
    assert not torch.equal(coarse[:128, :128] > 0.5, out["gt_mask"][:128, :128])


def test_train_mapper_crops_the_same_window(tiny_highres):
    cfg = _cfg(tiny_highres["train"], CROP_SIZE=48, COLOR_JITTER=True)
    mapper = build_dataset_mapper(cfg, is_train=True)
    r = DatasetCatalog.get(tiny_highres["train"])[1]
    gt = _grey(r["mask_file_name"]) > 128
    windows = {
        gt[y : y + 48, x : x + 48][:, ::f].tobytes()
        for y in range(81)
        for x in range(81)
        for f in (1, -1)  # horizontal flip
    }
    for _ in range(3):
        out = mapper(r)
        assert out["image"].shape == (3, 48, 48)
        assert out["gt_mask"].numpy().tobytes() in windows


def test_train_mapper_takes_one_segment_of_semantic_records(tiny_synthetic, tiny_highres):
    # records without mask_file_name: the mask_former pipeline + coarse_mask generator
    cfg = _cfg(tiny_synthetic["sem_seg_train"])
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (64,), 64
    cfg.INPUT.EXTRA_TARGETS = ["coarse_mask"]  # named twice: still one generator
    mapper = build_dataset_mapper(cfg, is_train=True)
    r = DatasetCatalog.get(tiny_synthetic["sem_seg_train"])[0]
    out = mapper(r)
    assert out["gt_mask"].shape == out["coarse_mask"].shape == out["image"].shape[1:]
    sem = torch.from_numpy(_grey(r["sem_seg_file_name"]).astype(np.int64))
    flips = (sem, sem.flip(-1))  # INPUT.RANDOM_FLIP
    assert any(torch.equal(out["gt_mask"], s == c) for s in flips for c in sem.unique())
    # a high-resolution record in the same mapper takes the refinement pipeline
    hr = DatasetCatalog.get(tiny_highres["train"])[0]
    assert mapper(hr)["image"].shape == (3, 224, 224)


def test_test_mapper_full_resolution_and_stored_coarse(tiny_highres):
    mapper = build_dataset_mapper(_cfg(tiny_highres["train"]), is_train=False)
    r = DatasetCatalog.get(tiny_highres["val"])[0]
    out = mapper(r)
    assert out["image"].shape == (3, 384, 384)
    stored = _grey(r["coarse_mask_file_name"]).astype(np.float32) / 255.0
    assert np.array_equal(out["coarse_mask"].numpy(), stored)
    assert np.array_equal(out["gt_mask"].numpy(), _grey(r["mask_file_name"]) > 128)
    # a coarse mask given in the record (e.g. another model's output) is used instead
    given = dict(r, coarse_mask=np.full((384, 384), 0.25, np.float32))
    assert torch.all(mapper(given)["coarse_mask"] == 0.25)


def test_coarse_size_mismatch_names_both_files(tiny_highres, tmp_path):
    mapper = build_dataset_mapper(_cfg(tiny_highres["train"]), is_train=False)
    r = DatasetCatalog.get(tiny_highres["val"])[0]
    wrong = tmp_path / "wrong_seg.png"
    Image.fromarray(np.zeros((100, 120), np.uint8)).save(wrong)
    with pytest.raises(ValueError) as e:
        mapper(dict(r, coarse_mask_file_name=str(wrong)))
    msg = str(e.value)
    assert str(wrong) in msg and r["file_name"] in msg and "120x100" in msg and "384x384" in msg
    with pytest.raises(ValueError, match="coarse_mask of the record.*384x384"):
        mapper(dict(r, coarse_mask=np.zeros((10, 10), np.float32)))
    no_coarse = {k: v for k, v in r.items() if k != "coarse_mask_file_name"}
    with pytest.raises(KeyError, match="coarse_mask_file_name"):
        mapper(no_coarse)


def _fake_big(folder, names, size=(40, 30)):
    os.makedirs(folder, exist_ok=True)
    w, h = size
    for k, n in enumerate(names):
        gt = np.zeros((h, w), np.uint8)
        gt[5 : 20 + k, 8:30] = 255
        seg = np.zeros_like(gt)
        seg[6:18, 8:28] = 255
        Image.fromarray(np.full((h, w, 3), 90 + k, np.uint8)).save(
            os.path.join(folder, f"{n}_im.jpg")
        )
        Image.fromarray(gt).save(os.path.join(folder, f"{n}_gt.png"))
        Image.fromarray(seg).save(os.path.join(folder, f"{n}_seg.png"))


def test_big_registration_on_fake_layout(tmp_path):
    _fake_big(str(tmp_path / "BIG" / "test"), ["dog_3", "kite_12"])
    try:
        register_all_big(str(tmp_path))
        records = DatasetCatalog.get("big_test")
        assert [r["image_id"] for r in records] == ["dog_3", "kite_12"]
        assert (records[0]["height"], records[0]["width"]) == (30, 40)
        assert records[1]["coarse_mask_file_name"].endswith("kite_12_seg.png")
        assert MetadataCatalog.get("big_test").evaluator_type == "refinement"
        # the val folder is missing: the error names it
        with pytest.raises(DatasetLayoutError, match=str(tmp_path / "BIG" / "val")):
            DatasetCatalog.get("big_val")
        # mapper + evaluator end to end: an oracle refinement, the stored coarse masks
        mapper = build_dataset_mapper(_cfg("big_test"), is_train=False)
        evaluator = RefinementEvaluator("big_test", distributed=False)
        evaluator.reset()
        for r in records:
            x = mapper(r)
            evaluator.process([x], [{"refined_mask": x["gt_mask"].float()}])
        res = evaluator.evaluate()["refinement"]
        assert res["IoU"] == 100.0 and res["mBA"] == 100.0
        assert 0 < res["coarse_IoU"] < 100 and 0 < res["coarse_mBA"] < 100
        # a missing coarse mask is named
        os.remove(tmp_path / "BIG" / "test" / "kite_12_seg.png")
        with pytest.raises(DatasetLayoutError, match="kite_12_seg.png"):
            DatasetCatalog.get("big_test")
    finally:
        register_all_big(datasets_root())  # restore the default registration


def test_big_with_coarse_masks_of_another_folder(tmp_path):
    _fake_big(str(tmp_path / "images"), ["a_1"])
    _fake_big(str(tmp_path / "pspnet"), ["a_1"])
    name = "test_big_pspnet_fake"
    register_big(name, str(tmp_path / "images"), coarse_root=str(tmp_path / "pspnet"))
    try:
        (r,) = DatasetCatalog.get(name)
        assert r["coarse_mask_file_name"] == str(tmp_path / "pspnet" / "a_1_seg.png")
        assert r["mask_file_name"] == str(tmp_path / "images" / "a_1_gt.png")
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
