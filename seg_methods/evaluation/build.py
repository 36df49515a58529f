"""Evaluator selection from dataset metadata and the model's output flags.

A dataset's ``MetadataCatalog`` entry names its ``evaluator_type`` (detectron2/Mask2Former
convention). :data:`EVALUATORS` maps each type to the evaluators it supports, each tied to the
model output it scores (``cfg.TEST.SEMANTIC_ON`` / ``INSTANCE_ON`` / ``PANOPTIC_ON``). An
evaluator is built only when the model produces that output.

=============================  ==========================================================
evaluator_type                 evaluators (model output flag)
=============================  ==========================================================
sem_seg                        SemSegEvaluator (semantic)
coco                           InstanceSegEvaluator (instance)
coco_panoptic_seg,             COCOPanopticEvaluator (panoptic), InstanceSegEvaluator
ade20k_panoptic_seg,           (instance), SemSegEvaluator (semantic)
mapillary_vistas_panoptic_seg
cityscapes_sem_seg             CityscapesSemSegEvaluator (semantic)
cityscapes_instance            CityscapesInstanceEvaluator (instance)
cityscapes_panoptic_seg        COCOPanopticEvaluator (panoptic), CityscapesSemSegEvaluator
                               (semantic), CityscapesInstanceEvaluator (instance)
superpixel                     SuperpixelEvaluator (superpixel): ASA and CO
refinement                     RefinementEvaluator (semantic): IoU and mBA of the refined
                               masks and of their coarse inputs (CRM, BIG)
=============================  ==========================================================

``TEST.BOX_AP`` adds box AP ("bbox") to ``InstanceSegEvaluator`` (detectors only: Table 1 of
Unifying Training and Inference reports it); it is refused when no ``InstanceSegEvaluator`` is
selected.

A dataset whose metadata has ``class_hierarchy`` also gets ``HierarchicalSemSegEvaluator``
(mIoU^1..mIoU^L, one per tree level) whenever a semantic evaluator is selected.

The Cityscapes evaluators need ``cityscapesscripts`` when they evaluate; the panoptic evaluator
needs ``panopticapi``.
"""

import os
from typing import Callable, Dict, List, Optional, Tuple

from detectron2.data import MetadataCatalog
from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    CityscapesSemSegEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluators,
    SemSegEvaluator,
)

from ..config.clustseg import superpixel_on
from .boundary import RefinementEvaluator
from .instance_evaluation import InstanceSegEvaluator
from .superpixel import SuperpixelEvaluator

SEMANTIC, INSTANCE, PANOPTIC = "SEMANTIC_ON", "INSTANCE_ON", "PANOPTIC_ON"
SUPERPIXEL = "SUPERPIXEL_ON"


def _sem_seg(dataset_name: str, output_folder: str):
    try:
        return SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder)
    except KeyError as e:
        if e.args != ("sem_seg_file_name",):
            raise
        raise KeyError(
            f"SemSegEvaluator needs 'sem_seg_file_name' in every record of '{dataset_name}'. "
            "Set TEST.SEMANTIC_ON=False or register semantic label PNGs."
        ) from e


def _instance(dataset_name: str, output_folder: str, box_ap: bool = False):
    meta = MetadataCatalog.get(dataset_name)
    if not meta.get("json_file", None):
        raise KeyError(
            f"instance AP on '{dataset_name}' needs the COCO instance json in its metadata "
            "('json_file'). Set TEST.INSTANCE_ON=False or add the json."
        )
    return InstanceSegEvaluator(dataset_name, output_dir=output_folder, box_ap=box_ap)


def _panoptic(dataset_name: str, output_folder: str):
    return COCOPanopticEvaluator(dataset_name, output_dir=output_folder)


def _cityscapes_sem_seg(dataset_name: str, output_folder: str):
    return CityscapesSemSegEvaluator(dataset_name)


def _cityscapes_instance(dataset_name: str, output_folder: str):
    return CityscapesInstanceEvaluator(dataset_name)


def _superpixel(dataset_name: str, output_folder: str):
    return SuperpixelEvaluator(dataset_name)


def _refinement(dataset_name: str, output_folder: str):
    return RefinementEvaluator(dataset_name)


Factory = Callable[[str, str], object]
_GENERIC_PANOPTIC: List[Tuple[str, Factory]] = [
    (PANOPTIC, _panoptic),
    (INSTANCE, _instance),
    (SEMANTIC, _sem_seg),
]

