"""The ``datasets/prepare_*.py`` scripts on tiny fabricated inputs (no real data needed)."""

import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image

from seg_methods.data.datasets.class_tables import read_class_table
from seg_methods.data.datasets.panoptic_utils import (
    coco_instances_from_panoptic,
    ids_to_rgb,
    load_panoptic_json,
    read_panoptic_png,
    semantic_from_panoptic,
)
from seg_methods.data.datasets.register_ade20k import ade20k_panoptic_metadata

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _script(name):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(REPO, "datasets", name + ".py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ADE_THINGS = [c["id"] for c in read_class_table("ade20k_150.csv") if c["isthing"]]


def test_class_tables():
    ade = read_class_table("ade20k_150.csv")
    assert len(ade) == 150 and sum(c["isthing"] for c in ade) == 100
    assert [c["id"] for c in ade] == list(range(150))
    assert ade[0]["name"] == "wall" and not ade[0]["isthing"]
    assert ade[7]["name"] == "bed" and ade[7]["isthing"]
    assert ade[149]["name"] == "flag" and ade[149]["color"] == [92, 0, 255]
    vistas = read_class_table("mapillary_vistas_v1.2.csv")
    assert len(vistas) == 65 and vistas[19]["name"] == "Person" and vistas[19]["isthing"]
    assert vistas[27]["key"] == "nature--sky" and not vistas[27]["isthing"]
    assert len({tuple(c["color"]) for c in vistas}) == 65


def test_ade20k_sem_seg_label_shift():
    mod = _script("prepare_ade20k_sem_seg")
    out = mod.convert_ade20k_label(np.array([[0, 1], [150, 5]], np.uint8))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[255, 0], [149, 4]])
    with pytest.raises(ValueError):
        mod.convert_ade20k_label(np.array([[151]], np.uint8))


def test_ade20k_panoptic_from_labels():
    mod = _script("prepare_ade20k_pan_seg")
    isthing = [False] * 150
    for c in ADE_THINGS:
        isthing[c] = True
    # classes: 0 wall (stuff), 2 sky (stuff), 7 bed (thing: instance class 1), 8 window (2)
    semantic = np.array(
        [
            [1, 1, 3, 3],
            [1, 8, 8, 3],
            [0, 8, 9, 9],
        ],
        np.uint8,
    )
    instance = np.zeros((3, 4, 3), np.uint8)
    instance[1, 1:3] = (1, 1, 0)  # bed, instance 1
    instance[2, 1] = (1, 2, 0)  # another bed, instance 2
    instance[2, 2:4] = (2, 3, 0)  # window, instance 3
    instance[0, 0] = (2, 4, 0)  # a window pasted over the wall
    pan, segs = mod.ade20k_panoptic_from_labels(semantic, instance, isthing)
    # thing segments are numbered per class in (instance class, instance index) order
    expected = np.array(
        [
            [9002, 1000, 3000, 3000],
            [1000, 8001, 8001, 3000],
            [0, 8002, 9001, 9001],
        ]
    )
    np.testing.assert_array_equal(pan, expected)
    by_id = {s["id"]: s for s in segs}
    assert set(by_id) == {1000, 3000, 8001, 8002, 9001, 9002}
    assert by_id[1000] == {
        "id": 1000,
        "category_id": 0,
        "iscrowd": 0,
        "area": 2,
        "bbox": [0, 0, 2, 2],
    }
    assert by_id[8001]["category_id"] == 7 and by_id[8001]["area"] == 2
    assert by_id[9001]["bbox"] == [2, 2, 2, 1] and by_id[9001]["category_id"] == 8


def _fake_ade20k(root):
    base = os.path.join(root, "ADEChallengeData2016")
    rng = np.random.RandomState(0)
    for dirname in ("training", "validation"):
        for sub in ("images", "annotations", "annotations_instance"):
            os.makedirs(os.path.join(base, sub, dirname))
        stem = f"ADE_{dirname}_00000001"
        Image.fromarray(rng.randint(0, 255, (6, 8, 3), np.uint8)).save(
            os.path.join(base, "images", dirname, stem + ".jpg")
        )
        sem = np.ones((6, 8), np.uint8)  # wall
        sem[:, 4:] = 8  # bed pixels
        sem[0, 0] = 0  # other
        Image.fromarray(sem).save(os.path.join(base, "annotations", dirname, stem + ".png"))
        ins = np.zeros((6, 8, 3), np.uint8)
        ins[:3, 4:] = (1, 1, 0)
        ins[3:, 4:] = (1, 2, 0)
        Image.fromarray(ins).save(
            os.path.join(base, "annotations_instance", dirname, stem + ".png")
        )
    return base


