#!/usr/bin/env python3
"""ADE20K-150 semantic labels for detectron2: ``annotations/`` -> ``annotations_detectron2/``.

The original PNGs use 0 for "other objects" and 1..150 for the classes. detectron2 (and
``ade20k_sem_seg_*``) expect contiguous ids 0..149 and 255 for ignore, so every label is shifted
down by one and 0 becomes 255.

Usage: ``python datasets/prepare_ade20k_sem_seg.py [--root $DETECTRON2_DATASETS]``
"""

import argparse
import glob
import os

import numpy as np
from PIL import Image

IGNORE_LABEL = 255


def convert_ade20k_label(label: np.ndarray) -> np.ndarray:
    """Shift an original ADE20K label map (H, W) uint8 in 0..150 to 0..149 with 0 -> 255."""
    label = np.asarray(label)
    if label.size and label.max() > 150:
        raise ValueError(f"ADE20K-150 labels are in 0..150, got {label.max()}")
    return np.where(label == 0, IGNORE_LABEL, label.astype(np.int32) - 1).astype(np.uint8)


def convert_folder(src_dir: str, dst_dir: str) -> int:
    """Convert every PNG of ``src_dir`` into ``dst_dir`` (same names); returns the count."""
    os.makedirs(dst_dir, exist_ok=True)
    files = sorted(glob.glob(os.path.join(src_dir, "*.png")))
    for path in files:
        label = np.asarray(Image.open(path))
        Image.fromarray(convert_ade20k_label(label)).save(
            os.path.join(dst_dir, os.path.basename(path))
        )
    return len(files)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.getenv("DETECTRON2_DATASETS", "datasets"))
    args = parser.parse_args(argv)
    base = os.path.join(args.root, "ADEChallengeData2016")
    for dirname in ("training", "validation"):
        n = convert_folder(
            os.path.join(base, "annotations", dirname),
            os.path.join(base, "annotations_detectron2", dirname),
        )
        print(f"{dirname}: converted {n} label maps")


if __name__ == "__main__":
    main()
