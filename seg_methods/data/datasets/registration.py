"""One registration for every dataset in the COCO panoptic format (Mask2Former's conventions),
and the helpers a user calls to register their own semantic or panoptic dataset.

COCO, ADE20K and Mapillary Vistas register their panoptic splits with
:func:`register_panoptic_dataset`, so the loader and the metadata keys the evaluators and mappers
read (``image_root``, ``panoptic_root``, ``panoptic_json``, ``sem_seg_root``, ``json_file``,
``evaluator_type`` and the class metadata) are written in one place. (The synthetic dataset sets
the same keys in ``_synthetic.register_synthetic``; it can pass ``loader=`` and ``layout=None``.)

Own datasets (worked example in datasets/README.md, "Registering your own dataset"):

* :func:`register_semantic_dataset`: images + semantic PNGs of contiguous class ids;
* :func:`prepare_panoptic_dataset` (semantic PNGs and COCO instance json derived from a COCO
  panoptic json + PNGs) then :func:`register_coco_panoptic_dataset`.
"""

import dataclasses
import functools
import json
import os
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from .class_tables import panoptic_metadata_from_categories
from .layout import register_checked
from .panoptic_utils import (
    load_panoptic_json,
    read_panoptic_png,
    semantic_from_panoptic,
    write_coco_instances_from_panoptic,
)

__all__ = [
    "PanopticFiles",
    "prepare_panoptic_dataset",
    "register_coco_panoptic_dataset",
    "register_panoptic_dataset",
    "register_semantic_dataset",
]


@dataclasses.dataclass(frozen=True)
class PanopticFiles:
    """The files of one split of a COCO-format panoptic dataset (names = metadata keys).

    Attributes:
        image_root (str): folder of the images.
        panoptic_root (str): folder of the panoptic PNGs.
        panoptic_json (str): the COCO panoptic json.
        sem_seg_root (str): folder of the semantic PNGs (same names as the panoptic PNGs).
        json_file (str): COCO instance json of the things (read by the instance evaluator).
    """

    image_root: str
    panoptic_root: str
    panoptic_json: str
    sem_seg_root: str
    json_file: str


def register_panoptic_dataset(
    name: str,
    metadata: Mapping,
    files: PanopticFiles,
    *,
    evaluator_type: str,
    layout: Optional[str] = None,
    loader: Optional[Callable[[], List[Dict]]] = None,
    **extra_metadata,
) -> None:
    """Register a COCO-format panoptic dataset and set its metadata.

    The metadata is ``files`` (as its five keys), ``evaluator_type``, ``metadata`` and
    ``extra_metadata``.

    Args:
        name (str): dataset name.
        metadata (Mapping): class metadata (``thing_classes``, the two id maps, colours, ...), as
            made by ``panoptic_metadata_from_categories``; the loader maps category ids with it.
        files (PanopticFiles): where the split is.
        evaluator_type (str): metadata ``evaluator_type``.
        layout (str or None): drawing of the expected files; when given, loading first checks
            that the four inputs of the loader exist (see ``layout.register_checked``).
        loader (callable or None): returns the dataset dicts; default :func:`load_panoptic_json`
            on ``files``.
        **extra_metadata: further metadata (``ignore_label``, ``label_divisor``, ...). A key also
            present in ``metadata`` raises ``TypeError``.
    """
    if loader is None:
        loader = functools.partial(
            load_panoptic_json,
            files.panoptic_json,
            files.image_root,
            files.panoptic_root,
            files.sem_seg_root,
            metadata,
        )
    if layout is None:
        DatasetCatalog.register(name, loader)
    else:
        required = [files.image_root, files.panoptic_root, files.panoptic_json, files.sem_seg_root]
        register_checked(name, loader, required, layout)
    MetadataCatalog.get(name).set(
        **dataclasses.asdict(files),
        evaluator_type=evaluator_type,
        **metadata,
        **extra_metadata,
    )


# ------------------------------------------------------------------------- own datasets
def _replace(name: str) -> None:
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)


def _default_colors(n: int) -> List[List[int]]:
    """``n`` distinct, deterministic colours (golden-ratio hue walk)."""
    import colorsys

    return [
        [int(255 * c) for c in colorsys.hsv_to_rgb((0.618034 * i) % 1.0, 0.65, 0.95)]
        for i in range(n)
    ]


