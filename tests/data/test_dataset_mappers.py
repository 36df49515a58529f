"""Dataset mappers: output format, per-format targets, augmentation consistency, bad input.

Every case writes tiny files (a few pixels) to ``tmp_path`` and compares against masks computed
by hand from the label maps written.
"""

import json

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from panopticapi.utils import id2rgb
from PIL import Image
from pycocotools import mask as mask_util

from seg_methods.config import get_cfg
from seg_methods.data.build import DATASET_MAPPER_REGISTRY, build_dataset_mapper
from seg_methods.data.dataset_mappers import SegDatasetMapper

H, W = 6, 8  # tiny image size used throughout


def _image(h=H, w=W):
    rng = np.random.RandomState(0)
    return rng.randint(0, 256, size=(h, w, 3), dtype=np.uint8)


def _write(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path)
    return str(path)


def _mapper(target, augs=(), **kw):
    kw.setdefault("image_format", "RGB")
    return SegDatasetMapper(is_train=True, augmentations=list(augs), target=target, **kw)


@pytest.fixture
def files(tmp_path):
    """An RGB image, its semantic PNG and its panoptic PNG with hand-set labels."""
    img = _image()
    sem = np.full((H, W), 255, dtype=np.uint8)
    sem[:, :3] = 0
    sem[:, 3:6] = 2
    pan = np.zeros((H, W), dtype=np.int64)  # 0 = void
    pan[:3, :4] = 11  # thing, class 0
    pan[3:, :4] = 22  # stuff, class 1
    pan[:, 4:6] = 33  # crowd, class 0
    segments = [
        {"id": 11, "category_id": 0, "iscrowd": 0, "isthing": True},
        {"id": 22, "category_id": 1, "iscrowd": 0, "isthing": False},
        {"id": 33, "category_id": 0, "iscrowd": 1, "isthing": True},
    ]
    return {
        "img": img,
        "sem": sem,
        "pan": pan,
        "segments": segments,
        "file_name": _write(tmp_path / "img.png", img),
        "sem_file": _write(tmp_path / "sem.png", sem),
        "pan_file": _write(tmp_path / "pan.png", id2rgb(pan).astype(np.uint8)),
        "tmp": tmp_path,
    }


def _pan_record(f):
    return {
        "file_name": f["file_name"],
        "image_id": 7,
        "height": H,
        "width": W,
        "pan_seg_file_name": f["pan_file"],
        "segments_info": f["segments"],
    }


# ----------------------------------------------------------------------------- formats
def test_semantic_targets_and_padding(files):
    mapper = _mapper("semantic", ignore_label=255, num_classes=3, size_divisibility=4)
    rec = {"file_name": files["file_name"], "image_id": 3, "sem_seg_file_name": files["sem_file"]}
    out = mapper(rec)

    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, 8, 8)  # 6 -> 8 rows
    assert torch.equal(out["image"][:, :H, :W], torch.from_numpy(files["img"]).permute(2, 0, 1))
    assert (out["image"][:, H:, :] == 128).all()
    assert out["height"] == H and out["width"] == W and out["image_id"] == 3
    sem = out["sem_seg"]
    assert sem.dtype == torch.int64 and sem.shape == (8, 8)
    assert torch.equal(sem[:H], torch.from_numpy(files["sem"]).long())
    assert (sem[H:] == 255).all()
    inst = out["instances"]
    assert inst.image_size == (8, 8)
    assert inst.gt_classes.tolist() == [0, 2]
    assert inst.gt_masks.dtype == torch.bool and inst.gt_masks.shape == (2, 8, 8)
    assert inst.gt_masks[0, :H, :3].all() and inst.gt_masks[0].sum() == H * 3
    assert inst.gt_masks[1, :H, 3:6].all() and inst.gt_masks[1].sum() == H * 3
    # boxes enclose the masks (XYXY, exclusive right/bottom edge)
    assert inst.gt_boxes.tensor.tolist() == [[0.0, 0.0, 3.0, 6.0], [3.0, 0.0, 6.0, 6.0]]


