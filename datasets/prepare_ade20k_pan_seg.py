#!/usr/bin/env python3
"""ADE20K-150 panoptic annotations (COCO format) from the semantic and instance releases.

Inputs under ``$DETECTRON2_DATASETS/ADEChallengeData2016``: ``images/{training,validation}``,
``annotations/{training,validation}`` (semantic, 0 = other, 1..150) and
``annotations_instance/{training,validation}`` (R = instance class 1..100, G = instance index).
Outputs: ``ade20k_panoptic_{train,val}/*.png`` (RGB-encoded ids) and
``ade20k_panoptic_{train,val}.json``; category ids are the contiguous ids 0..149
(``seg_methods/data/datasets/meta/ade20k_150.csv``), segment id = (category + 1) * 1000 + k.

Stuff segments come from the semantic map (one per stuff class); thing segments from the
instance map, pasted over the stuff; thing-class pixels without an instance stay void (0).
The instance classes 1..100 are the 100 thing classes in increasing semantic id.

Usage: ``python datasets/prepare_ade20k_pan_seg.py [--root ...] [--workers 2]``
"""

import argparse
import glob
import json
import multiprocessing as mp
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

from seg_methods.data.datasets.class_tables import read_class_table
from seg_methods.data.datasets.panoptic_utils import ids_to_rgb, segments_from_panoptic

LABEL_DIVISOR = 1000


def ade20k_panoptic_from_labels(
    semantic: np.ndarray, instance: np.ndarray, isthing: Sequence[bool]
) -> Tuple[np.ndarray, List[Dict]]:
    """Panoptic ids and segments of one image.

    Args:
        semantic (np.ndarray): original semantic labels (H, W), 0 = other, c + 1 = class c.
        instance (np.ndarray): instance PNG (H, W, 3): R = instance class (1..#things, 0 = none),
            G = instance index (0 = none).
        isthing (Sequence[bool]): thing flag of each of the contiguous classes.

    Returns:
        tuple: segment ids (H, W) int32 and COCO ``segments_info`` (contiguous category ids).
    """
    thing_classes = [c for c, t in enumerate(isthing) if t]
    cat = semantic.astype(np.int32) - 1
    pan = np.zeros(semantic.shape, dtype=np.int32)
    id_to_cat = {}
    for c in np.unique(cat).tolist():
        if c < 0 or isthing[c]:
            continue
        seg_id = (c + 1) * LABEL_DIVISOR
        pan[cat == c] = seg_id
        id_to_cat[seg_id] = c
    ins_cls = instance[..., 0].astype(np.int32)
    ins_idx = instance[..., 1].astype(np.int32)
    valid = (ins_cls > 0) & (ins_idx > 0)
    pairs = np.unique(np.stack([ins_cls[valid], ins_idx[valid]], axis=1), axis=0)
    per_class_count: Dict[int, int] = {}
    for k_cls, k_idx in pairs.tolist():
        c = thing_classes[k_cls - 1]
        per_class_count[c] = per_class_count.get(c, 0) + 1
        seg_id = (c + 1) * LABEL_DIVISOR + per_class_count[c]
        pan[(ins_cls == k_cls) & (ins_idx == k_idx)] = seg_id
        id_to_cat[seg_id] = c
    segments = segments_from_panoptic(pan, id_to_cat, dict(enumerate(isthing)))
    return pan, [{k: v for k, v in s.items() if k != "isthing"} for s in segments]


def _convert(job: Tuple[str, str, str, str, Sequence[bool]]) -> Tuple[Dict, Dict]:
    image_path, sem_path, ins_path, out_dir, isthing = job
    stem = os.path.splitext(os.path.basename(image_path))[0]
    semantic = np.asarray(Image.open(sem_path))
    instance = np.asarray(Image.open(ins_path).convert("RGB"))
    pan, segments = ade20k_panoptic_from_labels(semantic, instance, isthing)
    Image.fromarray(ids_to_rgb(pan)).save(os.path.join(out_dir, stem + ".png"))
    h, w = semantic.shape
    image = {"id": stem, "file_name": stem + ".jpg", "height": h, "width": w}
    return image, {"image_id": stem, "file_name": stem + ".png", "segments_info": segments}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.getenv("DETECTRON2_DATASETS", "datasets"))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    base = os.path.join(args.root, "ADEChallengeData2016")
    categories = read_class_table("ade20k_150.csv")
    isthing = [bool(c["isthing"]) for c in categories]
    for split, dirname in (("train", "training"), ("val", "validation")):
        out_dir = os.path.join(base, f"ade20k_panoptic_{split}")
        os.makedirs(out_dir, exist_ok=True)
        jobs = []
        for image_path in sorted(glob.glob(os.path.join(base, "images", dirname, "*.jpg"))):
            stem = os.path.splitext(os.path.basename(image_path))[0]
            jobs.append(
                (
                    image_path,
                    os.path.join(base, "annotations", dirname, stem + ".png"),
                    os.path.join(base, "annotations_instance", dirname, stem + ".png"),
                    out_dir,
                    isthing,
                )
            )
        if args.workers > 1:
            with mp.Pool(args.workers) as pool:
                results = list(pool.imap(_convert, jobs, chunksize=16))
        else:
            results = [_convert(j) for j in jobs]
        out = {
            "images": [r[0] for r in results],
            "annotations": [r[1] for r in results],
            "categories": [
                {"id": c["id"], "name": c["name"], "isthing": c["isthing"], "color": c["color"]}
                for c in categories
            ],
        }
        with open(os.path.join(base, f"ade20k_panoptic_{split}.json"), "w") as f:
            json.dump(out, f)
        print(f"{split}: wrote {len(results)} panoptic annotations to {out_dir}")


if __name__ == "__main__":
    main()
