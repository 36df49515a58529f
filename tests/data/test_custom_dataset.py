"""datasets/README.md "Registering your own dataset", run as written.

The test writes a tiny dataset in the README's layout under ``tmp_path`` (as
``$DETECTRON2_DATASETS``), executes the README's registration block and loads its two config
blocks (their ``_BASE_`` resolved against ``configs/``), then trains Mask2Former for two
iterations on the CPU through ``seg_methods.engine`` and evaluates, for the semantic and the
panoptic registration. Only the schedule and the image sizes are shrunk, with config overrides.
"""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from seg_methods.config import get_cfg
from seg_methods.data.datasets.panoptic_utils import ids_to_rgb
from seg_methods.engine import train
from seg_methods.evaluation.requirements import check_evaluation_requirements

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(REPO, "datasets", "README.md")
H, W = 32, 40
# README's classes: contiguous id = position in "categories"; dataset ids are arbitrary
CATEGORIES = [
    {"id": 7, "name": "sky", "isthing": 0},
    {"id": 1, "name": "disc", "isthing": 1},
    {"id": 2, "name": "square", "isthing": 1},
]


def _readme_block(marker: str) -> str:
    """The fenced code block that follows ``<!-- custom-dataset:<marker> -->``."""
    with open(README) as f:
        text = f.read()
    m = re.search(rf"<!-- custom-dataset:{marker} -->\n```\w*\n(.*?)```", text, re.S)
    assert m, f"datasets/README.md has no block marked custom-dataset:{marker}"
    return m.group(1)


def _scene(k: int, rng):
    """Image, panoptic ids and segments_info (dataset category ids) of image k."""
    pan = np.full((H, W), 7000, dtype=np.int64)  # sky
    segs = [{"id": 7000, "category_id": 7, "iscrowd": 0}]
    yy, xx = np.mgrid[:H, :W]
    cy, cx = 8 + 3 * k, 10 + 4 * k
    pan[(yy - cy) ** 2 + (xx - cx) ** 2 <= 25] = 1001
    segs.append({"id": 1001, "category_id": 1, "iscrowd": 0})
    pan[20:28, 24 - k : 32 - k] = 2001
    segs.append({"id": 2001, "category_id": 2, "iscrowd": 0})
    pan[:2, :3] = 0  # a little void
    colors = {7000: (60, 60, 200), 1001: (200, 60, 60), 2001: (60, 200, 60)}
    img = rng.randint(0, 40, size=(H, W, 3)).astype(np.uint8)
    for seg_id, c in colors.items():
        img[pan == seg_id] += np.array(c, dtype=np.uint8)
    return img, pan, segs


def _write_dataset(root: str) -> None:
    """The README's files: images, semantic PNGs, panoptic PNGs and json (train 4, val 2)."""
    rng = np.random.RandomState(0)
    contiguous = {c["id"]: i for i, c in enumerate(CATEGORIES)}
    for split, n in (("train", 4), ("val", 2)):
        for sub in ("images", "semantic", "panoptic"):
            os.makedirs(os.path.join(root, sub, split), exist_ok=True)
        os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
        images, annotations = [], []
        for k in range(n):
            img, pan, segs = _scene(k + (10 if split == "val" else 0) % 3, rng)
            stem = f"{k:06d}"
            Image.fromarray(img).save(os.path.join(root, "images", split, stem + ".jpg"))
            sem = np.full((H, W), 255, dtype=np.uint8)
            for s in segs:
                sem[pan == s["id"]] = contiguous[s["category_id"]]
            Image.fromarray(sem).save(os.path.join(root, "semantic", split, stem + ".png"))
            Image.fromarray(ids_to_rgb(pan)).save(
                os.path.join(root, "panoptic", split, stem + ".png")
            )
            images.append({"id": k, "file_name": stem + ".jpg", "height": H, "width": W})
            annotations.append({"image_id": k, "file_name": stem + ".png", "segments_info": segs})
        with open(os.path.join(root, "annotations", f"panoptic_{split}.json"), "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES}, f)


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """Write the dataset, run the README's registration block; returns $DETECTRON2_DATASETS."""
    root = str(tmp_path_factory.mktemp("d2_datasets"))
    _write_dataset(os.path.join(root, "my_dataset"))
    old = os.environ.get("DETECTRON2_DATASETS")
    os.environ["DETECTRON2_DATASETS"] = root
    try:
        exec(compile(_readme_block("register"), "datasets/README.md:register", "exec"), {})
    finally:
        if old is None:
            del os.environ["DETECTRON2_DATASETS"]
        else:
            os.environ["DETECTRON2_DATASETS"] = old
    return root


def _cfg_from_readme(marker: str, tmp_path):
    """The README's config block, saved as configs/my_dataset/<name>.yaml would be."""
    text = _readme_block(marker)
    folder = os.path.join(REPO, "configs", "my_dataset")
    base = re.search(r"^_BASE_: (.*)$", text, re.M).group(1).strip()
    text = text.replace(base, os.path.normpath(os.path.join(folder, base)))
    path = tmp_path / "config.yaml"
    path.write_text(text)
    cfg = get_cfg()
    cfg.merge_from_file(str(path), allow_unsafe=False)
    # a tiny schedule for the CPU test (what a user would pass as command-line opts)
    cfg.merge_from_list(
        ["SOLVER.MAX_ITER", 2, "SOLVER.IMS_PER_BATCH", 2, "SOLVER.WARMUP_ITERS", 0]
        + ["INPUT.MIN_SIZE_TRAIN", (32,), "INPUT.MIN_SIZE_TEST", 32, "DATALOADER.NUM_WORKERS", 0]
        + ["TEST.NUM_VIS_IMAGES", 1, "OUTPUT_DIR", str(tmp_path / "out"), "MODEL.DEVICE", "cpu"]
    )
    return cfg


def test_prepare_and_metadata(registered):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    root = os.path.join(registered, "my_dataset")
    sem = np.asarray(Image.open(os.path.join(root, "panoptic_semseg", "val", "000000.png")))
    ref = np.asarray(Image.open(os.path.join(root, "semantic", "val", "000000.png")))
    assert np.array_equal(sem, ref)  # derived from the panoptic PNG = the semantic PNG
    with open(os.path.join(root, "annotations", "instances_train.json")) as f:
        assert len(json.load(f)["annotations"]) == 8  # a disc and a square per image
    meta = MetadataCatalog.get("my_pan_train")
    assert meta.stuff_classes == ["sky", "disc", "square"] and meta.thing_classes == [
        "disc",
        "square",
    ]
    assert meta.thing_dataset_id_to_contiguous_id == {1: 1, 2: 2}
    assert meta.evaluator_type == "coco_panoptic_seg"
    assert len(DatasetCatalog.get("my_sem_train")) == 4
    assert MetadataCatalog.get("my_sem_val").evaluator_type == "sem_seg"


@pytest.mark.parametrize(
    "marker,expected",
    [
        ("semantic-config", {"sem_seg": "mIoU"}),
        ("panoptic-config", {"panoptic_seg": "PQ", "sem_seg": "mIoU", "segm": "AP"}),
    ],
)
def test_readme_config_trains_and_evaluates(registered, tmp_path, marker, expected):
    cfg = _cfg_from_readme(marker, tmp_path)
    check_evaluation_requirements(cfg)
    results = train(cfg)
    assert results is not None
    for task, metric in expected.items():
        assert np.isfinite(results[task][metric]), (task, results[task])
    assert os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
    assert len(os.listdir(os.path.join(cfg.OUTPUT_DIR, "vis"))) == 1