def test_ade20k_scripts_end_to_end(tmp_path):
    base = _fake_ade20k(str(tmp_path))
    _script("prepare_ade20k_sem_seg").main(["--root", str(tmp_path)])
    _script("prepare_ade20k_pan_seg").main(["--root", str(tmp_path), "--workers", "1"])
    _script("prepare_ade20k_ins_seg").main(["--root", str(tmp_path)])

    sem = np.asarray(
        Image.open(
            os.path.join(
                base, "annotations_detectron2", "validation", "ADE_validation_00000001.png"
            )
        )
    )
    assert sem[0, 0] == 255 and sem[1, 0] == 0 and sem[0, 5] == 7

    dicts = load_panoptic_json(
        os.path.join(base, "ade20k_panoptic_val.json"),
        os.path.join(base, "images", "validation"),
        os.path.join(base, "ade20k_panoptic_val"),
        os.path.join(base, "annotations_detectron2", "validation"),
        ade20k_panoptic_metadata(),
    )
    assert len(dicts) == 1
    d = dicts[0]
    assert os.path.isfile(d["file_name"]) and os.path.isfile(d["sem_seg_file_name"])
    assert (d["height"], d["width"]) == (6, 8)
    ids = read_panoptic_png(d["pan_seg_file_name"])
    segs = sorted(d["segments_info"], key=lambda s: s["id"])
    assert [(s["category_id"], s["isthing"], s["area"]) for s in segs] == [
        (0, False, 23),
        (7, True, 12),
        (7, True, 12),
    ]
    assert ids[0, 0] == 0 and set(np.unique(ids).tolist()) == {0, 1000, 8001, 8002}

    from pycocotools.coco import COCO

    coco = COCO(os.path.join(base, "ade20k_instance_val.json"))
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) == 2 and {a["category_id"] for a in anns} == {7}
    assert len(coco.getCatIds()) == 100
    for a in anns:
        assert coco.annToMask(a).sum() == 12 and a["iscrowd"] == 0


def test_coco_semantic_from_panoptic(tmp_path):
    mod = _script("prepare_coco_semantic_annos_from_panoptic_images")
    id_map = mod.coco_category_to_contiguous()
    assert len(id_map) == 133 and id_map[1] == 0 and id_map[90] == 79 and id_map[92] == 80
    pan = np.array([[0, 5, 5], [7, 7, 9]])
    Image.fromarray(ids_to_rgb(pan)).save(str(tmp_path / "p.png"))
    segments = [
        {"id": 5, "category_id": 1, "iscrowd": 0},  # person -> 0
        {"id": 7, "category_id": 92, "iscrowd": 1},  # banner (first stuff) -> 80; crowd kept
        {"id": 9, "category_id": 200, "iscrowd": 0},  # last stuff class -> 132
    ]
    mod.convert_one(str(tmp_path / "p.png"), segments, str(tmp_path / "s.png"), id_map)
    sem = np.asarray(Image.open(str(tmp_path / "s.png")))
    np.testing.assert_array_equal(sem, [[255, 0, 0], [80, 80, 132]])


def test_semantic_from_panoptic_unknown_category_is_ignored():
    sem = semantic_from_panoptic(
        np.array([[1, 2]]), [{"id": 1, "category_id": 3}, {"id": 2, "category_id": 4}], {3: 0}
    )
    np.testing.assert_array_equal(sem, [[0, 255]])


def test_vistas_instances_from_panoptic(tmp_path):
    pan_dir = tmp_path / "mapillary_vistas" / "validation" / "panoptic"
    pan_dir.mkdir(parents=True)
    (tmp_path / "mapillary_vistas" / "training" / "panoptic").mkdir(parents=True)
    ids = np.zeros((4, 5), np.int64)
    ids[:, :2] = 11  # Sky (stuff, category 28)
    ids[:2, 2:] = 21  # Car (thing, category 56)
    ids[2:, 2:] = 22  # another Car, crowd
    for split_dir in (pan_dir, tmp_path / "mapillary_vistas" / "training" / "panoptic"):
        Image.fromarray(ids_to_rgb(ids)).save(str(split_dir / "img1.png"))
    panoptic = {
        "images": [{"id": "img1", "file_name": "img1.jpg", "height": 4, "width": 5}],
        "annotations": [
            {
                "image_id": "img1",
                "file_name": "img1.png",
                "segments_info": [
                    {"id": 11, "category_id": 28, "iscrowd": 0},
                    {"id": 21, "category_id": 56, "iscrowd": 0},
                    {"id": 22, "category_id": 56, "iscrowd": 1},
                ],
            }
        ],
        "categories": [
            {"id": 28, "name": "Sky", "isthing": 0},
            {"id": 56, "name": "Car", "isthing": 1},
        ],
    }
    for split in ("training", "validation"):
        with open(
            tmp_path / "mapillary_vistas" / split / "panoptic" / "panoptic_2018.json", "w"
        ) as f:
            json.dump(panoptic, f)
    _script("prepare_mapillary_vistas_ins_seg").main(["--root", str(tmp_path)])
    with open(tmp_path / "mapillary_vistas" / "mapillary_vistas_instance_val.json") as f:
        inst = json.load(f)
    assert inst["categories"] == [{"id": 56, "name": "Car", "isthing": 1}]
    anns = inst["annotations"]
    assert [(a["id"], a["category_id"], a["area"], a["iscrowd"], a["bbox"]) for a in anns] == [
        (1, 56, 6, 0, [2, 0, 3, 2]),
        (2, 56, 6, 1, [2, 2, 3, 2]),
    ]
    # the same function on an in-memory json
    again = coco_instances_from_panoptic(panoptic, str(pan_dir))
    assert again["annotations"] == anns