def test_panoptic_targets_skip_crowd_and_void(files):
    mapper = _mapper("panoptic", ignore_label=255, num_classes=2)
    out = mapper(_pan_record(files))
    inst = out["instances"]
    pan = torch.from_numpy(files["pan"])
    assert inst.gt_classes.tolist() == [0, 1]  # crowd segment 33 and void give no target
    assert torch.equal(inst.gt_masks[0], pan == 11)
    assert torch.equal(inst.gt_masks[1], pan == 22)
    # sem_seg derived from the panoptic PNG: crowd keeps its class, void is ignored
    expected = np.full((H, W), 255)
    expected[:3, :4], expected[3:, :4], expected[:, 4:6] = 0, 1, 0
    assert torch.equal(out["sem_seg"], torch.from_numpy(expected))


def test_instance_targets_from_polygon_and_rle(files):
    rle_mask = np.zeros((H, W), dtype=np.uint8, order="F")
    rle_mask[4:6, 5:8] = 1
    rle = mask_util.encode(rle_mask)
    rle["counts"] = rle["counts"].decode("ascii")
    annos = [
        # rectangle x in [1, 3], y in [1, 2] (pixel centres inside the polygon)
        {"segmentation": [[1, 1, 4, 1, 4, 3, 1, 3]], "category_id": 2, "iscrowd": 0},
        {"segmentation": rle, "category_id": 0, "iscrowd": 0},
        {"segmentation": rle, "category_id": 1, "iscrowd": 1},  # crowd: dropped
    ]
    rec = {"file_name": files["file_name"], "image_id": 1, "annotations": annos}
    out = _mapper("instance", num_classes=3, size_divisibility=4)(rec)
    inst = out["instances"]
    assert "annotations" not in out
    assert inst.gt_classes.tolist() == [2, 0]
    assert inst.gt_masks.shape == (2, 8, 8) and not inst.gt_masks[:, H:].any()
    expected_poly = np.zeros((H, W), dtype=bool)
    expected_poly[1:3, 1:4] = True
    assert torch.equal(inst.gt_masks[0, :H], torch.from_numpy(expected_poly))
    assert torch.equal(inst.gt_masks[1, :H], torch.from_numpy(rle_mask.astype(bool)))


def test_flip_moves_image_and_every_label_together(files):
    flip = T.RandomFlip(prob=1.0, horizontal=True)
    out = _mapper("panoptic", [flip], num_classes=2)(_pan_record(files))
    flipped_img = torch.from_numpy(files["img"][:, ::-1].copy()).permute(2, 0, 1)
    assert torch.equal(out["image"], flipped_img)
    pan = torch.from_numpy(files["pan"]).flip(-1)
    assert torch.equal(out["instances"].gt_masks[0], pan == 11)
    expected_sem = torch.tensor([[0] * 3] * 3 + [[1] * 3] * 3)  # original columns 2, 1, 0
    assert torch.equal(out["sem_seg"][:, -3:], expected_sem)


def test_crop_drops_segments_that_leave_the_image(files):
    # crop the 2 right-most columns: only void and nothing else -> no target
    crop = T.CropTransform(6, 0, 2, H)
    out = _mapper("panoptic", [crop], num_classes=2)(_pan_record(files))
    assert out["image"].shape == (3, H, 2)
    assert len(out["instances"]) == 0
    assert out["instances"].gt_masks.shape == (0, H, 2)


def test_lsj_mapper_from_config_pads_to_fixed_size(files):
    name = "_test_mappers_lsj_panoptic"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: [_pan_record(files)])
    MetadataCatalog.get(name).set(stuff_classes=["a", "b"], thing_classes=["a"], ignore_label=255)
    cfg = get_cfg()
    cfg.DATASETS.TRAIN = (name,)
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.DATASET_MAPPER_NAME = "coco_panoptic_lsj"
    cfg.INPUT.IMAGE_SIZE = 16
    cfg.INPUT.MIN_SCALE = cfg.INPUT.MAX_SCALE = 1.0  # 6x8 -> 12x16, padded to 16x16
    cfg.INPUT.RANDOM_FLIP = "none"
    mapper = build_dataset_mapper(cfg, is_train=True)
    assert mapper.num_classes == 2 and mapper.fixed_size == (16, 16)
    out = mapper(_pan_record(files))
    assert out["image"].shape == (3, 16, 16)
    assert (out["image"][:, 12:] == 128).all()
    inst = out["instances"]
    assert inst.gt_masks.shape == (2, 16, 16)
    assert not inst.gt_masks[:, 12:].any()  # padding belongs to no segment
    # nearest upscaling x2 of the hand-made map
    up = torch.from_numpy(files["pan"]).repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(inst.gt_masks[0, :12], up == 11)
    assert (out["sem_seg"][12:] == 255).all()


