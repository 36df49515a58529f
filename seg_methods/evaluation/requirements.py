"""Check, before training starts, that every evaluator the config enables can run.

:func:`~seg_methods.evaluation.build.build_evaluator` picks evaluators from each test set's
``evaluator_type`` and the ``cfg.TEST.*_ON`` flags
(:data:`~seg_methods.evaluation.build.EVALUATORS`), but the evaluators only read their metadata
and files when evaluation runs, i.e. after training.
:func:`check_evaluation_requirements` walks the same table up front and raises one
:class:`EvaluationRequirementError` listing, for each problem, the dataset, the missing metadata
key / record field / file / package, and the config key that turns the evaluator off.

What each evaluator needs (:data:`REQUIREMENTS`, keyed by the factory names of ``build.py``):

=======================  ======================================================  ===============
evaluator                needs                                                   flag
=======================  ======================================================  ===============
SemSegEvaluator          record ``sem_seg_file_name``; metadata                  SEMANTIC_ON
                         ``stuff_classes``, ``ignore_label``
InstanceSegEvaluator     metadata ``json_file`` (existing file),                 INSTANCE_ON
                         ``thing_dataset_id_to_contiguous_id``
COCOPanopticEvaluator    metadata ``panoptic_json`` (file), ``panoptic_root``    PANOPTIC_ON
                         (folder), both id maps; package ``panopticapi``
Cityscapes evaluators    metadata ``gt_dir`` (folder); package                   SEMANTIC_ON /
                         ``cityscapesscripts``                                   INSTANCE_ON
SuperpixelEvaluator      record ``regions_file_name``                            SUPERPIXEL_ON
RefinementEvaluator      record ``mask_file_name`` (binary ground-truth PNG)     SEMANTIC_ON
=======================  ======================================================  ===============
"""

import importlib.util
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog

from .build import EVALUATORS, SUPERPIXEL, model_output_flags

README = "datasets/README.md"


class EvaluationRequirementError(ValueError):
    """An evaluator enabled by the config cannot run on a test set (raised before training)."""


@dataclass(frozen=True)
class Requirement:
    """What one evaluator reads.

    Attributes:
        evaluator (str): evaluator name, for messages.
        metadata (tuple[str]): ``MetadataCatalog`` keys that must be set.
        metadata_paths (tuple[str]): metadata keys naming files/folders that must exist.
        record_fields (tuple[str]): fields every dataset record must have.
        packages (tuple[str]): importable packages needed.
        fix (str): how to provide what is missing (besides turning the evaluator off).
    """

    evaluator: str
    metadata: Tuple[str, ...] = ()
    metadata_paths: Tuple[str, ...] = ()
    record_fields: Tuple[str, ...] = ()
    packages: Tuple[str, ...] = ()
    fix: str = ""


_CITYSCAPES = "the Cityscapes layout and `pip install cityscapesscripts`"
# factory name in build.EVALUATORS -> what the evaluator it builds reads.
REQUIREMENTS: Dict[str, Requirement] = {
    "_sem_seg": Requirement(
        "SemSegEvaluator",
        metadata=("stuff_classes", "ignore_label"),
        record_fields=("sem_seg_file_name",),
        fix="register semantic label PNGs (sem_seg_root of the registration helpers)",
    ),
    "_instance": Requirement(
        "InstanceSegEvaluator",
        metadata=("json_file", "thing_dataset_id_to_contiguous_id"),
        metadata_paths=("json_file",),
        fix="add the COCO instance json (json_file)",
    ),
    "_panoptic": Requirement(
        "COCOPanopticEvaluator",
        metadata=(
            "panoptic_json",
            "panoptic_root",
            "thing_dataset_id_to_contiguous_id",
            "stuff_dataset_id_to_contiguous_id",
        ),
        metadata_paths=("panoptic_json", "panoptic_root"),
        packages=("panopticapi",),
        fix="register the COCO panoptic json and PNG folder",
    ),
    "_cityscapes_sem_seg": Requirement(
        "CityscapesSemSegEvaluator",
        metadata=("gt_dir",),
        metadata_paths=("gt_dir",),
        packages=("cityscapesscripts",),
        fix=_CITYSCAPES,
    ),
    "_cityscapes_instance": Requirement(
        "CityscapesInstanceEvaluator",
        metadata=("gt_dir", "thing_classes"),
        metadata_paths=("gt_dir",),
        packages=("cityscapesscripts",),
        fix=_CITYSCAPES,
    ),
    "_superpixel": Requirement(
        "SuperpixelEvaluator",
        record_fields=("regions_file_name",),
        fix="register ground-truth region maps (regions_file_name)",
    ),
    "_refinement": Requirement(
        "RefinementEvaluator",
        record_fields=("mask_file_name",),
        fix="register binary ground-truth masks (mask_file_name, see the BIG section)",
    ),
}


