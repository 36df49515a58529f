"""Evaluator selection per evaluator_type, InstanceSegEvaluator on sparse thing ids, and the
metrics.json helpers."""

import json
import math

import numpy as np
import pytest
import torch
from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    CityscapesSemSegEvaluator,
    COCOPanopticEvaluator,
    SemSegEvaluator,
)
from detectron2.structures import BitMasks, Boxes, Instances
from panopticapi.utils import rgb2id
from PIL import Image

from seg_methods.config import get_cfg
from seg_methods.engine import flatten_metrics, format_metrics_table, write_metrics_json
from seg_methods.evaluation import (
    EVALUATORS,
    InstanceSegEvaluator,
    SuperpixelEvaluator,
    build_evaluator,
)
from seg_methods.evaluation.boundary import RefinementEvaluator

PAN = [COCOPanopticEvaluator, InstanceSegEvaluator, SemSegEvaluator]
EXPECTED = {
    "sem_seg": [SemSegEvaluator],
    "coco": [InstanceSegEvaluator],
    "coco_panoptic_seg": PAN,
    "ade20k_panoptic_seg": PAN,
    "mapillary_vistas_panoptic_seg": PAN,
    "cityscapes_sem_seg": [CityscapesSemSegEvaluator],
    "cityscapes_instance": [CityscapesInstanceEvaluator],
    "cityscapes_panoptic_seg": [
        COCOPanopticEvaluator,
        CityscapesSemSegEvaluator,
        CityscapesInstanceEvaluator,
    ],
    "superpixel": [SuperpixelEvaluator],
    "refinement": [RefinementEvaluator],  # seg_methods/evaluation/boundary.py (CRM)
}


def _cfg(tmp_path, semantic=True, instance=True, panoptic=True):
    cfg = get_cfg()
    cfg.OUTPUT_DIR = str(tmp_path)
    cfg.TEST.SEMANTIC_ON, cfg.TEST.INSTANCE_ON, cfg.TEST.PANOPTIC_ON = semantic, instance, panoptic
    cfg.TEST.SUPERPIXEL_ON = True
    return cfg


@pytest.fixture
def register(tiny_dataset, register_tiny_fn):
    """register(evaluator_type) -> name of a copy of the tiny val split with that type."""

    def _register(evaluator_type):
        records, files = tiny_dataset["val"]
        name = f"_engine_tiny_val_{evaluator_type}"
        register_tiny_fn(name, records, files, evaluator_type=evaluator_type)
        return name

    return _register


def _types(evaluators):
    return [type(e) for e in evaluators._evaluators]


def test_every_table_entry_is_tested():
    assert set(EVALUATORS) == set(EXPECTED)


@pytest.mark.parametrize("evaluator_type", sorted(EXPECTED))
def test_all_outputs_on_selects_every_supported_evaluator(register, tmp_path, evaluator_type):
    name = register(evaluator_type)
    evaluators = build_evaluator(_cfg(tmp_path), name)
    assert _types(evaluators) == EXPECTED[evaluator_type]
    for e in evaluators._evaluators:
        if isinstance(e, InstanceSegEvaluator):
            assert e._use_fast_impl is False and e._tasks == ("segm",)


def test_output_flags_filter_evaluators(register, tmp_path):
    name = register("coco_panoptic_seg")
    only_pan = build_evaluator(_cfg(tmp_path, semantic=False, instance=False), name)
    assert _types(only_pan) == [COCOPanopticEvaluator]
    sem_inst = build_evaluator(_cfg(tmp_path, panoptic=False), name)
    assert _types(sem_inst) == [InstanceSegEvaluator, SemSegEvaluator]
    city = register("cityscapes_panoptic_seg")
    assert _types(build_evaluator(_cfg(tmp_path, panoptic=False, instance=False), city)) == [
        CityscapesSemSegEvaluator
    ]


def test_no_matching_output_or_unknown_type_raises(register, tmp_path):
    name = register("sem_seg")
    with pytest.raises(KeyError, match="SEMANTIC_ON"):
        build_evaluator(_cfg(tmp_path, semantic=False), name)
    bad = register("lvis_v9")
    with pytest.raises(KeyError, match="coco_panoptic_seg"):
        build_evaluator(_cfg(tmp_path), bad)


def _perfect_instances(record, classes_map):
    pan = rgb2id(np.asarray(Image.open(record["pan_seg_file_name"]).convert("RGB")))
    masks, classes = [], []
    for s in record["segments_info"]:
        if s["isthing"]:
            masks.append(torch.from_numpy(pan == s["id"]).float())
            classes.append(classes_map[s["category_id"]])
    inst = Instances((record["height"], record["width"]))
    h, w = record["height"], record["width"]
    inst.pred_masks = torch.stack(masks) if masks else torch.zeros(0, h, w)
    inst.pred_classes = torch.tensor(classes, dtype=torch.int64)
    inst.scores = torch.ones(len(classes))
    return inst


