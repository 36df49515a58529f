"""COCO panoptic with semantic maps: ``coco_2017_{train,val}_panoptic_with_sem_seg`` (Mask2Former).

detectron2 already registers ``coco_2017_{train,val}`` (instances) and
``coco_2017_{train,val}_panoptic``; we reuse them and only put a layout check in front of them.
The class list is detectron2's ``COCO_CATEGORIES`` (80 things + 53 stuff).
"""

import os

from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

from .class_tables import panoptic_metadata_from_categories
from .layout import add_layout_check
from .registration import PanopticFiles, register_panoptic_dataset

COCO_LAYOUT = """\
coco/
  annotations/
    instances_{train,val}2017.json
    panoptic_{train,val}2017.json
  {train,val}2017/                  # images
  panoptic_{train,val}2017/         # panoptic PNGs (from annotations/panoptic_{train,val}2017.zip)
  panoptic_semseg_{train,val}2017/  # datasets/prepare_coco_semantic_annos_from_panoptic_images.py
"""


def coco_panoptic_metadata() -> dict:
    """Mask2Former-style panoptic metadata of COCO (133 classes; contiguous = list order)."""
    return panoptic_metadata_from_categories(COCO_CATEGORIES)


def register_all_coco(root: str) -> None:
    """Register ``coco_2017_{train,val}_panoptic_with_sem_seg`` and add layout checks.

    Args:
        root (str): ``$DETECTRON2_DATASETS``.
    """
    meta = coco_panoptic_metadata()
    for split in ("train", "val"):
        files = PanopticFiles(
            image_root=os.path.join(root, "coco", f"{split}2017"),
            panoptic_root=os.path.join(root, "coco", f"panoptic_{split}2017"),
            panoptic_json=os.path.join(root, "coco", "annotations", f"panoptic_{split}2017.json"),
            sem_seg_root=os.path.join(root, "coco", f"panoptic_semseg_{split}2017"),
            json_file=os.path.join(root, "coco", "annotations", f"instances_{split}2017.json"),
        )
        register_panoptic_dataset(
            f"coco_2017_{split}_panoptic_with_sem_seg",
            meta,
            files,
            evaluator_type="coco_panoptic_seg",
            layout=COCO_LAYOUT,
            ignore_label=255,
            label_divisor=1000,
        )
        # detectron2's own registrations: keep their loaders, add the layout check.
        add_layout_check(f"coco_2017_{split}", [files.image_root, files.json_file], COCO_LAYOUT)
        add_layout_check(
            f"coco_2017_{split}_panoptic",
            [files.image_root, files.panoptic_root, files.panoptic_json],
            COCO_LAYOUT,
        )
