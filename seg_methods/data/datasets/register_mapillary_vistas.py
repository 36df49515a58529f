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
