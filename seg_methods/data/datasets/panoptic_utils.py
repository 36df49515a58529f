"""Helpers shared by the dataset loaders, the synthetic generator and ``datasets/prepare_*.py``.

Everything here is a pure function of numpy arrays / json dicts, so the preparation scripts can be
tested on tiny fabricated inputs.

Conventions (COCO panoptic format, as used by detectron2 and Mask2Former):

* A panoptic PNG stores one segment id per pixel, RGB-encoded as ``id = R + 256 * G + 256**2 * B``;
  id 0 is void (unlabelled).
* The panoptic json lists, per image, ``segments_info`` entries ``{id, category_id, iscrowd, area,
  bbox}`` with the *dataset* category id and an ``[x, y, w, h]`` box.
* Semantic PNGs hold *contiguous* class ids (``uint8``), 255 = ignore.
* COCO instance json: one annotation per thing segment with a compressed RLE mask.

Shape shorthand: ``H, W`` image height and width.
"""

import json
import os
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

__all__ = [
    "ids_to_rgb",
    "rgb_to_ids",
    "mask_bbox_xywh",
    "segments_from_panoptic",
    "semantic_from_panoptic",
    "mask_to_rle",
    "instance_annotations_from_panoptic",
    "coco_instances_from_panoptic",
    "write_coco_instances_from_panoptic",
    "read_panoptic_png",
    "load_panoptic_json",
    "make_class_hierarchy",
]