# evaluator_type -> [(cfg.TEST flag of the model output it scores, factory(name, folder))].
EVALUATORS: Dict[str, List[Tuple[str, Factory]]] = {
    "sem_seg": [(SEMANTIC, _sem_seg)],
    "coco": [(INSTANCE, _instance)],
    "coco_panoptic_seg": _GENERIC_PANOPTIC,
    "ade20k_panoptic_seg": _GENERIC_PANOPTIC,
    "mapillary_vistas_panoptic_seg": _GENERIC_PANOPTIC,
    "cityscapes_sem_seg": [(SEMANTIC, _cityscapes_sem_seg)],
    "cityscapes_instance": [(INSTANCE, _cityscapes_instance)],
    "cityscapes_panoptic_seg": [
        (PANOPTIC, _panoptic),
        (SEMANTIC, _cityscapes_sem_seg),
        (INSTANCE, _cityscapes_instance),
    ],
    "superpixel": [(SUPERPIXEL, _superpixel)],
    "refinement": [(SEMANTIC, _refinement)],
}


def model_output_flags(cfg) -> Dict[str, bool]:
    """Which outputs the configured model produces, keyed by their ``cfg.TEST`` flag name.

    ``TEST.SEMANTIC_ON`` / ``INSTANCE_ON`` / ``PANOPTIC_ON`` are read as set. ``SUPERPIXEL_ON`` is
    derived from the model (ClustSeg's ``MODEL.CLUSTSEG.TASK``), see
    :func:`seg_methods.config.clustseg.superpixel_on`, which refuses a contradicting config.
    """
    flags = {flag: bool(cfg.TEST.get(flag)) for flag in (SEMANTIC, INSTANCE, PANOPTIC)}
    flags[SUPERPIXEL] = superpixel_on(cfg)
    return flags


def build_evaluator(cfg, dataset_name: str, output_folder: Optional[str] = None):
    """Evaluators for ``dataset_name`` given what the model outputs.

    Args:
        cfg (CfgNode): config with ``TEST.SEMANTIC_ON/INSTANCE_ON/PANOPTIC_ON`` (the model's
            superpixel output is derived, see :func:`model_output_flags`).
        dataset_name (str): a registered dataset whose metadata has ``evaluator_type``.
        output_folder (str or None): where evaluators write files (default
            ``OUTPUT_DIR/inference``).

    Returns:
        DatasetEvaluators: the selected evaluators, in the order of :data:`EVALUATORS`.

    Raises:
        KeyError: unknown or missing ``evaluator_type``, or no evaluator matches the enabled
            model outputs.
    """
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    if evaluator_type not in EVALUATORS:
        raise KeyError(
            f"Dataset '{dataset_name}' has evaluator_type={evaluator_type!r}; supported: "
            f"{sorted(EVALUATORS)}."
        )
    outputs = model_output_flags(cfg)
    box_ap = bool(cfg.TEST.get("BOX_AP", False))
    evaluators = [
        factory(dataset_name, output_folder, box_ap=True)
        if box_ap and factory is _instance
        else factory(dataset_name, output_folder)
        for flag, factory in EVALUATORS[evaluator_type]
        if outputs[flag]
    ]
    if box_ap and not any(isinstance(e, InstanceSegEvaluator) for e in evaluators):
        raise ValueError(
            f"TEST.BOX_AP=True, but no COCO instance evaluator is built for '{dataset_name}' "
            f"(evaluator_type={evaluator_type}, TEST.INSTANCE_ON={outputs[INSTANCE]}): box AP "
            "is evaluated by InstanceSegEvaluator only. Set TEST.BOX_AP=False or "
            "TEST.INSTANCE_ON=True."
        )
    if not evaluators:
        flags = ", ".join(f"TEST.{f}={on}" for f, on in outputs.items())
        supported = sorted({f for f, _ in EVALUATORS[evaluator_type]})
        raise KeyError(
            f"No evaluator for '{dataset_name}' (evaluator_type={evaluator_type}) with {flags}: "
            f"enable one of {supported} for the outputs your model produces."
        )
    evaluators += _hierarchical(cfg, dataset_name, evaluator_type, outputs, output_folder)
    return DatasetEvaluators(evaluators)


# --- per-level mIoU^1..L (HSSN; seg_methods/evaluation/hierarchy.py) -------------------------
def _hierarchical(cfg, dataset_name, evaluator_type, outputs, output_folder) -> List:
    """[HierarchicalSemSegEvaluator] when the dataset's metadata has ``class_hierarchy`` and a
    semantic evaluator is selected (any model: flat baselines get mIoU^l too), else []."""
    from .hierarchy import HierarchicalSemSegEvaluator

    semantic = outputs[SEMANTIC] and any(f == SEMANTIC for f, _ in EVALUATORS[evaluator_type])
    if not semantic or not MetadataCatalog.get(dataset_name).get("class_hierarchy", None):
        return []
    return [HierarchicalSemSegEvaluator(dataset_name, output_dir=output_folder)]
