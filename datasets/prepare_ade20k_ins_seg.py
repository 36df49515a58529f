#!/usr/bin/env python3
"""COCO instance json of ADE20K (``ade20k_instance_{train,val}.json``) from its panoptic version.

Run ``prepare_ade20k_pan_seg.py`` first. The json keeps the panoptic category ids (0..149, the
100 thing classes only), which is what ``ade20k_panoptic_*``'s ``thing_dataset_id_to_contiguous_id``
expects; it is read by the COCO instance evaluator (AP) of the panoptic datasets.

Usage: ``python datasets/prepare_ade20k_ins_seg.py [--root ...]``
"""

import argparse
import os

from seg_methods.data.datasets.panoptic_utils import write_coco_instances_from_panoptic


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.getenv("DETECTRON2_DATASETS", "datasets"))
    args = parser.parse_args(argv)
    base = os.path.join(args.root, "ADEChallengeData2016")
    for split in ("train", "val"):
        out = os.path.join(base, f"ade20k_instance_{split}.json")
        n = write_coco_instances_from_panoptic(
            os.path.join(base, f"ade20k_panoptic_{split}.json"),
            os.path.join(base, f"ade20k_panoptic_{split}"),
            out,
        )
        print(f"{split}: {n} instances -> {out}")


if __name__ == "__main__":
    main()
