"""Cityscapes: reuse detectron2's ``cityscapes_fine_{instance_seg,sem_seg,panoptic}_{train,val}``.

detectron2's registrations already carry what the evaluators need (``gt_dir``, ``panoptic_root``,
``panoptic_json``, ``label_divisor``, ``ignore_label``, the 19 train ids for things and stuff). We
add a layout check in front of each loader and the class hierarchy (the 7 categories of the
Cityscapes label definition: flat, construction, object, nature, sky, human, vehicle), which is
HSSN's 2-level Cityscapes taxonomy.
"""

import os

from detectron2.data import MetadataCatalog
from detectron2.data.datasets.builtin_meta import CITYSCAPES_CATEGORIES

from .layout import add_layout_check
from .panoptic_utils import make_class_hierarchy

CITYSCAPES_LAYOUT = """\
cityscapes/
  leftImg8bit/{train,val,test}/<city>/*_leftImg8bit.png
  gtFine/{train,val,test}/<city>/*_gtFine_{color,instanceIds,labelIds}.png, *_polygons.json
  gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png  # cityscapesscripts createTrainIdLabelImgs
  gtFine/cityscapes_panoptic_{train,val}/               # cityscapesscripts createPanopticImgs
  gtFine/cityscapes_panoptic_{train,val}.json           # cityscapesscripts createPanopticImgs
"""

# Category of each train id (the "category" column of the Cityscapes label definition).
CITYSCAPES_SUPER_CLASSES = ("flat", "construction", "object", "nature", "sky", "human", "vehicle")
_CATEGORY_OF = {
    "road": "flat",
    "sidewalk": "flat",
    "building": "construction",
    "wall": "construction",
    "fence": "construction",
    "pole": "object",
    "traffic light": "object",
    "traffic sign": "object",
    "vegetation": "nature",
    "terrain": "nature",
    "sky": "sky",
    "person": "human",
    "rider": "human",
    "car": "vehicle",
    "truck": "vehicle",
    "bus": "vehicle",
    "train": "vehicle",
    "motorcycle": "vehicle",
    "bicycle": "vehicle",
}


def cityscapes_class_hierarchy() -> dict:
    """19 train-id classes -> 7 categories (see :func:`make_class_hierarchy`)."""
    names = [c["name"] for c in sorted(CITYSCAPES_CATEGORIES, key=lambda c: c["trainId"])]
    parents = [CITYSCAPES_SUPER_CLASSES.index(_CATEGORY_OF[n]) for n in names]
    return make_class_hierarchy([names, list(CITYSCAPES_SUPER_CLASSES)], [parents])


def register_all_cityscapes(root: str) -> None:
    """Add layout checks and ``class_hierarchy`` to detectron2's Cityscapes datasets.

    Args:
        root (str): ``$DETECTRON2_DATASETS``.
    """
    hierarchy = cityscapes_class_hierarchy()
    for split in ("train", "val"):
        image_dir = os.path.join(root, "cityscapes", "leftImg8bit", split)
        gt_dir = os.path.join(root, "cityscapes", "gtFine", split)
        pan_dir = os.path.join(root, "cityscapes", "gtFine", f"cityscapes_panoptic_{split}")
        pan_json = pan_dir + ".json"
        required = {
            "instance_seg": [image_dir, gt_dir],
            "sem_seg": [image_dir, gt_dir],
            "panoptic": [image_dir, gt_dir, pan_dir, pan_json],
        }
        for task, paths in required.items():
            name = f"cityscapes_fine_{task}_{split}"
            add_layout_check(name, paths, CITYSCAPES_LAYOUT)
            if task != "instance_seg" and name in MetadataCatalog.list():
                meta = MetadataCatalog.get(name)
                if not hasattr(meta, "class_hierarchy"):
                    meta.set(class_hierarchy=hierarchy)
