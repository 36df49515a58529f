"""Superpixel-segmentation datasets: BSDS500 and the embedded synthetic dataset's region maps.

Records carry ``file_name, image_id, height, width`` and ``regions_file_name``: a label map whose
ids are the ground-truth segments (any integers; negative = void). :func:`read_regions` reads it
as a list of maps (BSDS500 has several human segmentations per image; ASA is averaged over them).

* ``bsds500_superpixel_{train,val,trainval,test}``: BSDS500 (Arbelaez et al., TPAMI 2011) in its
  original release layout, ground truths read from the ``.mat`` files with ``scipy.io``. ClustSeg
  (Sec. 4.4) trains on train + val and evaluates on test.
* ``<prefix>_superpixel_{train,val}`` for a synthetic dataset
  (:func:`register_synthetic_superpixel`; ``synthetic_superpixel_*`` is registered at import):
  the images of the panoptic split with the finest region map (each connected stuff cell and
  each visible instance) as ground truth.

Both use ``evaluator_type="superpixel"`` (:class:`seg_methods.evaluation.SuperpixelEvaluator`).
"""

import os
from typing import Dict, List, Optional

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from .layout import register_checked

__all__ = [
    "BSDS500_LAYOUT",
    "read_regions",
    "load_bsds500",
    "register_all_bsds500",
    "register_synthetic_superpixel",
]

BSDS500_LAYOUT = """\
BSR/BSDS500/data/                    # BSR_bsds500.tgz of the Berkeley release, extracted
  images/{train,val,test}/*.jpg
  groundTruth/{train,val,test}/*.mat  # cell array groundTruth{i}.Segmentation (uint16 labels)
"""
BSDS500_SPLITS = {
    "train": ("train",),
    "val": ("val",),
    "trainval": ("train", "val"),
    "test": ("test",),
}


def read_regions(path: str) -> List[np.ndarray]:
    """Ground-truth segmentations of one image.

    Args:
        path (str): a label image (PNG, any integer mode; the synthetic regions maps are uint16)
            or a BSDS500 ``.mat`` file (``groundTruth`` cell array, one ``Segmentation`` per
            annotator).

    Returns:
        list[np.ndarray]: one or more (H, W) int64 label maps.
    """
    if path.endswith(".mat"):
        import scipy.io

        mat = scipy.io.loadmat(path)
        if "groundTruth" not in mat:
            raise KeyError(f"'{path}' has no 'groundTruth' variable (not a BSDS500 .mat file)")
        cells = mat["groundTruth"].ravel()
        maps = [np.asarray(c["Segmentation"][0, 0], dtype=np.int64) for c in cells]
        if not maps:
            raise ValueError(f"'{path}' holds no segmentation")
        return maps
    with Image.open(path) as im:
        return [np.asarray(im, dtype=np.int64)]


def load_bsds500(root: str, splits) -> List[Dict]:
    """BSDS500 records of ``splits`` (subfolders of ``images`` / ``groundTruth``)."""
    records = []
    for split in splits:
        img_dir = os.path.join(root, "images", split)
        gt_dir = os.path.join(root, "groundTruth", split)
        for name in sorted(os.listdir(img_dir)):
            if not name.endswith(".jpg"):
                continue
            stem = name[:-4]
            gt = os.path.join(gt_dir, stem + ".mat")
            if not os.path.exists(gt):
                raise FileNotFoundError(f"BSDS500: image '{name}' has no ground truth '{gt}'")
            with Image.open(os.path.join(img_dir, name)) as im:
                width, height = im.size
            records.append(
                {
                    "file_name": os.path.join(img_dir, name),
                    "image_id": stem,
                    "height": height,
                    "width": width,
                    "regions_file_name": gt,
                }
            )
    return records


def register_all_bsds500(root: str) -> None:
    """Register ``bsds500_superpixel_{train,val,trainval,test}`` under ``root``.

    Loading a split whose folders are missing raises ``DatasetLayoutError`` with
    :data:`BSDS500_LAYOUT`.
    """
    base = os.path.join(root, "BSR", "BSDS500", "data")
    for name, splits in BSDS500_SPLITS.items():
        dataset = f"bsds500_superpixel_{name}"
        if dataset in DatasetCatalog:
            continue
        required = [os.path.join(base, d, s) for s in splits for d in ("images", "groundTruth")]
        register_checked(
            dataset, lambda b=base, s=splits: load_bsds500(b, s), required, BSDS500_LAYOUT
        )
        MetadataCatalog.get(dataset).set(evaluator_type="superpixel", image_root=base)


def register_synthetic_superpixel(
    names: Dict[str, str], prefix: Optional[str] = None
) -> Dict[str, str]:
    """Register ``<prefix>_superpixel_{train,val}`` over a registered synthetic dataset.

    Args:
        names (dict): the dict returned by ``register_synthetic`` (needs "panoptic_train",
            "panoptic_val").
        prefix (str or None): dataset-name prefix; default: the panoptic name without
            "_panoptic_train".

    Returns:
        dict: ``names`` plus "superpixel_train" and "superpixel_val".
    """
    prefix = prefix or names["panoptic_train"][: -len("_panoptic_train")]
    out = dict(names)
    keys = ("file_name", "image_id", "height", "width", "regions_file_name")
    for split in ("train", "val"):
        pan = names[f"panoptic_{split}"]
        name = f"{prefix}_superpixel_{split}"
        if name in DatasetCatalog:
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)
        DatasetCatalog.register(
            name, lambda p=pan: [{k: d[k] for k in keys} for d in DatasetCatalog.get(p)]
        )
        pmeta = MetadataCatalog.get(pan)
        MetadataCatalog.get(name).set(
            evaluator_type="superpixel",
            image_root=pmeta.image_root,
            regions_root=pmeta.regions_root,
        )
        out[f"superpixel_{split}"] = name
    return out