def test_instance_evaluator_handles_sparse_thing_ids(tiny_dataset, register_tiny_fn, tmp_path):
    """Things at joint ids 1, 2 (stuff first, as in ADE20K): detectron2's COCOEvaluator would
    assert; ours maps them to ranks, drops stuff predictions and gets AP = 100."""
    records, files = tiny_dataset["val"]
    name = "_engine_tiny_val_sparse"
    register_tiny_fn(
        name,
        records,
        files,
        evaluator_type="coco",
        thing_dataset_id_to_contiguous_id={1: 1, 2: 2},
        stuff_classes=["sky", "disc", "square"],
    )
    joint = {0: 1, 1: 2, 2: 0}  # tiny contiguous id -> joint id with stuff first
    ev = InstanceSegEvaluator(name, output_dir=str(tmp_path), distributed=False)
    ev.reset()
    for r in records:
        inst = _perfect_instances(r, joint)
        # a stuff-class prediction in the instance output: must be dropped, not crash
        extra = Instances(inst.image_size)
        extra.pred_masks = torch.ones(1, *inst.image_size)
        extra.pred_classes = torch.tensor([0])
        extra.scores = torch.tensor([0.9])
        ev.process([r], [{"instances": Instances.cat([inst, extra])}])
    res = ev.evaluate()["segm"]
    assert res["AP"] == pytest.approx(100.0)
    assert res["AP-disc"] == pytest.approx(100.0) and res["AP-square"] == pytest.approx(100.0)


def test_box_ap_option_selects_bbox_and_refuses_without_instance_evaluator(register, tmp_path):
    name = register("coco_panoptic_seg")
    cfg = _cfg(tmp_path)
    cfg.TEST.BOX_AP = True
    built = build_evaluator(cfg, name)._evaluators
    inst = [e for e in built if isinstance(e, InstanceSegEvaluator)]
    assert len(inst) == 1 and inst[0]._tasks == ("segm", "bbox")
    cfg.TEST.INSTANCE_ON = False
    with pytest.raises(ValueError, match="TEST.BOX_AP=True.*TEST.INSTANCE_ON=False"):
        build_evaluator(cfg, name)
    city = register("cityscapes_panoptic_seg")  # Cityscapes' instance evaluator has no box AP
    cfg.TEST.INSTANCE_ON = True
    with pytest.raises(ValueError, match="evaluator_type=cityscapes_panoptic_seg"):
        build_evaluator(cfg, city)


def test_box_ap_of_exact_shifted_and_missing_boxes(
    tiny_dataset, register_tiny_fn, tmp_path, caplog
):
    """Exact boxes give box AP 100; boxes shifted by their own size (IoU 0) give 0 while mask AP
    stays 100; an instance output without boxes is refused, naming TEST.BOX_AP; placeholder
    (all-zero) boxes are warned about."""
    records, files = tiny_dataset["val"]
    name = "_engine_tiny_val_box_ap"
    register_tiny_fn(name, records, files, evaluator_type="coco")
    ident = {0: 0, 1: 1, 2: 2}

    def run(shift):
        ev = InstanceSegEvaluator(name, output_dir=str(tmp_path), distributed=False, box_ap=True)
        ev.reset()
        for r in records:
            inst = _perfect_instances(r, ident)
            boxes = BitMasks(inst.pred_masks > 0).get_bounding_boxes().tensor  # tight boxes
            if shift:
                boxes = boxes + torch.cat([boxes[:, 2:] - boxes[:, :2]] * 2, dim=1)
            inst.pred_boxes = Boxes(boxes)
            ev.process([r], [{"instances": inst}])
        return ev.evaluate()

    exact = run(False)
    assert exact["bbox"]["AP"] == pytest.approx(100.0)
    assert exact["segm"]["AP"] == pytest.approx(100.0)
    shifted = run(True)
    assert shifted["bbox"]["AP"] == pytest.approx(0.0)
    assert shifted["segm"]["AP"] == pytest.approx(100.0)
    ev = InstanceSegEvaluator(name, output_dir=str(tmp_path), distributed=False, box_ap=True)
    ev.reset()
    with pytest.raises(ValueError, match="TEST.BOX_AP"):
        ev.process([records[0]], [{"instances": _perfect_instances(records[0], ident)}])
    r = next(r for r in records if any(s["isthing"] for s in r["segments_info"]))
    inst = _perfect_instances(r, ident)
    inst.pred_boxes = Boxes(torch.zeros(len(inst), 4))
    with caplog.at_level("WARNING", logger="seg_methods.evaluation.instance_evaluation"):
        ev.process([r], [{"instances": inst}])
    assert "zero area" in caplog.text


def test_flatten_metrics_single_and_multi_dataset(tmp_path):
    single = {"sem_seg": {"mIoU": 50.0, "IoU-a": float("nan")}, "segm": {"AP": np.float32(1.5)}}
    flat = flatten_metrics(single)
    assert flat == {"sem_seg": {"mIoU": 50.0, "IoU-a": None}, "segm": {"AP": 1.5}}
    multi = {"d1": single, "d2": {"panoptic_seg": {"PQ": 3.0}}}
    assert set(flatten_metrics(multi)) == {"d1/sem_seg", "d1/segm", "d2/panoptic_seg"}
    path = tmp_path / "sub" / "metrics.json"
    write_metrics_json(single, str(path))
    assert json.loads(path.read_text()) == flat  # strict JSON: NaN became null
    table = format_metrics_table(flat)
    assert "mIoU" in table and "50.000" in table and "IoU-a" not in table
    assert "IoU-a" in format_metrics_table(flat, per_class=True)
    assert not math.isnan(flat["segm"]["AP"])
