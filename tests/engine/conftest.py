"""Fixtures for the engine tests: a tiny panoptic dataset on disk and tiny meta-architectures.

Dataset ("_engine_tiny_{train,val}", 3 images of 24x32): classes disc, square (things, dataset
ids 1, 2) and sky (stuff, id 3); the third image has no segment at all (every pixel void). Files
follow COCO panoptic / instance conventions and the metadata detectron2's evaluators read.

Models:
* ``EngineTestOracle`` trains a 1x1 conv with a real loss on the mapper's targets. At inference
  it returns the ground truth read from the record's panoptic PNG (so every metric is exactly
  100) or, without one, the conv's own predictions.
* ``EngineTestNaN`` returns a NaN loss from its second call on (iteration 1).
"""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import ImageList
from panopticapi.utils import id2rgb, rgb2id
from PIL import Image
from pycocotools import mask as mask_util
from torch import nn

from oracle_outputs import outputs_from_segments
from seg_methods.config import get_cfg

H, W = 24, 32
CLASSES = ["disc", "square", "sky"]
THING_IDS = {1: 0, 2: 1}  # dataset id -> contiguous id
ALL_IDS = {1: 0, 2: 1, 3: 2}
IGNORE = 255


def _scene(k):
    """Panoptic ids, segments (contiguous ids) of image k; segment id = 1000 * cat + index."""
    pan = np.zeros((H, W), dtype=np.int64)
    segs = []
    if k == 2:  # no segments
        return pan, segs
    pan[:, :] = 3000  # sky
    segs.append({"id": 3000, "category_id": 2, "iscrowd": 0, "isthing": False})
    yy, xx = np.mgrid[:H, :W]
    disc = (yy - 8 - 4 * k) ** 2 + (xx - 10) ** 2 <= 25
    pan[disc] = 1001
    segs.append({"id": 1001, "category_id": 0, "iscrowd": 0, "isthing": True})
    pan[4 + k : 12 + k, 20:28] = 2001
    segs.append({"id": 2001, "category_id": 1, "iscrowd": 0, "isthing": True})
    if k == 1:
        pan[18:22, 2:6] = 2002  # a second square
        segs.append({"id": 2002, "category_id": 1, "iscrowd": 0, "isthing": True})
    return pan, segs


def _write_split(root, split):
    os.makedirs(os.path.join(root, split), exist_ok=True)
    pan_dir = os.path.join(root, f"panoptic_{split}")
    sem_dir = os.path.join(root, f"sem_{split}")
    os.makedirs(pan_dir, exist_ok=True)
    os.makedirs(sem_dir, exist_ok=True)
    rng = np.random.RandomState(1)
    records, images, pan_annos, inst_annos = [], [], [], []
    inv = {v: k for k, v in ALL_IDS.items()}
    for k in range(3):
        pan, segs = _scene(k)
        img = (rng.rand(H, W, 3) * 60).astype(np.uint8)
        colors = {0: (200, 40, 40), 1: (40, 200, 40), 2: (40, 40, 200)}
        sem = np.full((H, W), IGNORE, dtype=np.uint8)
        for s in segs:
            m = pan == s["id"]
            img[m] += np.array(colors[s["category_id"]], dtype=np.uint8)
            sem[m] = s["category_id"]
        name = f"{k:06d}"
        file_name = os.path.join(root, split, name + ".png")
        Image.fromarray(img).save(file_name)
        Image.fromarray(id2rgb(pan).astype(np.uint8)).save(os.path.join(pan_dir, name + ".png"))
        Image.fromarray(sem).save(os.path.join(sem_dir, name + ".png"))
        records.append(
            {
                "file_name": file_name,
                "image_id": k,
                "height": H,
                "width": W,
                "pan_seg_file_name": os.path.join(pan_dir, name + ".png"),
                "sem_seg_file_name": os.path.join(sem_dir, name + ".png"),
                "segments_info": segs,
            }
        )
        images.append({"id": k, "file_name": name + ".png", "height": H, "width": W})
        seg_json = []
        for s in segs:
            m = np.asfortranarray((pan == s["id"]).astype(np.uint8))
            rle = mask_util.encode(m)
            bbox = [float(v) for v in mask_util.toBbox(rle)]
            area = int(m.sum())
            cat = inv[s["category_id"]]
            seg_json.append(
                {"id": s["id"], "category_id": cat, "iscrowd": 0, "bbox": bbox, "area": area}
            )
            if s["isthing"]:
                rle["counts"] = rle["counts"].decode("ascii")
                inst_annos.append(
                    {
                        "id": len(inst_annos) + 1,
                        "image_id": k,
                        "category_id": cat,
                        "segmentation": rle,
                        "area": area,
                        "bbox": bbox,
                        "iscrowd": 0,
                    }
                )
        pan_annos.append({"image_id": k, "file_name": name + ".png", "segments_info": seg_json})
    cats = [
        {"id": i, "name": CLASSES[c], "isthing": int(i in THING_IDS), "supercategory": "x"}
        for i, c in ALL_IDS.items()
    ]
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    pan_json = os.path.join(root, "annotations", f"panoptic_{split}.json")
    inst_json = os.path.join(root, "annotations", f"instances_{split}.json")
    with open(pan_json, "w") as f:
        json.dump({"images": images, "annotations": pan_annos, "categories": cats}, f)
    with open(inst_json, "w") as f:
        json.dump(
            {
                "images": images,
                "annotations": inst_annos,
                "categories": [c for c in cats if c["isthing"]],
            },
            f,
        )
    return records, {"panoptic_root": pan_dir, "panoptic_json": pan_json, "json_file": inst_json}