def test_test_mapper_resizes_and_builds_no_targets(files):
    cfg = get_cfg()
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TEST = 12
    cfg.INPUT.DATASET_MAPPER_NAME = "mask_former_semantic"
    rec = {"file_name": files["file_name"], "image_id": 1, "sem_seg_file_name": files["sem_file"]}
    out = build_dataset_mapper(cfg, is_train=False)(rec)
    assert out["image"].shape == (3, 12, 16)
    assert out["height"] == H and out["width"] == W
    assert "instances" not in out and "sem_seg" not in out


def test_bgr_format_reverses_channels(files):
    rec = {"file_name": files["file_name"], "sem_seg_file_name": files["sem_file"]}
    out = _mapper("semantic", image_format="BGR")(rec)
    assert torch.equal(
        out["image"], torch.from_numpy(files["img"][:, :, ::-1].copy()).permute(2, 0, 1)
    )


def test_unknown_mapper_name_lists_registered_ones():
    cfg = get_cfg()
    cfg.INPUT.DATASET_MAPPER_NAME = "nope"
    with pytest.raises(KeyError, match="mask_former_semantic"):
        build_dataset_mapper(cfg)
    assert {"mask_former_semantic", "mask_former_panoptic", "mask_former_instance"} <= {
        k for k, _ in DATASET_MAPPER_REGISTRY
    }


# ----------------------------------------------------------------------------- bad input
def test_missing_image_names_the_file(files):
    rec = {"file_name": str(files["tmp"] / "nope.jpg"), "sem_seg_file_name": files["sem_file"]}
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        _mapper("semantic")(rec)


def test_corrupt_image_names_the_file(files):
    bad = files["tmp"] / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(ValueError, match="corrupt.jpg"):
        _mapper("semantic")({"file_name": str(bad), "sem_seg_file_name": files["sem_file"]})


def test_truncated_png_names_the_file(files):
    good = open(files["file_name"], "rb").read()
    bad = files["tmp"] / "truncated.png"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="truncated.png"):
        _mapper("semantic")({"file_name": str(bad), "sem_seg_file_name": files["sem_file"]})


def test_panoptic_png_size_mismatch_names_both_files(files):
    small = _write(files["tmp"] / "pan_small.png", id2rgb(files["pan"][:, :5]).astype(np.uint8))
    rec = dict(_pan_record(files), pan_seg_file_name=small)
    with pytest.raises(utils.SizeMismatchError) as e:
        _mapper("panoptic")(rec)
    msg = str(e.value)
    assert "pan_small.png" in msg and "img.png" in msg and "5x6" in msg and "8x6" in msg


def test_semantic_png_size_mismatch_names_both_files(files):
    small = _write(files["tmp"] / "sem_small.png", files["sem"][:4])
    rec = {"file_name": files["file_name"], "sem_seg_file_name": small}
    with pytest.raises(utils.SizeMismatchError) as e:
        _mapper("semantic")(rec)
    msg = str(e.value)
    assert "sem_small.png" in msg and "img.png" in msg and "8x4" in msg and "8x6" in msg


def test_rgb_semantic_png_is_rejected(files):
    rgb = _write(files["tmp"] / "sem_rgb.png", _image())
    with pytest.raises(ValueError, match="sem_rgb.png"):
        _mapper("semantic")({"file_name": files["file_name"], "sem_seg_file_name": rgb})


def test_out_of_range_label_names_the_file(files):
    rec = {"file_name": files["file_name"], "sem_seg_file_name": files["sem_file"]}
    with pytest.raises(ValueError, match=r"sem\.png.*\[2\]"):
        _mapper("semantic", num_classes=2)(rec)  # label 2 with only 2 classes


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_grayscale_rgba_palette_images_become_three_channels(files, mode):
    rgb = files["img"]
    if mode == "L":
        arr, expected = rgb[:, :, 0], np.repeat(rgb[:, :, :1], 3, axis=2)
        path = _write(files["tmp"] / "gray.png", arr)
    elif mode == "RGBA":
        arr = np.concatenate([rgb, np.full((H, W, 1), 7, np.uint8)], axis=2)
        expected = rgb
        path = _write(files["tmp"] / "rgba.png", arr)
    else:
        pal = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=8)
        path = str(files["tmp"] / "pal.png")
        pal.save(path)
        expected = np.asarray(pal.convert("RGB"))
    rec = {"file_name": path, "sem_seg_file_name": files["sem_file"]}
    for fmt, exp in (("RGB", expected), ("BGR", expected[:, :, ::-1])):
        out = _mapper("semantic", image_format=fmt)(rec)
        assert out["image"].shape == (3, H, W)
        assert torch.equal(out["image"], torch.from_numpy(exp.copy()).permute(2, 0, 1))


