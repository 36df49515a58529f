#!/usr/bin/env python3
"""COCO instance json of Mapillary Vistas v1.2 (``mapillary_vistas_instance_{train,val}.json``).

Made from ``{training,validation}/panoptic/panoptic_2018.json`` and its PNGs; needed only for the
instance AP of ``mapillary_vistas_panoptic_*`` (semantic and panoptic need no preparation).

Usage: ``python datasets/prepare_mapillary_vistas_ins_seg.py [--root ...]``
"""

import argparse
import os

from seg_methods.data.datasets.panoptic_utils import write_coco_instances_from_panoptic


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.getenv("DETECTRON2_DATASETS", "datasets"))
    args = parser.parse_args(argv)
    base = os.path.join(args.root, "mapillary_vistas")
    for split, dirname in (("train", "training"), ("val", "validation")):
        pan_root = os.path.join(base, dirname, "panoptic")
        out = os.path.join(base, f"mapillary_vistas_instance_{split}.json")
        n = write_coco_instances_from_panoptic(
            os.path.join(pan_root, "panoptic_2018.json"), pan_root, out
        )
        print(f"{split}: {n} instances -> {out}")


if __name__ == "__main__":
    main()
