"""Mapillary Vistas v1.2: semantic (65 classes) and panoptic, in the dataset's own layout.

No preprocessing is needed: ``labels/*.png`` hold the label values 0..65 (65 = unlabeled, used as
``ignore_label`` as in Mask2Former) and ``panoptic/panoptic_2018.json`` uses category id =
label + 1. Class table: ``meta/mapillary_vistas_v1.2.csv``; the class hierarchy is derived from
the label keys (``object--vehicle--car`` -> ``object--vehicle`` -> ``object``).
"""

import functools
import os

from detectron2.data import MetadataCatalog
from detectron2.data.datasets import load_sem_seg

from .class_tables import hierarchy_from_keys, panoptic_metadata_from_categories, read_class_table
from .layout import register_checked
from .registration import PanopticFiles, register_panoptic_dataset

VISTAS_IGNORE_LABEL = 65

VISTAS_LAYOUT = """\
mapillary_vistas/
  training/
    images/*.jpg
    labels/*.png          # label values 0..65 (65 = unlabeled)
    instances/*.png
    panoptic/*.png
    panoptic/panoptic_2018.json
  validation/             # same as training/
  mapillary_vistas_instance_{train,val}.json  # datasets/prepare_mapillary_vistas_ins_seg.py (AP)
"""


def vistas_categories() -> list:
    """The 65 classes as COCO-style categories (dataset id = label + 1)."""
    return [dict(c, id=c["id"] + 1) for c in read_class_table("mapillary_vistas_v1.2.csv")]


def vistas_metadata() -> dict:
    """Mask2Former-style panoptic metadata plus ``class_hierarchy``."""
    cats = vistas_categories()
    meta = panoptic_metadata_from_categories(cats)
    meta["class_hierarchy"] = hierarchy_from_keys(
        [c["key"] for c in cats], [c["name"] for c in cats]
    )
    return meta


def register_all_mapillary_vistas(root: str) -> None:
    """Register ``mapillary_vistas_{sem_seg,panoptic}_{train,val}``.

    Args:
        root (str): ``$DETECTRON2_DATASETS``.
    """
    meta = vistas_metadata()
    for split, dirname in (("train", "training"), ("val", "validation")):
        base = os.path.join(root, "mapillary_vistas", dirname)
        files = PanopticFiles(
            image_root=os.path.join(base, "images"),
            panoptic_root=os.path.join(base, "panoptic"),
            panoptic_json=os.path.join(base, "panoptic", "panoptic_2018.json"),
            sem_seg_root=os.path.join(base, "labels"),
            json_file=os.path.join(
                root, "mapillary_vistas", f"mapillary_vistas_instance_{split}.json"
            ),
        )

        name = f"mapillary_vistas_sem_seg_{split}"
        register_checked(
            name,
            functools.partial(
                load_sem_seg, files.sem_seg_root, files.image_root, gt_ext="png", image_ext="jpg"
            ),
            [files.image_root, files.sem_seg_root],
            VISTAS_LAYOUT,
        )
        MetadataCatalog.get(name).set(
            image_root=files.image_root,
            sem_seg_root=files.sem_seg_root,
            stuff_classes=meta["stuff_classes"],
            stuff_colors=meta["stuff_colors"],
            class_hierarchy=meta["class_hierarchy"],
            evaluator_type="sem_seg",
            ignore_label=VISTAS_IGNORE_LABEL,
        )

        register_panoptic_dataset(
            f"mapillary_vistas_panoptic_{split}",
            meta,
            files,
            evaluator_type="mapillary_vistas_panoptic_seg",
            layout=VISTAS_LAYOUT,
            ignore_label=VISTAS_IGNORE_LABEL,
            label_divisor=1000,
        )


# ----------------------------------------------------------------------------- Vistas v2.0
# Semantic segmentation with the v2.0 label set. Its classes are NOT typed here: they are read
# from the dataset's own ``config_v2.0.json`` when the datasets are registered (the file lists
# the labels in label-value order, each with its hierarchical key "name", e.g.
# "construction--flat--road", its "readable" name, "color" and "evaluate" flag). HSSN's 3-level
# tree comes from the key components (``hierarchy_from_keys(mid_tokens=2)``: leaf -> first two
# components "construction--flat" -> first component "construction"; a 4-component key such as
# "marking--discrete--arrow--left" goes under "marking--discrete").