def test_image_without_segments_gives_empty_targets(files):
    void_sem = _write(files["tmp"] / "void_sem.png", np.full((H, W), 255, np.uint8))
    void_pan = _write(files["tmp"] / "void_pan.png", np.zeros((H, W, 3), np.uint8))
    sem_out = _mapper("semantic", size_divisibility=4)(
        {"file_name": files["file_name"], "sem_seg_file_name": void_sem}
    )
    pan_out = _mapper("panoptic")(
        {"file_name": files["file_name"], "pan_seg_file_name": void_pan, "segments_info": []}
    )
    inst_out = _mapper("instance")({"file_name": files["file_name"], "annotations": []})
    for out, shape in ((sem_out, (8, 8)), (pan_out, (H, W)), (inst_out, (H, W))):
        inst = out["instances"]
        assert len(inst) == 0
        assert inst.gt_masks.shape == (0,) + shape and inst.gt_masks.dtype == torch.bool
        assert inst.gt_classes.shape == (0,) and inst.gt_classes.dtype == torch.int64


def test_record_size_disagreeing_with_image_is_an_error(files):
    rec = {"file_name": files["file_name"], "height": 5, "width": W, "sem_seg_file_name": "x"}
    with pytest.raises(utils.SizeMismatchError, match="img.png"):
        _mapper("semantic")(rec)


def test_json_roundtrip_of_segments_info_is_accepted(files):
    """segments_info loaded from json (plain ints/bools) works like the in-memory one."""
    rec = json.loads(json.dumps(_pan_record(files)))
    out = _mapper("panoptic", num_classes=2)(rec)
    assert out["instances"].gt_classes.tolist() == [0, 1]


def test_config_semantic_mapper_with_crop_and_colour_aug_keeps_targets_consistent(files):
    name = "_test_mappers_sem_crop"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).set(stuff_classes=["a", "b", "c"], ignore_label=255)
    cfg = get_cfg()
    cfg.DATASETS.TRAIN = (name,)
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TRAIN = (12,)
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = (5, 7)
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 0.75
    cfg.INPUT.COLOR_AUG_SSD = True
    cfg.INPUT.SIZE_DIVISIBILITY = 4
    mapper = build_dataset_mapper(cfg, is_train=True)
    rec = {"file_name": files["file_name"], "sem_seg_file_name": files["sem_file"]}
    for _ in range(5):
        out = mapper(rec)
        assert out["image"].shape == (3, 8, 8)  # 5x7 crop padded to multiples of 4
        sem, inst = out["sem_seg"], out["instances"]
        assert (sem[5:] == 255).all() and (sem[:, 7:] == 255).all()
        assert sorted(inst.gt_classes.tolist()) == sorted(set(sem.unique().tolist()) - {255})
        for c, m in zip(inst.gt_classes, inst.gt_masks):
            assert torch.equal(m, sem == c)


def test_training_loader_worker_propagates_a_missing_file_error(files):
    """Bad data is never skipped: a worker's error reaches the training loop with the file."""
    from seg_methods.data.build import build_train_loader

    name = "_test_mappers_missing_file"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    missing = str(files["tmp"] / "gone.png")
    DatasetCatalog.register(name, lambda: [{"file_name": missing, "sem_seg_file_name": "x"}])
    MetadataCatalog.get(name).set(stuff_classes=["a", "b", "c"], ignore_label=255)
    cfg = get_cfg()
    cfg.DATASETS.TRAIN = (name,)
    cfg.DATALOADER.NUM_WORKERS = 1
    cfg.SOLVER.IMS_PER_BATCH = 1
    loader = build_train_loader(cfg)
    with pytest.raises(FileNotFoundError, match="gone.png"):
        next(iter(loader))