def register_tiny(name, records, files, evaluator_type="coco_panoptic_seg", **overrides):
    """(Re-)register a dataset of ``records`` with the tiny metadata (``overrides`` win)."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: [dict(r) for r in records])
    meta = dict(
        evaluator_type=evaluator_type,
        thing_classes=CLASSES[:2],
        stuff_classes=CLASSES,
        thing_dataset_id_to_contiguous_id=dict(THING_IDS),
        stuff_dataset_id_to_contiguous_id=dict(ALL_IDS),
        ignore_label=IGNORE,
        label_divisor=1000,
        **files,
    )
    meta.update(overrides)
    MetadataCatalog.get(name).set(**meta)


@pytest.fixture(scope="session")
def tiny_hw():
    """(H, W) of the tiny dataset's images."""
    return H, W


@pytest.fixture(scope="session")
def register_tiny_fn():
    """:func:`register_tiny`, for tests that register variants of the tiny dataset."""
    return register_tiny


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """Registers "_engine_tiny_train" and "_engine_tiny_val"; returns (records, files) of val."""
    root = str(tmp_path_factory.mktemp("engine_tiny"))
    out = {}
    for split in ("train", "val"):
        records, files = _write_split(root, split)
        register_tiny(f"_engine_tiny_{split}", records, files)
        out[split] = (records, files)
    return out


# ----------------------------------------------------------------------------- models
class EngineTestOracle(nn.Module):
    """See the module docstring."""

    def __init__(self, cfg):
        super().__init__()
        self.num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        self.conv = nn.Conv2d(3, self.num_classes, 1)
        self.register_buffer("mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("std", torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), False)
        self.calls = 0
        self.to(torch.device(cfg.MODEL.DEVICE))

    @property
    def device(self):
        return self.mean.device

    def losses(self, logits, batched_inputs):
        sem = ImageList.from_tensors([x["sem_seg"] for x in batched_inputs], pad_value=IGNORE)
        sem = sem.tensor.to(self.device)
        logits = logits[..., : sem.shape[-2], : sem.shape[-1]]
        loss_ce = F.cross_entropy(logits, sem, ignore_index=IGNORE)
        loss_mask = logits.sum() * 0.0
        for i, x in enumerate(batched_inputs):
            inst = x["instances"]
            h, w = inst.image_size
            assert inst.gt_masks.shape == (len(inst), h, w) and inst.gt_masks.dtype == torch.bool
            if len(inst):
                pred = logits[i, inst.gt_classes.to(self.device), :h, :w]
                loss_mask = loss_mask + F.binary_cross_entropy_with_logits(
                    pred, inst.gt_masks.to(self.device).float()
                )
        return {"loss_ce": loss_ce, "loss_mask": loss_mask / len(batched_inputs)}

    def forward(self, batched_inputs):
        self.calls += 1
        images = [
            (x["image"].to(self.device).float() - self.mean) / self.std for x in batched_inputs
        ]
        images = ImageList.from_tensors(images)
        logits = self.conv(images.tensor)  # (B, C, H, W)
        if self.training:
            return self.losses(logits, batched_inputs)
        return [
            self.infer(logits[i : i + 1], x, images.image_sizes[i])
            for i, x in enumerate(batched_inputs)
        ]

    def infer(self, logits, x, size):
        h, w = x["height"], x["width"]
        if "pan_seg_file_name" in x:  # oracle
            pan = torch.from_numpy(
                rgb2id(np.asarray(Image.open(x["pan_seg_file_name"]).convert("RGB"))).astype(
                    np.int64
                )
            )
            segs = [s for s in x["segments_info"] if not s.get("iscrowd", 0)]
        else:
            logits = F.interpolate(logits[..., : size[0], : size[1]], (h, w), mode="bilinear")
            labels = logits[0].argmax(0)
            pan = labels + 1
            segs = [
                {"id": c + 1, "category_id": c, "isthing": c < 2, "iscrowd": 0}
                for c in labels.unique().tolist()
            ]
        return outputs_from_segments(
            pan, segs, self.num_classes, decreasing_scores=False, device=self.device
        )


class EngineTestNaN(EngineTestOracle):
    """Loss becomes NaN on the second training call (iteration 1)."""

    def losses(self, logits, batched_inputs):
        out = super().losses(logits, batched_inputs)
        if self.calls >= 2:
            out["loss_ce"] = out["loss_ce"] * float("nan")
        return out


for _cls in (EngineTestOracle, EngineTestNaN):
    if _cls.__name__ not in META_ARCH_REGISTRY:
        META_ARCH_REGISTRY.register(_cls)


@pytest.fixture
def engine_cfg(tiny_dataset, tmp_path):
    """A config training EngineTestOracle on the tiny dataset for 2 iterations on the CPU."""
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "EngineTestOracle"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 3
    cfg.DATASETS.TRAIN = ("_engine_tiny_train",)
    cfg.DATASETS.TEST = ("_engine_tiny_val",)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.DATASET_MAPPER_NAME = "mask_former_panoptic"
    cfg.INPUT.MIN_SIZE_TRAIN = (24,)
    cfg.INPUT.MAX_SIZE_TRAIN = 64
    cfg.INPUT.MIN_SIZE_TEST = 24
    cfg.INPUT.MAX_SIZE_TEST = 64
    cfg.INPUT.SIZE_DIVISIBILITY = 8
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.BASE_LR = 0.01
    cfg.SOLVER.MAX_ITER = 2
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupPolyLR"
    cfg.SOLVER.CHECKPOINT_PERIOD = 1000
    cfg.TEST.EVAL_PERIOD = 0
    cfg.TEST.SEMANTIC_ON = cfg.TEST.INSTANCE_ON = cfg.TEST.PANOPTIC_ON = True
    cfg.TEST.NUM_VIS_IMAGES = 2
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    return cfg
