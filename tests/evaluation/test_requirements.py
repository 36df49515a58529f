"""check_evaluation_requirements: evaluator needs are checked before training, with errors that
name the dataset, the missing key and the config key to change."""

import json

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from seg_methods.config import get_cfg
from seg_methods.evaluation.build import EVALUATORS
from seg_methods.evaluation.requirements import (
    REQUIREMENTS,
    EvaluationRequirementError,
    check_evaluation_requirements,
    evaluation_problems,
)


def _register(name, records, **meta):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: [dict(r) for r in records])
    MetadataCatalog.get(name).set(**meta)


@pytest.fixture
def panoptic_files(tmp_path):
    """Files a panoptic evaluator reads (contents are not read by the check)."""
    (tmp_path / "pan").mkdir()
    pan_json = tmp_path / "panoptic.json"
    inst_json = tmp_path / "instances.json"
    pan_json.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    inst_json.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    return {
        "panoptic_root": str(tmp_path / "pan"),
        "panoptic_json": str(pan_json),
        "json_file": str(inst_json),
        "thing_dataset_id_to_contiguous_id": {1: 0},
        "stuff_dataset_id_to_contiguous_id": {1: 0, 2: 1},
        "stuff_classes": ["a", "b"],
        "thing_classes": ["a"],
        "ignore_label": 255,
    }


def _cfg(name, semantic=True, instance=True, panoptic=True):
    cfg = get_cfg()
    cfg.DATASETS.TEST = (name,) if isinstance(name, str) else tuple(name)
    cfg.TEST.SEMANTIC_ON, cfg.TEST.INSTANCE_ON, cfg.TEST.PANOPTIC_ON = semantic, instance, panoptic
    return cfg


RECORDS_NO_SEM = [
    {"file_name": "a.jpg", "image_id": 0, "pan_seg_file_name": "a.png", "segments_info": []},
    {"file_name": "b.jpg", "image_id": 1, "pan_seg_file_name": "b.png", "segments_info": []},
]


def test_every_evaluator_factory_has_requirements():
    factories = {f.__name__ for entries in EVALUATORS.values() for _, f in entries}
    assert factories <= set(REQUIREMENTS)


def test_panoptic_dataset_without_semantic_pngs_and_semantic_on(panoptic_files):
    """The issue's example: a custom panoptic dataset without sem_seg_file_name."""
    name = "_req_custom_panoptic"
    _register(name, RECORDS_NO_SEM, evaluator_type="coco_panoptic_seg", **panoptic_files)
    with pytest.raises(EvaluationRequirementError) as e:
        check_evaluation_requirements(_cfg(name))
    msg = str(e.value)
    assert name in msg and "'sem_seg_file_name'" in msg and "TEST.SEMANTIC_ON=False" in msg
    assert "2 of 2 records" in msg and "a.jpg" in msg
    assert "INSTANCE_ON" not in msg and "PANOPTIC_ON" not in msg  # those can run
    check_evaluation_requirements(_cfg(name, semantic=False))  # no error


def test_missing_metadata_and_files_are_named(panoptic_files, tmp_path):
    name = "_req_missing_meta"
    meta = dict(panoptic_files)
    del meta["json_file"]
    meta["panoptic_json"] = str(tmp_path / "nope.json")
    records = [dict(r, sem_seg_file_name="s.png") for r in RECORDS_NO_SEM]
    _register(name, records, evaluator_type="coco_panoptic_seg", **meta)
    problems = evaluation_problems(_cfg(name), name)
    assert len(problems) == 2
    assert "'json_file'" in problems[1] and "TEST.INSTANCE_ON=False" in problems[1]
    assert "nope.json" in problems[0] and "TEST.PANOPTIC_ON=False" in problems[0]
    assert evaluation_problems(_cfg(name, instance=False, panoptic=False), name) == []


def test_unknown_type_no_enabled_evaluator_and_superpixel_fields(tmp_path):
    _register("_req_unknown", [], evaluator_type="lvis_v9")
    _register("_req_semseg", [{"file_name": "x.jpg"}], evaluator_type="sem_seg")
    _register("_req_superpixel", [{"file_name": "y.jpg"}], evaluator_type="superpixel")
    cfg = _cfg(["_req_unknown", "_req_semseg", "_req_superpixel"], semantic=False)
    cfg.TEST.SUPERPIXEL_ON = True
    with pytest.raises(EvaluationRequirementError) as e:
        check_evaluation_requirements(cfg)
    msg = str(e.value)
    assert "'_req_unknown'" in msg and "lvis_v9" in msg and "DATASETS.TEST" in msg
    assert "'_req_semseg'" in msg and "TEST.SEMANTIC_ON" in msg
    assert "'_req_superpixel'" in msg and "'regions_file_name'" in msg
    assert "superpixel output (MODEL.CLUSTSEG.TASK / TEST.SUPERPIXEL_ON)" in msg
    assert msg.count("\n  - ") == 3  # one line per problem, all datasets in one error


def test_complete_dataset_passes(panoptic_files):
    name = "_req_complete"
    records = [dict(r, sem_seg_file_name="s.png") for r in RECORDS_NO_SEM]
    _register(name, records, evaluator_type="coco_panoptic_seg", **panoptic_files)
    check_evaluation_requirements(_cfg(name))
    check_evaluation_requirements(_cfg(name), dataset_names=[])  # nothing to check


def test_files_created_by_the_dataset_loader_are_found(panoptic_files, tmp_path):
    """The embedded dataset writes its files on first load: the check loads the records before
    calling a missing file missing (a fresh clone's first train_net.py run)."""
    name = "_req_lazy_files"
    late = tmp_path / "generated_on_first_load"
    meta = dict(panoptic_files, panoptic_root=str(late))
    records = [dict(r, sem_seg_file_name="s.png") for r in RECORDS_NO_SEM]

    def load():
        late.mkdir(exist_ok=True)
        return [dict(r) for r in records]

    _register(name, records, evaluator_type="coco_panoptic_seg", **meta)
    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, load)
    assert not late.exists()
    check_evaluation_requirements(_cfg(name))
    assert late.exists()
