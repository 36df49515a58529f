"""Evaluation with two gloo processes gives the metrics of one process.

Every evaluator we select (detectron2's COCOPanopticEvaluator and SemSegEvaluator, our
InstanceSegEvaluator and SuperpixelEvaluator) must gather the predictions of every rank before
computing metrics. detectron2's InferenceSampler gives each rank a contiguous share of the test
set (rank 0: images 0-1, rank 1: images 2-3 here), so an evaluator that counted only rank 0's
share would score half of the images.

The model is an oracle with image-dependent errors: it returns the ground truth of each image
minus every third segment (a different third per image) and superpixels on a grid whose cell size
depends on the image, so each metric depends on which images are counted. The test checks that
the metrics of rank 0's share alone differ from those of the whole set (so the comparison can
fail), then that two processes give the one-process metrics.
"""

import json
import os
from datetime import timedelta

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils import comm
from panopticapi.utils import rgb2id
from PIL import Image
from torch import nn

from dist_launch import launch_retrying_gloo_aborts
from oracle_outputs import outputs_from_segments
from seg_methods.config import get_cfg
from seg_methods.data.datasets.synthetic import register_synthetic
from seg_methods.engine import Trainer

WORLD = 2
DATA = dict(name_prefix="dist_eval_synthetic", num_train=1, num_val=4, image_size=32, seed=0)
TIMEOUT = timedelta(seconds=120)  # a stuck collective raises instead of hanging the test


class DistEvalOracle(nn.Module):
    """Ground truth minus every third segment, plus grid superpixels (see the module docstring).

    Outputs per image: "sem_seg" (C, H, W), "panoptic_seg", "instances" (scores decreasing with
    the segment index), "superpixels" (H, W) on a grid of ``3 + image index`` pixel cells.
    """

    def __init__(self, cfg):
        super().__init__()
        self.num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, batched_inputs):
        return [self._predict(x) for x in batched_inputs]

    def _predict(self, x):
        k = int(os.path.splitext(os.path.basename(x["file_name"]))[0])  # image index
        h, w = x["height"], x["width"]
        pan = rgb2id(np.asarray(Image.open(x["pan_seg_file_name"]).convert("RGB")))
        pan = torch.from_numpy(pan.astype(np.int64))
        kept = [s for i, s in enumerate(x["segments_info"]) if i % 3 != k % 3]
        out = outputs_from_segments(pan, kept, self.num_classes, decreasing_scores=True)
        cell = 3 + k
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        superpixels = (yy // cell) * (w // cell + 1) + xx // cell
        out["superpixels"] = superpixels
        return out


if "DistEvalOracle" not in META_ARCH_REGISTRY:
    META_ARCH_REGISTRY.register(DistEvalOracle)


def _register(root):
    """The tiny synthetic panoptic val set, and the same images as a superpixel dataset."""
    names = register_synthetic(root=root, **DATA)
    panoptic = names["panoptic_val"]
    superpixel = f"{DATA['name_prefix']}_superpixel_val"
    if superpixel in DatasetCatalog.list():
        DatasetCatalog.remove(superpixel)
        MetadataCatalog.remove(superpixel)
    DatasetCatalog.register(superpixel, lambda: DatasetCatalog.get(panoptic))
    MetadataCatalog.get(superpixel).set(evaluator_type="superpixel")
    return panoptic, superpixel


def _cfg(root, out_dir, test_sets=None, panoptic=True):
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "DistEvalOracle"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 8
    cfg.DATASETS.TEST = test_sets or _register(root)
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.DATASET_MAPPER_NAME = "mask_former_panoptic"
    cfg.INPUT.MIN_SIZE_TEST = DATA["image_size"]
    cfg.INPUT.MAX_SIZE_TEST = 4 * DATA["image_size"]
    cfg.TEST.SEMANTIC_ON = cfg.TEST.INSTANCE_ON = True
    cfg.TEST.PANOPTIC_ON = panoptic
    cfg.TEST.SUPERPIXEL_ON = True
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.OUTPUT_DIR = out_dir
    cfg.freeze()
    return cfg


def _evaluate(cfg):
    return Trainer.test(cfg, Trainer.build_model(cfg).eval())


def _eval_worker(root, out_dir):
    """Runs in each spawned process; rank 0 writes the results."""
    cfg = _cfg(root, os.path.join(out_dir, "world2"))
    results = _evaluate(cfg)
    if comm.is_main_process():
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f)
    else:
        assert all(not r for r in results.values()), results  # metrics only on rank 0


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dist_eval") / "synthetic")
    register_synthetic(root=root, generate=True, num_workers=1, **DATA)
    return root


def _rank0_share(name, records):
    """Register ``records`` (rank 0's images) under a new name with ``name``'s metadata."""
    share = f"{name}_rank0_share"
    if share in DatasetCatalog.list():
        DatasetCatalog.remove(share)
        MetadataCatalog.remove(share)
    DatasetCatalog.register(share, lambda: [dict(r) for r in records])
    meta = {k: v for k, v in MetadataCatalog.get(name).as_dict().items() if k != "name"}
    MetadataCatalog.get(share).set(**meta)
    return share


def test_two_process_evaluation_equals_one_process(eval_root, tmp_path):
    panoptic, superpixel = _register(eval_root)
    single = _evaluate(_cfg(eval_root, str(tmp_path / "world1")))
    # the embedded dataset has a class tree, so mIoU per level comes too (hier_sem_seg)
    assert set(single[panoptic]) == {"panoptic_seg", "sem_seg", "segm", "hier_sem_seg"}
    assert set(single[superpixel]) == {"superpixel"}
    assert 0 < single[panoptic]["panoptic_seg"]["PQ"] < 100  # the errors are counted

    # rank 0's share alone scores differently (COCO's panoptic evaluation refuses a set with
    # images missing, so PQ is compared on the full set only)
    records = DatasetCatalog.get(panoptic)[: len(DatasetCatalog.get(panoptic)) // WORLD]
    shares = (_rank0_share(panoptic, records), _rank0_share(superpixel, records))
    half = _evaluate(_cfg(eval_root, str(tmp_path / "share"), test_sets=shares, panoptic=False))
    assert half[shares[0]]["sem_seg"]["mIoU"] != pytest.approx(single[panoptic]["sem_seg"]["mIoU"])
    assert half[shares[0]]["segm"]["AP"] != pytest.approx(single[panoptic]["segm"]["AP"])
    for key in ("ASA", "CO"):
        assert half[shares[1]]["superpixel"][key] != pytest.approx(
            single[superpixel]["superpixel"][key]
        )

    launch_retrying_gloo_aborts(_eval_worker, WORLD, (eval_root, str(tmp_path)), TIMEOUT)
    with open(tmp_path / "results.json") as f:
        double = json.load(f)
    assert double.keys() == single.keys()
    for name in single:
        for task, metrics in single[name].items():
            assert double[name][task].keys() == metrics.keys(), (name, task)
            for key, value in metrics.items():
                assert double[name][task][key] == pytest.approx(value, nan_ok=True), (task, key)
