"""PASCAL-Person-Part (Chen et al., CVPR 2014): human-part semantic segmentation, 7 classes.

Registered as ``pascal_person_part_sem_seg_{train,val}`` for users who have the data under
``$DETECTRON2_DATASETS`` in the layout below (the layout of the commonly distributed
preprocessed release: part labels as single-channel PNGs, split lists of image ids). ``val`` is
the 1,817-image split the HSSN paper calls "test" (Tables 5, 6); ``train`` has 1,716 images.
Loading checks the layout first and names what is missing (``layout.check_layout``).

Classes (label value = class id; 255 = void): background, head, torso, upper arms, lower arms,
upper legs, lower legs. HSSN's 3-level tree (the ports' PASCAL-Person-Part hierarchy, 7 + 3 + 2
nodes): the four upper-body parts -> "upper body", the two leg parts -> "lower body", both ->
"person"; background is its own node at every level (background -> background -> background).
"""

import os
from typing import Dict, List

from detectron2.data import MetadataCatalog

from .layout import register_checked
from .panoptic_utils import make_class_hierarchy

__all__ = [
    "PASCAL_PERSON_PART_CLASSES",
    "pascal_person_part_class_hierarchy",
    "load_pascal_person_part",
    "register_all_pascal_person_part",
]

PASCAL_PERSON_PART_CLASSES = (
    "background",
    "head",
    "torso",
    "upper arms",
    "lower arms",
    "upper legs",
    "lower legs",
)
PASCAL_PERSON_PART_COLORS = [
    [0, 0, 0],
    [128, 0, 0],
    [0, 128, 0],
    [128, 128, 0],
    [0, 0, 128],
    [128, 0, 128],
    [0, 128, 128],
]
PASCAL_PERSON_PART_IGNORE_LABEL = 255

PASCAL_PERSON_PART_LAYOUT = """\
pascal_person_part/
  JPEGImages/<id>.jpg
  SegmentationPart/<id>.png   # single channel: 0 background, 1 head, 2 torso, 3 upper arms,
                              # 4 lower arms, 5 upper legs, 6 lower legs, 255 void
  list/train_id.txt           # image ids, one per line (1,716)
  list/val_id.txt             # (1,817; the paper's "test")
"""


def pascal_person_part_class_hierarchy() -> Dict:
    """7 classes -> background / upper body / lower body -> background / person."""
    level1 = ["background", "upper body", "lower body"]
    level2 = ["background", "person"]
    leaf_parent = [0, 1, 1, 1, 1, 2, 2]
    return make_class_hierarchy(
        [list(PASCAL_PERSON_PART_CLASSES), level1, level2], [leaf_parent, [0, 1, 1]]
    )


def load_pascal_person_part(root: str, split: str) -> List[Dict]:
    """Dataset dicts ``{"file_name", "sem_seg_file_name"}`` of ``list/<split>_id.txt``.

    Args:
        root (str): the ``pascal_person_part`` folder.
        split (str): "train" or "val".

    Returns:
        list[dict]: one dict per listed image id, in list order.
    """
    with open(os.path.join(root, "list", f"{split}_id.txt")) as f:
        ids = [line.strip() for line in f if line.strip()]
    return [
        {
            "file_name": os.path.join(root, "JPEGImages", f"{i}.jpg"),
            "sem_seg_file_name": os.path.join(root, "SegmentationPart", f"{i}.png"),
        }
        for i in ids
    ]


def register_all_pascal_person_part(root: str) -> None:
    """Register ``pascal_person_part_sem_seg_{train,val}``.

    Args:
        root (str): ``$DETECTRON2_DATASETS``.
    """
    base = os.path.join(root, "pascal_person_part")
    hierarchy = pascal_person_part_class_hierarchy()
    for split in ("train", "val"):
        name = f"pascal_person_part_sem_seg_{split}"
        required = [
            os.path.join(base, "JPEGImages"),
            os.path.join(base, "SegmentationPart"),
            os.path.join(base, "list", f"{split}_id.txt"),
        ]
        register_checked(
            name,
            lambda s=split: load_pascal_person_part(base, s),
            required,
            PASCAL_PERSON_PART_LAYOUT,
        )
        MetadataCatalog.get(name).set(
            image_root=required[0],
            sem_seg_root=required[1],
            stuff_classes=list(PASCAL_PERSON_PART_CLASSES),
            stuff_colors=[list(c) for c in PASCAL_PERSON_PART_COLORS],
            class_hierarchy=hierarchy,
            evaluator_type="sem_seg",
            ignore_label=PASCAL_PERSON_PART_IGNORE_LABEL,
        )
