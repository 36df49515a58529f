"""Tests of the synthetic dataset (generator, files, registration) and of the real registrations.

Everything runs on tiny variants (64x64 images, a handful of scenes).
"""

import dataclasses
import hashlib
import json
import os

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from seg_methods.data.datasets import _synthetic
from seg_methods.data.datasets.layout import DatasetLayoutError, check_layout
from seg_methods.data.datasets.panoptic_utils import (
    ids_to_rgb,
    mask_bbox_xywh,
    read_panoptic_png,
    rgb_to_ids,
)
from seg_methods.data.datasets.synthetic import (
    ALL_CLASSES,
    NUM_THINGS,
    SyntheticConfig,
    generate_synthetic_dataset,
    is_generated,
    register_synthetic,
    render_scene,
    scene_rng,
    split_paths,
)

TINY = SyntheticConfig(num_train=4, num_val=2, height=64, width=64, seed=3)


def _tree_hashes(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            path = os.path.join(d, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def scenes():
    """40 in-memory 64x64 scenes (default generator parameters otherwise)."""
    cfg = dataclasses.replace(SyntheticConfig(), height=64, width=64)
    return cfg, [render_scene(cfg, scene_rng(7, "train", i)) for i in range(40)]


# ------------------------------------------------------------------------------ generator
def test_generation_is_deterministic(tmp_path):
    a = generate_synthetic_dataset(str(tmp_path / "a"), TINY, num_workers=1)
    b = generate_synthetic_dataset(str(tmp_path / "b"), TINY, num_workers=2)
    assert a["generated"] and b["generated"]
    ha, hb = _tree_hashes(a["root"]), _tree_hashes(b["root"])
    assert len(ha) == 1 + 4 * (4 + 2) + 4  # params, 4 files per image, 2 jsons per split
    assert ha == hb
    c = generate_synthetic_dataset(
        str(tmp_path / "c"), dataclasses.replace(TINY, seed=4), num_workers=1
    )
    hc = _tree_hashes(c["root"])
    assert ha["train/000000.jpg"] != hc["train/000000.jpg"]


def test_params_file_controls_regeneration(tmp_path):
    root = str(tmp_path / "syn")
    assert generate_synthetic_dataset(root, TINY, num_workers=1)["generated"]
    assert is_generated(root, TINY)
    assert not generate_synthetic_dataset(root, TINY, num_workers=1)["generated"]  # reused
    other = dataclasses.replace(TINY, num_train=3)
    assert not is_generated(root, other)
    assert generate_synthetic_dataset(root, other, num_workers=1)["generated"]
    assert is_generated(root, other) and not is_generated(root, TINY)
    assert len(os.listdir(os.path.join(root, "train"))) == 3
    assert os.listdir(tmp_path) == ["syn"]  # no temporary or stale folder left


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = _synthetic._write_one

    def failing(job):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(job)

    monkeypatch.setattr(_synthetic, "_write_one", failing)
    root = str(tmp_path / "syn")
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic_dataset(root, TINY, num_workers=1)
    assert os.listdir(tmp_path) == []
    assert not is_generated(root, TINY)


def test_every_image_has_several_instances_within_area_bounds(scenes):
    cfg, all_scenes = scenes
    hw = cfg.height * cfg.width
    counts = []
    for s in all_scenes:
        things = [seg for seg in s.segments_info if seg["isthing"]]
        counts.append(len(things))
        assert len(things) == len(s.instance_classes)  # no instance fully hidden
        for seg in things:
            assert 0.03 <= seg["area"] / hw <= 0.30
        for full in s.instance_full_areas:
            assert full / hw <= 0.30
    assert min(counts) >= 2 and max(counts) <= 8
    assert len(set(counts)) >= 4  # the count varies


def test_same_class_instances_touch_and_occlude(scenes):
    _, all_scenes = scenes
    touching_pairs, occluded = [], 0
    kernel = np.ones((3, 3), np.uint8)
    for s in all_scenes:
        things = [seg for seg in s.segments_info if seg["isthing"]]
        n = 0
        for i, a in enumerate(things):
            grown = cv2.dilate((s.panoptic == a["id"]).astype(np.uint8), kernel).astype(bool)
            for b in things[i + 1 :]:
                if a["category_id"] == b["category_id"] and (grown & (s.panoptic == b["id"])).any():
                    n += 1
        touching_pairs.append(n)
        # painting index k is the last digits of the id; full area > visible area = occluded
        visible = {seg["id"] % 1000: seg["area"] for seg in things}
        occluded += any(full > visible[k + 1] for k, full in enumerate(s.instance_full_areas))
    assert np.mean(np.array(touching_pairs) > 0) >= 0.6
    # Measured on these scenes: 3.45 touching same-class pairs per scene with the default
    # group_prob=0.5, 1.5 with group_prob=0 (chance contacts only).
    assert np.mean(touching_pairs) >= 2.5
    assert occluded >= 0.5 * len(all_scenes)


def test_stuff_class_is_encoded_by_texture_not_colour(scenes):
    _, all_scenes = scenes
    feats, labels, stds = [], [], []
    for s in all_scenes:
        img = s.image.astype(np.float64)
        for r in np.unique(s.regions).tolist():
            m = s.regions == r
            seg_id = int(np.unique(s.panoptic[m])[0])
            cat = seg_id // 1000 - 1
            if cat < NUM_THINGS or m.sum() < 100:
                continue
            feats.append(img[m].mean(0))
            stds.append(img[m].std(0).max())
            labels.append(cat - NUM_THINGS)
    feats, labels = np.array(feats), np.array(labels)
    assert len(set(labels.tolist())) == 4 and len(labels) >= 100
    # textured: strong colour variation inside every region
    assert np.median(stds) > 30
    # colours random: per class, the region-mean colours spread widely around mid-grey ...
    for c in range(4):
        f = feats[labels == c]
        assert np.all(np.abs(f.mean(0) - 127.5) < 30), f.mean(0)
        assert np.all(f.std(0) > 25)
    # ... and a nearest-centroid classifier on mean colour is close to chance (0.25)
    half = len(labels) // 2
    centroids = np.stack([feats[:half][labels[:half] == c].mean(0) for c in range(4)])
    pred = np.argmin(((feats[half:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == labels[half:]).mean() < 0.45


def test_thing_colours_are_random(scenes):
    _, all_scenes = scenes
    means = {c: [] for c in range(NUM_THINGS)}
    for s in all_scenes:
        for seg in s.segments_info:
            if seg["isthing"]:
                means[seg["category_id"] - 1].append(s.image[s.panoptic == seg["id"]].mean(0))
    for c, m in means.items():
        m = np.array(m)
        assert len(m) >= 10
        assert np.all(np.abs(m.mean(0) - 127.5) < 35) and np.all(m.std(0) > 25)


# ------------------------------------------------------------------------------ files
def _pan_json(names, split):
    with open(MetadataCatalog.get(names[f"panoptic_{split}"]).panoptic_json) as f:
        return json.load(f)


@pytest.mark.parametrize("split", ["train", "val"])
def test_panoptic_png_matches_json(tiny_synthetic, split):
    pan = _pan_json(tiny_synthetic, split)
    meta = MetadataCatalog.get(tiny_synthetic[f"panoptic_{split}"])
    cats = {c["id"]: c for c in pan["categories"]}
    assert len(pan["images"]) == len(pan["annotations"]) == {"train": 8, "val": 4}[split]
    for ann in pan["annotations"]:
        ids = read_panoptic_png(os.path.join(meta.panoptic_root, ann["file_name"]))
        assert ids.shape == (64, 64)
        present = set(np.unique(ids).tolist()) - {0}
        assert present == {s["id"] for s in ann["segments_info"]}
        for s in ann["segments_info"]:
            m = ids == s["id"]
            assert s["area"] == int(m.sum())
            assert s["bbox"] == mask_bbox_xywh(m)
            assert s["iscrowd"] == 0
            assert s["category_id"] == s["id"] // 1000 and s["category_id"] in cats
        n_things = sum(cats[s["category_id"]]["isthing"] for s in ann["segments_info"])
        assert 2 <= n_things <= 8


def test_semantic_png_equals_panoptic_categories(tiny_synthetic):
    for d in DatasetCatalog.get(tiny_synthetic["panoptic_val"]):
        ids = read_panoptic_png(d["pan_seg_file_name"])
        sem = np.asarray(Image.open(d["sem_seg_file_name"]))
        assert sem.dtype == np.uint8
        expected = np.full(ids.shape, 255, np.uint8)
        for s in d["segments_info"]:  # contiguous ids in the dicts
            expected[ids == s["id"]] = s["category_id"]
        np.testing.assert_array_equal(sem, expected)
        assert sem.max() < len(ALL_CLASSES)


def test_instance_json_matches_panoptic(tiny_synthetic):
    from pycocotools.coco import COCO

    meta = MetadataCatalog.get(tiny_synthetic["panoptic_train"])
    coco = COCO(meta.json_file)
    assert sorted(coco.getCatIds()) == list(range(1, NUM_THINGS + 1))
    pan = _pan_json(tiny_synthetic, "train")
    for ann in pan["annotations"]:
        ids = read_panoptic_png(os.path.join(meta.panoptic_root, ann["file_name"]))
        things = [s for s in ann["segments_info"] if s["category_id"] <= NUM_THINGS]
        inst = coco.loadAnns(coco.getAnnIds(imgIds=[ann["image_id"]]))
        assert len(inst) == len(things)
        for s in things:
            target = ids == s["id"]
            match = [a for a in inst if np.array_equal(coco.annToMask(a).astype(bool), target)]
            assert len(match) == 1
            a = match[0]
            assert a["category_id"] == s["category_id"] and a["iscrowd"] == 0
            assert a["area"] == s["area"] and a["bbox"] == s["bbox"]
            assert isinstance(a["segmentation"]["counts"], str)  # compressed RLE


def test_region_maps_refine_panoptic(tiny_synthetic):
    for d in DatasetCatalog.get(tiny_synthetic["panoptic_val"]):
        regions = cv2.imread(d["regions_file_name"], cv2.IMREAD_UNCHANGED)
        assert regions.dtype == np.uint16 and regions.min() >= 1
        ids = read_panoptic_png(d["pan_seg_file_name"])
        # every region lies inside a single panoptic segment
        for r in np.unique(regions).tolist():
            assert len(np.unique(ids[regions == r])) == 1
        assert len(np.unique(regions)) >= len(np.unique(ids))


# ------------------------------------------------------------------------------ registration
def test_registered_dicts_and_metadata(tiny_synthetic):
    pan = DatasetCatalog.get(tiny_synthetic["panoptic_train"])
    assert len(pan) == 8
    d = pan[0]
    for key in (
        "file_name",
        "image_id",
        "height",
        "width",
        "pan_seg_file_name",
        "sem_seg_file_name",
    ):
        assert key in d
    assert d["file_name"].endswith(".jpg") and os.path.isfile(d["file_name"])
    assert Image.open(d["file_name"]).size == (64, 64)
    for s in d["segments_info"]:
        assert set(s) >= {"id", "category_id", "iscrowd", "area", "bbox", "isthing"}
        assert s["isthing"] == (s["category_id"] < NUM_THINGS)
        assert 0 <= s["category_id"] < len(ALL_CLASSES)

    meta = MetadataCatalog.get(tiny_synthetic["panoptic_train"])
    assert meta.evaluator_type == "coco_panoptic_seg"
    assert meta.thing_classes == list(ALL_CLASSES[:NUM_THINGS])
    assert meta.stuff_classes == list(ALL_CLASSES)
    assert len(meta.thing_colors) == 4 and len(meta.stuff_colors) == 8
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2, 4: 3}
    assert meta.stuff_dataset_id_to_contiguous_id == {i + 1: i for i in range(8)}
    assert meta.ignore_label == 255 and meta.label_divisor == 1000
    for key in ("panoptic_root", "panoptic_json", "json_file", "sem_seg_root", "image_root"):
        assert os.path.exists(getattr(meta, key)), key
    h = meta.class_hierarchy
    assert [len(n) for n in h["names"]] == [8, 4, 2]
    assert h["names"][2][h["parents"][1][h["parents"][0][0]]] == "thing"  # ellipse
    assert h["names"][2][h["parents"][1][h["parents"][0][5]]] == "stuff"  # checker

    sem = DatasetCatalog.get(tiny_synthetic["sem_seg_val"])
    assert len(sem) == 4 and set(sem[0]) >= {"file_name", "sem_seg_file_name", "height", "width"}
    smeta = MetadataCatalog.get(tiny_synthetic["sem_seg_val"])
    assert smeta.evaluator_type == "sem_seg" and smeta.stuff_classes == list(ALL_CLASSES)
    assert smeta.ignore_label == 255

    inst = DatasetCatalog.get(tiny_synthetic["instance_val"])
    imeta = MetadataCatalog.get(tiny_synthetic["instance_val"])
    assert imeta.evaluator_type == "coco" and os.path.isfile(imeta.json_file)
    assert len(inst) == 4
    for r in inst:
        assert 2 <= len(r["annotations"]) <= 8
        for a in r["annotations"]:
            assert 0 <= a["category_id"] < NUM_THINGS and a["iscrowd"] == 0
            assert "counts" in a["segmentation"] and len(a["bbox"]) == 4


def test_registration_is_lazy(tmp_path):
    root = tmp_path / "lazy"
    names = register_synthetic("_lazy_test", root=str(root), num_train=2, num_val=1, image_size=32)
    try:
        assert not root.exists()
        assert MetadataCatalog.get(names["panoptic_val"]).panoptic_root.startswith(str(root))
        dicts = DatasetCatalog.get(names["sem_seg_train"])
        assert len(dicts) == 2 and root.exists()
        assert len(DatasetCatalog.get(names["panoptic_val"])) == 1
    finally:
        for key, name in names.items():
            if key != "root":
                DatasetCatalog.remove(name)
                MetadataCatalog.remove(name)


def test_default_synthetic_is_registered():
    for task in ("panoptic", "sem_seg", "instance"):
        for split in ("train", "val"):
            assert f"synthetic_{task}_{split}" in DatasetCatalog.list()
    meta = MetadataCatalog.get("synthetic_panoptic_val")
    assert meta.synthetic_config["num_train"] == 600 and meta.synthetic_config["height"] == 256
    assert meta.panoptic_root.endswith(os.path.join("synthetic", "panoptic_val"))


def test_split_paths_layout():
    p = split_paths("/r", "val")
    assert p["image_root"] == "/r/val" and p["panoptic_json"] == "/r/annotations/panoptic_val.json"


def test_rgb_id_round_trip():
    ids = np.array([[0, 1, 255], [256, 8001, 256**3 - 1]])
    rgb = ids_to_rgb(ids)
    assert rgb[1, 1].tolist() == [8001 % 256, 8001 // 256, 0]
    np.testing.assert_array_equal(rgb_to_ids(rgb), ids)


# ------------------------------------------------------------------------------ real datasets
REAL = {
    "coco_2017_val_panoptic_with_sem_seg": "panoptic_semseg_{train,val}2017/",
    "coco_2017_val": "instances_{train,val}2017.json",
    "ade20k_sem_seg_val": "annotations_detectron2/",
    "ade20k_panoptic_val": "ade20k_panoptic_{train,val}.json",
    "cityscapes_fine_panoptic_val": "cityscapes_panoptic_{train,val}/",
    "cityscapes_fine_sem_seg_val": "leftImg8bit/",
    "mapillary_vistas_sem_seg_val": "labels/",
    "mapillary_vistas_panoptic_val": "panoptic_2018.json",
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_missing_real_dataset_names_the_layout(name):
    assert name in DatasetCatalog.list()
    try:
        DatasetCatalog.get(name)
    except DatasetLayoutError as e:
        msg = str(e)
    else:
        pytest.skip(f"{name} is present on this machine")
    assert name in msg and "missing" in msg
    assert REAL[name] in msg  # the expected layout
    assert "datasets/README.md" in msg


def test_check_layout_passes_when_present(tmp_path):
    (tmp_path / "a").mkdir()
    check_layout("x", [str(tmp_path / "a")], "a/\n")
    with pytest.raises(DatasetLayoutError, match="b/"):
        check_layout("x", [str(tmp_path / "b")], "b/\n")


def test_real_dataset_metadata():
    coco = MetadataCatalog.get("coco_2017_val_panoptic_with_sem_seg")
    assert len(coco.stuff_classes) == 133 and len(coco.thing_classes) == 80
    assert coco.evaluator_type == "coco_panoptic_seg" and coco.label_divisor == 1000
    assert coco.thing_dataset_id_to_contiguous_id[1] == 0  # person
    assert len(coco.stuff_dataset_id_to_contiguous_id) == 133

    ade = MetadataCatalog.get("ade20k_panoptic_val")
    assert len(ade.stuff_classes) == 150 and len(ade.thing_classes) == 100
    assert ade.stuff_classes[0] == "wall" and ade.stuff_classes[7] == "bed"
    assert (
        7 in ade.thing_dataset_id_to_contiguous_id
        and 0 not in ade.thing_dataset_id_to_contiguous_id
    )
    assert len(MetadataCatalog.get("ade20k_sem_seg_val").stuff_colors) == 150

    vis = MetadataCatalog.get("mapillary_vistas_panoptic_train")
    assert len(vis.stuff_classes) == 65 and vis.ignore_label == 65
    assert vis.stuff_classes[55] == "Car" and vis.thing_dataset_id_to_contiguous_id[56] == 55
    assert 28 not in vis.thing_dataset_id_to_contiguous_id  # Sky (label 27) is stuff
    vsem = MetadataCatalog.get("mapillary_vistas_sem_seg_train")
    assert vsem.evaluator_type == "sem_seg" and len(vsem.stuff_classes) == 65
    h = vsem.class_hierarchy
    car = h["parents"][0][55]
    assert h["names"][1][car] == "object--vehicle"
    assert h["names"][2][h["parents"][1][car]] == "object"

    city = MetadataCatalog.get("cityscapes_fine_sem_seg_val")
    hc = city.class_hierarchy
    assert len(hc["names"][0]) == 19 and len(hc["names"][1]) == 7
    assert hc["names"][1][hc["parents"][0][hc["names"][0].index("rider")]] == "human"
    assert MetadataCatalog.get("cityscapes_fine_panoptic_val").evaluator_type == (
        "cityscapes_panoptic_seg"
    )


def test_detectron2_evaluators_accept_the_metadata(tiny_synthetic, tmp_path):
    """Ground truth fed back as prediction scores 100 in PQ, mIoU and mask AP."""
    import torch
    from detectron2.evaluation import COCOEvaluator, COCOPanopticEvaluator, SemSegEvaluator
    from detectron2.structures import BitMasks, Instances

    name = tiny_synthetic["panoptic_val"]
    evaluators = [
        COCOPanopticEvaluator(name, output_dir=str(tmp_path / "pan")),
        SemSegEvaluator(name, distributed=False, output_dir=str(tmp_path / "sem")),
        COCOEvaluator(
            name,
            tasks=("segm",),
            distributed=False,
            output_dir=str(tmp_path / "ins"),
            use_fast_impl=False,
        ),
    ]
    for e in evaluators:
        e.reset()
    for d in DatasetCatalog.get(name):
        ids = torch.from_numpy(read_panoptic_png(d["pan_seg_file_name"]))
        sem = torch.from_numpy(np.asarray(Image.open(d["sem_seg_file_name"])).astype(np.int64))
        things = [s for s in d["segments_info"] if s["isthing"]]
        inst = Instances(tuple(ids.shape))
        inst.pred_masks = torch.stack([ids == s["id"] for s in things])
        inst.pred_boxes = BitMasks(inst.pred_masks).get_bounding_boxes()
        inst.pred_classes = torch.tensor([s["category_id"] for s in things])
        inst.scores = torch.ones(len(things))
        out = {
            "panoptic_seg": (ids, [dict(s) for s in d["segments_info"]]),
            "sem_seg": torch.nn.functional.one_hot(sem, len(ALL_CLASSES)).permute(2, 0, 1).float(),
            "instances": inst,
        }
        for e in evaluators:
            e.process([d], [out])
    pan, sem, ins = [e.evaluate() for e in evaluators]
    assert pan["panoptic_seg"]["PQ"] == pytest.approx(100.0)
    assert sem["sem_seg"]["mIoU"] == pytest.approx(100.0)
    assert ins["segm"]["AP"] == pytest.approx(100.0)