def _switch(flag: str) -> Tuple[str, str]:
    """(what enabled the evaluator, how to turn it off) for messages."""
    if flag == SUPERPIXEL:  # derived from the model (seg_methods.config.clustseg.superpixel_on)
        return (
            "the model's superpixel output (MODEL.CLUSTSEG.TASK / TEST.SUPERPIXEL_ON)",
            "or remove the dataset from DATASETS.TEST",
        )
    return f"TEST.{flag}=True", f"or set TEST.{flag}=False"


def evaluation_problems(cfg, dataset_name: str) -> List[str]:
    """Problems that would make evaluation on ``dataset_name`` fail with this config.

    Loads the dataset's records (``DatasetCatalog.get``, which also generates the embedded
    dataset on first use) when an enabled evaluator reads record fields, or files that do not
    exist yet.

    Args:
        cfg (CfgNode): config with the ``TEST.*_ON`` flags (the superpixel output is derived
            from the model, as :func:`~seg_methods.evaluation.build.model_output_flags` does).
        dataset_name (str): a registered test set.

    Returns:
        list[str]: one sentence per problem (empty when evaluation can run).
    """
    meta = MetadataCatalog.get(dataset_name)
    evaluator_type = meta.get("evaluator_type", None)
    if evaluator_type not in EVALUATORS:
        return [
            f"test set '{dataset_name}' has metadata evaluator_type={evaluator_type!r}; "
            f"supported: {sorted(EVALUATORS)}. Set it when registering the dataset "
            f"(see {README}) or remove the dataset from DATASETS.TEST."
        ]
    outputs = model_output_flags(cfg)
    enabled = [(flag, f) for flag, f in EVALUATORS[evaluator_type] if outputs[flag]]
    if not enabled:
        flags = sorted({flag for flag, _ in EVALUATORS[evaluator_type]})
        return [
            f"test set '{dataset_name}' (evaluator_type={evaluator_type}) has no evaluator for "
            f"the enabled outputs: enable one of {['TEST.' + f for f in flags]} or remove the "
            "dataset from DATASETS.TEST."
        ]
    problems: List[str] = []
    records: Optional[List[Dict]] = None
    for flag, factory in enabled:
        req = REQUIREMENTS.get(getattr(factory, "__name__", ""))
        if req is None:  # an evaluator added to build.py without an entry here: not checked
            continue
        enabled_by, off = _switch(flag)
        head = f"test set '{dataset_name}': {req.evaluator} (enabled by {enabled_by})"
        unset = [key for key in req.metadata if meta.get(key, None) is None]
        if unset:
            keys = ", ".join(f"'{k}'" for k in unset)
            problems.append(
                f"{head} needs metadata {keys}, not set. Set {'it' if len(unset) == 1 else 'them'}"
                f" when registering the dataset (see {README}: {req.fix}) {off}."
            )
        for key in req.metadata_paths:
            path = meta.get(key, None)
            if path is not None and not os.path.exists(path) and records is None:
                # Loading the records may create the files (the embedded dataset is generated
                # on first use), so look again after loading them.
                records = DatasetCatalog.get(dataset_name)
            if path is not None and not os.path.exists(path):
                problems.append(
                    f"{head} reads metadata '{key}' = '{path}', which does not exist. "
                    f"{req.fix[0].upper() + req.fix[1:]} {off}."
                )
        for package in req.packages:
            if importlib.util.find_spec(package) is None:
                problems.append(
                    f"{head} needs the Python package '{package}', which is not installed. "
                    f"Install it {off}."
                )
        if req.record_fields:
            if records is None:
                records = DatasetCatalog.get(dataset_name)
            for key in req.record_fields:
                lacking = [r for r in records if key not in r]
                if lacking:
                    problems.append(
                        f"{head} needs '{key}' in every dataset record, but {len(lacking)} of "
                        f"{len(records)} records lack it (first: '{lacking[0].get('file_name')}'"
                        f"). {req.fix[0].upper() + req.fix[1:]} (see {README}) {off}."
                    )
    return problems


def check_evaluation_requirements(cfg, dataset_names: Optional[Sequence[str]] = None) -> None:
    """Raise before training if an evaluator the config enables cannot run.

    Call it where training or evaluation starts (``Trainer.__init__`` and the eval-only entry
    point): evaluation otherwise fails only after training ends.

    Args:
        cfg (CfgNode): the config (``DATASETS.TEST``, ``TEST.SEMANTIC_ON/INSTANCE_ON/
            PANOPTIC_ON/SUPERPIXEL_ON``).
        dataset_names (Sequence[str] or None): test sets to check (default
            ``cfg.DATASETS.TEST``).

    Raises:
        EvaluationRequirementError: listing every problem found, each naming the dataset, the
            missing metadata key / record field / file / package and the config key to change.
    """
    names = list(cfg.DATASETS.TEST if dataset_names is None else dataset_names)
    problems = [p for name in names for p in evaluation_problems(cfg, name)]
    if problems:
        raise EvaluationRequirementError(
            "Evaluation would fail after training:\n" + "\n".join(f"  - {p}" for p in problems)
        )


__all__ = [
    "EvaluationRequirementError",
    "REQUIREMENTS",
    "Requirement",
    "check_evaluation_requirements",
    "evaluation_problems",
]
