"""BIG (CascadePSP, Cheng et al. CVPR 2020): high-resolution binary segmentation refinement.

BIG holds 50 validation and 100 test objects at 2048x1600 to 5000x3600 pixels. Each object is a
triplet of files in one folder (CascadePSP ``docs/testing_segmentation.md``; CRM's
``dataset/offline_dataset_crm*.py`` reads the same layout)::

    <name>_im.jpg    the image
    <name>_gt.png    its ground-truth object mask (0 / 255)
    <name>_seg.png   the coarse mask of some segmenter (0 / 255), the refinement input

The release ships the coarse masks of one segmenter with the images; CascadePSP also publishes
the test set's coarse masks of DeepLabV3+, RefineNet, PSPNet and FCN-8s as folders of the same
layout. ``big_test`` / ``big_val`` read ``$DETECTRON2_DATASETS/BIG/{test,val}``;
:func:`register_big` registers any other folder, or the images of one folder with the coarse
masks of another (``coarse_root``).

Records: ``file_name, image_id (<name>), height, width, mask_file_name,
coarse_mask_file_name``; metadata ``evaluator_type="refinement"`` (IoU and mBA,
``seg_methods.evaluation.boundary``).
"""

import os
from typing import Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from .layout import DatasetLayoutError, register_checked
from .synthetic_highres import highres_metadata

__all__ = ["BIG_LAYOUT", "load_big", "register_all_big", "register_big"]

BIG_LAYOUT = """\
BIG/                                   # CascadePSP's BIG release
  test/<name>_im.jpg <name>_gt.png <name>_seg.png   # 100 objects (_seg: coarse input mask)
  val/<name>_im.jpg  <name>_gt.png <name>_seg.png   # 50 objects
"""
IMAGE_SUFFIXES = ("_im.jpg", "_im.png")


def load_big(image_root: str, coarse_root: Optional[str] = None) -> List[Dict]:
    """Records of a BIG-style folder.

    Args:
        image_root (str): folder holding ``<name>_im.jpg`` (or ``.png``) and ``<name>_gt.png``.
        coarse_root (str or None): folder holding ``<name>_seg.png`` (default ``image_root``).

    Returns:
        list[dict]: one record per image, sorted by name.

    Raises:
        DatasetLayoutError: no image in the folder, or an image without its ground truth or
            coarse mask (naming the missing file).
    """
    coarse_root = coarse_root or image_root
    names = sorted(f for f in os.listdir(image_root) if f.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise DatasetLayoutError(
            f"BIG: '{image_root}' holds no '<name>_im.jpg' image.\nExpected layout:\n{BIG_LAYOUT}"
        )
    records = []
    for f in names:
        stem = f[: -len("_im.jpg")]
        gt = os.path.join(image_root, stem + "_gt.png")
        seg = os.path.join(coarse_root, stem + "_seg.png")
        missing = [p for p in (gt, seg) if not os.path.exists(p)]
        if missing:
            raise DatasetLayoutError(
                f"BIG: image '{os.path.join(image_root, f)}' has no {' and no '.join(missing)} "
                f"(ground truth <name>_gt.png, coarse mask <name>_seg.png).\n"
                f"Expected layout:\n{BIG_LAYOUT}"
            )
        path = os.path.join(image_root, f)
        with Image.open(path) as im:  # reads the header only
            width, height = im.size
        records.append(
            {
                "file_name": path,
                "image_id": stem,
                "height": height,
                "width": width,
                "mask_file_name": gt,
                "coarse_mask_file_name": seg,
            }
        )
    return records


def register_big(name: str, image_root: str, coarse_root: Optional[str] = None) -> None:
    """Register a BIG-style folder as ``name`` (checked when loaded, not now).

    Args:
        name (str): dataset name.
        image_root (str): folder of ``<name>_im.jpg`` and ``<name>_gt.png``.
        coarse_root (str or None): folder of the ``<name>_seg.png`` coarse masks (default:
            ``image_root``), e.g. the DeepLabV3+ coarse masks of the BIG test set.
    """
    if name in DatasetCatalog:
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    required = [image_root] + ([coarse_root] if coarse_root else [])
    register_checked(name, lambda i=image_root, c=coarse_root: load_big(i, c), required, BIG_LAYOUT)
    MetadataCatalog.get(name).set(
        image_root=image_root, coarse_root=coarse_root or image_root, **highres_metadata()
    )


def register_all_big(root: str) -> None:
    """Register ``big_test`` and ``big_val`` under ``root`` (``$DETECTRON2_DATASETS``)."""
    for split in ("test", "val"):
        register_big(f"big_{split}", os.path.join(root, "BIG", split))