def ids_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Encode segment ids as an RGB image (COCO panoptic PNG encoding).

    Args:
        ids (np.ndarray): integer ids of shape (H, W), each in [0, 256**3).

    Returns:
        np.ndarray: uint8 array of shape (H, W, 3) with ``id = R + 256 G + 256^2 B``.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 256**3):
        raise ValueError("panoptic segment ids must be in [0, 256**3)")
    rgb = np.empty(ids.shape + (3,), dtype=np.uint8)
    rgb[..., 0] = ids % 256
    rgb[..., 1] = (ids // 256) % 256
    rgb[..., 2] = ids // (256 * 256)
    return rgb


def rgb_to_ids(rgb: np.ndarray) -> np.ndarray:
    """Decode an RGB-encoded panoptic PNG (inverse of :func:`ids_to_rgb`).

    Args:
        rgb (np.ndarray): uint8 array of shape (H, W, 3).

    Returns:
        np.ndarray: int32 ids of shape (H, W).
    """
    rgb = np.asarray(rgb).astype(np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def mask_bbox_xywh(mask: np.ndarray) -> List[int]:
    """Tight ``[x, y, w, h]`` box (integers, COCO convention) of a non-empty boolean mask (H, W)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return [0, 0, 0, 0]
    y0, y1 = int(rows[0]), int(rows[-1])
    x0, x1 = int(cols[0]), int(cols[-1])
    return [x0, y0, x1 - x0 + 1, y1 - y0 + 1]


def segments_from_panoptic(
    pan_ids: np.ndarray, id_to_category: Mapping[int, int], isthing: Mapping[int, bool]
) -> List[Dict]:
    """Build COCO ``segments_info`` for every non-void segment id present in a panoptic map.

    Args:
        pan_ids (np.ndarray): segment ids of shape (H, W); 0 is void.
        id_to_category (Mapping[int, int]): segment id -> dataset category id.
        isthing (Mapping[int, bool]): dataset category id -> whether it is a thing class.

    Returns:
        list[dict]: ``{id, category_id, iscrowd, area, bbox, isthing}``, sorted by id.
    """
    flat = pan_ids.ravel()
    if flat.size and 0 <= flat.min() and flat.max() < 4 * flat.size + 1024:
        counts = np.bincount(flat)  # small ids: counting is much faster than sorting
        ids = np.flatnonzero(counts)
        counts = counts[ids]
    else:
        ids, counts = np.unique(flat, return_counts=True)
    out = []
    for seg_id, area in zip(ids.tolist(), counts.tolist()):
        if seg_id == 0:
            continue
        cat = int(id_to_category[seg_id])
        out.append(
            {
                "id": int(seg_id),
                "category_id": cat,
                "iscrowd": 0,
                "area": int(area),
                "bbox": mask_bbox_xywh(pan_ids == seg_id),
                "isthing": bool(isthing[cat]),
            }
        )
    return out


def semantic_from_panoptic(
    pan_ids: np.ndarray,
    segments_info: Iterable[Mapping],
    category_to_contiguous: Mapping[int, int],
    ignore_label: int = 255,
) -> np.ndarray:
    """Semantic label map (contiguous ids) from a panoptic id map and its ``segments_info``.

    Void pixels and segments whose category is not in ``category_to_contiguous`` get
    ``ignore_label``. Crowd segments keep their class (as in Mask2Former's COCO semantic maps).

    Args:
        pan_ids (np.ndarray): segment ids of shape (H, W).
        segments_info (Iterable[Mapping]): entries with ``id`` and dataset ``category_id``.
        category_to_contiguous (Mapping[int, int]): dataset category id -> contiguous id.
        ignore_label (int): value for unlabelled pixels.

    Returns:
        np.ndarray: uint8 label map of shape (H, W).
    """
    sem = np.full(pan_ids.shape, ignore_label, dtype=np.uint8)
    for seg in segments_info:
        cat = seg["category_id"]
        if cat in category_to_contiguous:
            sem[pan_ids == seg["id"]] = category_to_contiguous[cat]
    return sem


def mask_to_rle(mask: np.ndarray) -> Dict:
    """Compressed COCO RLE of a boolean mask (H, W), with ``counts`` as str (json-serialisable)."""
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def instance_annotations_from_panoptic(
    pan_ids: np.ndarray,
    segments_info: Iterable[Mapping],
    image_id,
    thing_category_ids: Iterable[int],
    start_annotation_id: int = 1,
) -> List[Dict]:
    """COCO instance annotations (RLE, bbox, area, iscrowd) for the thing segments of one image.

    Args:
        pan_ids (np.ndarray): segment ids of shape (H, W).
        segments_info (Iterable[Mapping]): panoptic segments with dataset ``category_id``.
        image_id: the image id to write in every annotation.
        thing_category_ids (Iterable[int]): dataset ids of the thing classes.
        start_annotation_id (int): id of the first annotation; the following ones count up.

    Returns:
        list[dict]: COCO instance annotations (``area`` and ``bbox`` recomputed from the mask).
    """
    things = set(int(c) for c in thing_category_ids)
    anns = []
    ann_id = start_annotation_id
    for seg in segments_info:
        if int(seg["category_id"]) not in things:
            continue
        mask = pan_ids == seg["id"]
        area = int(np.count_nonzero(mask))
        if area == 0:
            continue
        anns.append(
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": int(seg["category_id"]),
                "segmentation": mask_to_rle(mask),
                "area": area,
                "bbox": mask_bbox_xywh(mask),
                "iscrowd": int(seg.get("iscrowd", 0)),
            }
        )
        ann_id += 1
    return anns


def read_panoptic_png(path: str) -> np.ndarray:
    """Segment ids (H, W) int32 of an RGB-encoded panoptic PNG."""
    from PIL import Image

    with Image.open(path) as img:
        return rgb_to_ids(np.asarray(img.convert("RGB")))


def coco_instances_from_panoptic(panoptic: Mapping, panoptic_root: str) -> Dict:
    """COCO instance json (things only, RLE masks) from a COCO panoptic json and its PNGs.

    Crowd segments are kept with ``iscrowd=1`` (COCO's convention for evaluation).

    Args:
        panoptic (Mapping): the panoptic json (``images``, ``annotations``, ``categories`` with
            ``isthing``).
        panoptic_root (str): folder of the panoptic PNGs.

    Returns:
        dict: ``{"images", "annotations", "categories"}`` (categories: the thing classes).
    """
    things = [c for c in panoptic["categories"] if c.get("isthing")]
    thing_ids = [c["id"] for c in things]
    annotations: List[Dict] = []
    for ann in panoptic["annotations"]:
        pan_ids = read_panoptic_png(os.path.join(panoptic_root, ann["file_name"]))
        annotations += instance_annotations_from_panoptic(
            pan_ids, ann["segments_info"], ann["image_id"], thing_ids, len(annotations) + 1
        )
    return {
        "images": list(panoptic["images"]),
        "annotations": annotations,
        "categories": [dict(c) for c in things],
    }


def write_coco_instances_from_panoptic(
    panoptic_json: str, panoptic_root: str, out_json: str
) -> int:
    """Write the COCO instance json of a panoptic dataset (see above); returns #annotations."""
    with open(panoptic_json) as f:
        panoptic = json.load(f)
    instances = coco_instances_from_panoptic(panoptic, panoptic_root)
    os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
    with open(out_json, "w") as f:
        json.dump(instances, f)
    return len(instances["annotations"])


def load_panoptic_json(
    json_file: str,
    image_root: str,
    panoptic_root: str,
    sem_seg_root: Optional[str],
    meta: Mapping,
    image_ext: str = ".jpg",
    extra_per_image: Optional[Mapping[str, str]] = None,
) -> List[Dict]:
    """Load a COCO-format panoptic json into detectron2 dataset dicts (Mask2Former's format).

    Each dict has ``file_name, image_id, pan_seg_file_name, segments_info`` and, when available,
    ``sem_seg_file_name, height, width``. ``segments_info`` category ids are mapped to contiguous
    ids with ``meta["thing_dataset_id_to_contiguous_id"]`` (things) and
    ``meta["stuff_dataset_id_to_contiguous_id"]`` (others), and get an ``isthing`` flag.

    Args:
        json_file (str): panoptic json (``images``, ``annotations``, ``categories``).
        image_root (str): folder of the images.
        panoptic_root (str): folder of the panoptic PNGs (names from ``annotations[].file_name``).
        sem_seg_root (str or None): folder of the semantic PNGs (same names as the panoptic PNGs).
        meta (Mapping): holds the two id maps above.
        image_ext (str): image extension used when the json has no ``images`` entry for an image.
        extra_per_image (Mapping[str, str] or None): extra ``key -> folder`` pairs; each dict gets
            ``key = folder/<panoptic png name>`` (e.g. region maps of the synthetic dataset).

    Returns:
        list[dict]: detectron2 dataset dicts.
    """
    with open(json_file) as f:
        info = json.load(f)
    images = {img["id"]: img for img in info.get("images", [])}
    thing_map = meta["thing_dataset_id_to_contiguous_id"]
    stuff_map = meta["stuff_dataset_id_to_contiguous_id"]

    dicts = []
    for ann in info["annotations"]:
        image_id = ann["image_id"]
        img = images.get(image_id)
        if img is not None:
            image_file = os.path.join(image_root, img["file_name"])
        else:
            image_file = os.path.join(image_root, os.path.splitext(ann["file_name"])[0] + image_ext)
        segments = []
        for seg in ann["segments_info"]:
            seg = dict(seg)
            cat = seg["category_id"]
            seg["isthing"] = cat in thing_map
            seg["category_id"] = thing_map[cat] if seg["isthing"] else stuff_map[cat]
            segments.append(seg)
        record = {
            "file_name": image_file,
            "image_id": image_id,
            "pan_seg_file_name": os.path.join(panoptic_root, ann["file_name"]),
            "segments_info": segments,
        }
        if img is not None and "height" in img and "width" in img:
            record["height"] = img["height"]
            record["width"] = img["width"]
        if sem_seg_root is not None:
            record["sem_seg_file_name"] = os.path.join(sem_seg_root, ann["file_name"])
        for key, folder in (extra_per_image or {}).items():
            record[key] = os.path.join(folder, ann["file_name"])
        dicts.append(record)
    if not dicts:
        raise RuntimeError(f"No annotations found in {json_file}")
    return dicts


def make_class_hierarchy(names: Sequence[Sequence[str]], parents: Sequence[Sequence[int]]) -> Dict:
    """Describe a class taxonomy as stored in ``MetadataCatalog`` under ``class_hierarchy``.

    Level 0 is the finest level (the contiguous training classes); level ``l + 1`` groups level
    ``l``. HSSN-style methods read this to build their tree.

    Args:
        names (Sequence[Sequence[str]]): ``names[l]`` the class names of level ``l``.
        parents (Sequence[Sequence[int]]): ``parents[l][i]`` the index (in level ``l + 1``) of the
            parent of class ``i`` of level ``l``; ``len(parents) == len(names) - 1``.

    Returns:
        dict: ``{"names": [[...], ...], "parents": [[...], ...]}`` (plain lists, json-friendly).
    """
    if len(parents) != len(names) - 1:
        raise ValueError("need one parent list per level except the coarsest")
    for level, par in enumerate(parents):
        if len(par) != len(names[level]):
            raise ValueError(f"level {level}: {len(par)} parents for {len(names[level])} classes")
        if any(not 0 <= p < len(names[level + 1]) for p in par):
            raise ValueError(f"level {level}: parent index out of range")
    return {"names": [list(n) for n in names], "parents": [list(p) for p in parents]}
