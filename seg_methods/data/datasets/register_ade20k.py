"""ADE20K (SceneParsing, 150 classes): semantic and panoptic.

``ade20k_sem_seg_{train,val}`` is registered by detectron2 (images + ``annotations_detectron2``);
we add the layout check and the class colours. ``ade20k_panoptic_{train,val}`` follows
Mask2Former's layout (made by ``datasets/prepare_ade20k_pan_seg.py``): 100 thing and 50 stuff
classes, contiguous ids = semantic label - 1 for both. Class table: ``meta/ade20k_150.csv``.
"""

import os

from detectron2.data import MetadataCatalog

from .class_tables import panoptic_metadata_from_categories, read_class_table
from .layout import add_layout_check
from .registration import PanopticFiles, register_panoptic_dataset

ADE20K_LAYOUT = """\
ADEChallengeData2016/
  images/{training,validation}/*.jpg
  annotations/{training,validation}/*.png         # 0 = other, 1..150 (original release)
  annotations_detectron2/{training,validation}/   # datasets/prepare_ade20k_sem_seg.py (0..149, 255)
  annotations_instance/{training,validation}/     # ADE20K instance release (for panoptic)
  ade20k_panoptic_{train,val}/                    # datasets/prepare_ade20k_pan_seg.py
  ade20k_panoptic_{train,val}.json                # datasets/prepare_ade20k_pan_seg.py
  ade20k_instance_{train,val}.json                # datasets/prepare_ade20k_ins_seg.py (for AP)
"""


def ade20k_categories() -> list:
    """The 150 classes as COCO-style categories (dataset id = contiguous id, as in the json)."""
    return read_class_table("ade20k_150.csv")


def ade20k_panoptic_metadata() -> dict:
    """Mask2Former-style panoptic metadata of ADE20K-150."""
    return panoptic_metadata_from_categories(ade20k_categories())


def register_all_ade20k(root: str) -> None:
    """Register ``ade20k_panoptic_{train,val}``; add checks/colours to ``ade20k_sem_seg_*``.

    Args:
        root (str): ``$DETECTRON2_DATASETS``.
    """
    base = os.path.join(root, "ADEChallengeData2016")
    meta = ade20k_panoptic_metadata()
    for split, dirname in (("train", "training"), ("val", "validation")):
        files = PanopticFiles(
            image_root=os.path.join(base, "images", dirname),
            panoptic_root=os.path.join(base, f"ade20k_panoptic_{split}"),
            panoptic_json=os.path.join(base, f"ade20k_panoptic_{split}.json"),
            sem_seg_root=os.path.join(base, "annotations_detectron2", dirname),
            json_file=os.path.join(base, f"ade20k_instance_{split}.json"),
        )

        sem_name = f"ade20k_sem_seg_{split}"
        add_layout_check(sem_name, [files.image_root, files.sem_seg_root], ADE20K_LAYOUT)
        if sem_name in MetadataCatalog.list() and not hasattr(
            MetadataCatalog.get(sem_name), "stuff_colors"
        ):
            MetadataCatalog.get(sem_name).set(stuff_colors=meta["stuff_colors"])

        register_panoptic_dataset(
            f"ade20k_panoptic_{split}",
            meta,
            files,
            evaluator_type="ade20k_panoptic_seg",
            layout=ADE20K_LAYOUT,
            ignore_label=255,
            label_divisor=1000,
        )