VISTAS_V2_LAYOUT = """\
mapillary_vistas/
  config_v2.0.json        # the label list of v2.0 (shipped with the dataset)
  training/
    images/*.jpg
    v2.0/labels/*.png     # label value = index in config_v2.0.json "labels"
  validation/             # same as training/
"""


def vistas_v2_metadata(config_file: str) -> dict:
    """Semantic metadata of Mapillary Vistas v2.0 from its ``config_v2.0.json``.

    The classes are the labels with ``"evaluate": true`` (a missing flag counts as true), in
    file order; as in v1.2 (Mask2Former's 65 classes), the labels not evaluated must come last,
    and there must be exactly one of them ("void--unlabeled" in the released files): its label
    value is the ``ignore_label``, so the label PNGs are used as they are (value = class id).

    Args:
        config_file (str): path of ``config_v2.0.json``.

    Returns:
        dict: ``stuff_classes`` (readable names), ``stuff_colors``, ``class_hierarchy`` (3 levels
        from the label keys), ``ignore_label``, ``label_keys``.

    Raises:
        ValueError: the file has no "labels" list, a label lacks "name", or the labels that are
            not evaluated are not exactly one trailing label.
    """
    import json

    with open(config_file) as f:
        labels = json.load(f).get("labels")
    if not isinstance(labels, list) or not labels:
        raise ValueError(f"{config_file}: expected a non-empty 'labels' list")
    if any("name" not in lab for lab in labels):
        raise ValueError(f"{config_file}: every label needs its hierarchical key 'name'")
    evaluated = [bool(lab.get("evaluate", True)) for lab in labels]
    num_classes = sum(evaluated)
    if evaluated != [True] * num_classes + [False] * (len(labels) - num_classes) or (
        len(labels) - num_classes != 1
    ):
        skipped = [lab["name"] for lab, e in zip(labels, evaluated) if not e]
        raise ValueError(
            f"{config_file}: the labels not evaluated {skipped} must be exactly one label, the "
            "last one (it becomes the ignore label and the label PNGs are used as they are); "
            "remap the label PNGs for other label sets"
        )
    classes = labels[:num_classes]
    keys = [lab["name"] for lab in classes]
    names = [lab.get("readable", lab["name"]) for lab in classes]
    return {
        "stuff_classes": names,
        "stuff_colors": [list(lab.get("color", [0, 0, 0])) for lab in classes],
        "class_hierarchy": hierarchy_from_keys(keys, names, mid_tokens=2),
        "ignore_label": num_classes,
        "label_keys": keys,
    }


def register_all_mapillary_vistas_v2(root: str) -> None:
    """Register ``mapillary_vistas_v2_sem_seg_{train,val}``.

    The class metadata (``stuff_classes``, ``class_hierarchy``, ``ignore_label``) is read from
    ``mapillary_vistas/config_v2.0.json`` now if the file exists; otherwise the datasets are
    registered without it (metadata ``classes_file`` names the file) and loading them reports
    the missing files. A config file this reader does not support is reported when the dataset
    is loaded, not at import.

    Args:
        root (str): ``$DETECTRON2_DATASETS``.
    """
    base = os.path.join(root, "mapillary_vistas")
    config_file = os.path.join(base, "config_v2.0.json")
    meta, problem = {}, None
    if os.path.isfile(config_file):
        try:
            meta = vistas_v2_metadata(config_file)
        except ValueError as e:  # reported on use, so that importing seg_methods never fails
            problem = e
    for split, dirname in (("train", "training"), ("val", "validation")):
        image_root = os.path.join(base, dirname, "images")
        sem_seg_root = os.path.join(base, dirname, "v2.0", "labels")
        loader = functools.partial(
            load_sem_seg, sem_seg_root, image_root, gt_ext="png", image_ext="jpg"
        )
        if problem is not None:
            loader = functools.partial(_raise, problem)
        name = f"mapillary_vistas_v2_sem_seg_{split}"
        register_checked(name, loader, [image_root, sem_seg_root, config_file], VISTAS_V2_LAYOUT)
        MetadataCatalog.get(name).set(
            image_root=image_root,
            sem_seg_root=sem_seg_root,
            classes_file=config_file,
            evaluator_type="sem_seg",
            **meta,
        )


def _raise(error: Exception):
    raise error