def register_semantic_dataset(
    name: str,
    *,
    image_root: str,
    sem_seg_root: str,
    stuff_classes: Sequence[str],
    ignore_label: int = 255,
    image_ext: str = ".jpg",
    gt_ext: str = ".png",
    stuff_colors: Optional[Sequence[Sequence[int]]] = None,
    evaluator_type: str = "sem_seg",
    **extra_metadata,
) -> None:
    """Register a semantic-segmentation dataset: ``image_root/<stem><image_ext>`` and
    ``sem_seg_root/<stem><gt_ext>`` (single-channel PNG of contiguous class ids 0..C-1,
    ``ignore_label`` for void), loaded with detectron2's ``load_sem_seg``.

    Metadata set: ``image_root``, ``sem_seg_root``, ``stuff_classes``, ``stuff_colors``,
    ``ignore_label``, ``evaluator_type`` (read by ``SemSegEvaluator``) and ``extra_metadata``
    (e.g. ``class_hierarchy``). Re-registering a name replaces it.

    Args:
        name (str): dataset name (used in ``DATASETS.TRAIN`` / ``DATASETS.TEST``).
        image_root (str): folder of the images.
        sem_seg_root (str): folder of the label PNGs (same stems as the images).
        stuff_classes (Sequence[str]): class names, index = class id.
        ignore_label (int): void label of the PNGs.
        image_ext (str): extension of the images.
        gt_ext (str): extension of the label PNGs.
        stuff_colors (Sequence or None): one RGB colour per class (default: generated).
        evaluator_type (str): metadata ``evaluator_type``.
        **extra_metadata: further metadata.
    """
    from detectron2.data.datasets import load_sem_seg

    _replace(name)
    DatasetCatalog.register(
        name,
        functools.partial(
            load_sem_seg, sem_seg_root, image_root, gt_ext=gt_ext, image_ext=image_ext
        ),
    )
    MetadataCatalog.get(name).set(
        image_root=image_root,
        sem_seg_root=sem_seg_root,
        stuff_classes=list(stuff_classes),
        stuff_colors=[list(c) for c in (stuff_colors or _default_colors(len(stuff_classes)))],
        ignore_label=ignore_label,
        evaluator_type=evaluator_type,
        **extra_metadata,
    )


def _categories(panoptic_json: str) -> List[Dict]:
    with open(panoptic_json) as f:
        categories = json.load(f)["categories"]
    colors = _default_colors(len(categories))
    return [
        dict(c, isthing=int(c.get("isthing", 0)), color=c.get("color", colors[i]))
        for i, c in enumerate(categories)
    ]


def prepare_panoptic_dataset(files: "PanopticFiles", ignore_label: int = 255) -> Dict[str, int]:
    """Write what the evaluators need besides a COCO panoptic json + PNGs.

    * ``files.sem_seg_root/<panoptic png name>``: uint8 semantic PNGs (contiguous id = position
      of the category in the json's ``categories``, ``ignore_label`` on void), for
      ``SemSegEvaluator`` (``TEST.SEMANTIC_ON``) and the semantic targets;
    * ``files.json_file``: COCO instance json of the thing segments, for
      ``InstanceSegEvaluator`` (``TEST.INSTANCE_ON``).

    Args:
        files (PanopticFiles): the split (``panoptic_json`` and ``panoptic_root`` are read).
        ignore_label (int): void label of the semantic PNGs.

    Returns:
        dict: ``{"semantic_pngs": n, "instances": m}`` written.
    """
    from PIL import Image

    with open(files.panoptic_json) as f:
        panoptic = json.load(f)
    to_contiguous = {c["id"]: i for i, c in enumerate(panoptic["categories"])}
    os.makedirs(files.sem_seg_root, exist_ok=True)
    for ann in panoptic["annotations"]:
        pan = read_panoptic_png(os.path.join(files.panoptic_root, ann["file_name"]))
        sem = semantic_from_panoptic(pan, ann["segments_info"], to_contiguous, ignore_label)
        Image.fromarray(sem).save(os.path.join(files.sem_seg_root, ann["file_name"]))
    n_inst = write_coco_instances_from_panoptic(
        files.panoptic_json, files.panoptic_root, files.json_file
    )
    return {"semantic_pngs": len(panoptic["annotations"]), "instances": n_inst}


def register_coco_panoptic_dataset(
    name: str,
    files: "PanopticFiles",
    *,
    ignore_label: int = 255,
    label_divisor: int = 1000,
    evaluator_type: str = "coco_panoptic_seg",
    **extra_metadata,
) -> None:
    """Register an own panoptic dataset in the COCO panoptic format.

    The classes are the json's ``categories`` (``id``, ``name``, ``isthing``, optional
    ``color``), in that order: contiguous id = position. Metadata follows Mask2Former's
    conventions (:func:`~seg_methods.data.datasets.class_tables.panoptic_metadata_from_categories`:
    ``stuff_classes`` lists every class) plus the five file keys of ``files``, ``ignore_label``,
    ``label_divisor`` and ``evaluator_type`` "coco_panoptic_seg" (panoptic, instance and semantic
    evaluators). The json is read when this is called; the images on first use. Re-registering a
    name replaces it.

    Args:
        name (str): dataset name.
        files (PanopticFiles): where the split is (see :func:`prepare_panoptic_dataset` for
            ``sem_seg_root`` and ``json_file``).
        ignore_label (int): void label of the semantic PNGs.
        label_divisor (int): panoptic id = class * label_divisor + instance (model outputs).
        evaluator_type (str): metadata ``evaluator_type``.
        **extra_metadata: further metadata (e.g. ``class_hierarchy``).
    """
    _replace(name)
    metadata = panoptic_metadata_from_categories(_categories(files.panoptic_json))
    register_panoptic_dataset(
        name,
        metadata,
        files,
        evaluator_type=evaluator_type,
        ignore_label=ignore_label,
        label_divisor=label_divisor,
        **extra_metadata,
    )
