#!/usr/bin/env python3
"""COCO semantic maps for Mask2Former-style panoptic training/evaluation.

Reads ``coco/annotations/panoptic_{train,val}2017.json`` and ``coco/panoptic_{train,val}2017/``
and writes ``coco/panoptic_semseg_{train,val}2017/*.png``: uint8 contiguous ids over all 133
classes (80 things then 53 stuff, detectron2's ``COCO_CATEGORIES`` order), 255 for void.

Usage: ``python datasets/prepare_coco_semantic_annos_from_panoptic_images.py [--root ...]``
"""

import argparse
import json
import multiprocessing as mp
import os
from typing import Dict, Mapping, Sequence, Tuple

from PIL import Image

from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from seg_methods.data.datasets.panoptic_utils import read_panoptic_png, semantic_from_panoptic


def coco_category_to_contiguous() -> Dict[int, int]:
    """COCO panoptic category id -> contiguous id over all 133 classes."""
    return {c["id"]: i for i, c in enumerate(COCO_CATEGORIES)}


def convert_one(
    pan_path: str, segments_info: Sequence[Mapping], out_path: str, id_map: Mapping[int, int]
) -> None:
    """Write the semantic PNG of one panoptic PNG."""
    sem = semantic_from_panoptic(read_panoptic_png(pan_path), segments_info, id_map)
    Image.fromarray(sem).save(out_path)


def _job(args: Tuple[str, list, str, dict]) -> None:
    convert_one(*args)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.getenv("DETECTRON2_DATASETS", "datasets"))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    base = os.path.join(args.root, "coco")
    id_map = coco_category_to_contiguous()
    for split in ("train2017", "val2017"):
        with open(os.path.join(base, "annotations", f"panoptic_{split}.json")) as f:
            panoptic = json.load(f)
        pan_dir = os.path.join(base, f"panoptic_{split}")
        out_dir = os.path.join(base, f"panoptic_semseg_{split}")
        os.makedirs(out_dir, exist_ok=True)
        jobs = [
            (
                os.path.join(pan_dir, ann["file_name"]),
                ann["segments_info"],
                os.path.join(out_dir, ann["file_name"]),
                id_map,
            )
            for ann in panoptic["annotations"]
        ]
        if args.workers > 1:
            with mp.Pool(args.workers) as pool:
                for _ in pool.imap_unordered(_job, jobs, chunksize=32):
                    pass
        else:
            for job in jobs:
                _job(job)
        print(f"{split}: wrote {len(jobs)} semantic maps to {out_dir}")


if __name__ == "__main__":
    main()
