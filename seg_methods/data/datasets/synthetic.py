"""The embedded procedural dataset ("synthetic"): deterministic, seeded, generated on first use.

Scenes (default 256x256 RGB, 600 train / 150 val images):

* **stuff** (4 classes, class given by TEXTURE only): the background is tiled by irregular
  Voronoi regions (warped seeds); each region draws a pattern with two uniformly random colours
  (L1 contrast >= 150), a random orientation, period and phase. ``stripes`` (parallel bands),
  ``checker`` (checkerboard), ``dots`` (dot lattice), ``blobs`` (thresholded smooth noise).
  Colour carries no class information.
* **things** (4 classes, class given by SHAPE only): ``ellipse``, ``rectangle``, ``triangle``,
  ``star``, filled with a random two-colour linear gradient, random rotation and aspect. 2-8
  instances per image, each covering 3%-30% of the image (visible area, after occlusion; an
  occluded instance keeps >= 40% of its area). With probability 0.5 a new instance copies the
  class of an existing one and is placed against it, so same-class instances touch and occlude
  each other. Later instances are painted on top.
* Uniform pixel noise (std 3) and JPEG compression (quality 95, 4:4:4).

Ids: contiguous ``0..3`` things then ``4..7`` stuff; json category id = contiguous + 1; panoptic
segment id = ``category_id * 1000 + k`` (``k`` = painting index of the instance, 0 for stuff, whose
regions of one class form a single segment, as in COCO). No void pixels.

Files (under ``root``, default ``$DETECTRON2_DATASETS/synthetic``)::

    params.json                      generator version, source hash, SyntheticConfig
    {train,val}/000000.jpg           images (JPEG)
    panoptic_{train,val}/000000.png  COCO panoptic PNGs (RGB-encoded ids)
    panoptic_semseg_{train,val}/     uint8 contiguous class ids (255 = ignore; unused here)
    regions_{train,val}/             uint16 finest GT regions: each connected Voronoi cell and each
                                     visible instance has its own id (superpixel-style GT)
    annotations/panoptic_{train,val}.json   COCO panoptic json
    annotations/instances_{train,val}.json  COCO instance json (things; RLE, bbox, area, iscrowd=0)

Registered names (``import seg_methods`` registers them lazily; nothing is written until the first
``DatasetCatalog.get``): ``synthetic_panoptic_{train,val}`` (evaluator ``coco_panoptic_seg``),
``synthetic_sem_seg_{train,val}`` (``sem_seg``), ``synthetic_instance_{train,val}`` (``coco``).
Evaluators read files named in the metadata: call ``DatasetCatalog.get`` (or
:func:`generate_synthetic_dataset`) before building one on a fresh machine.

Command line::

    python -m seg_methods.data.datasets.synthetic --root datasets/synthetic [--force]

How to extend it:

* **Class hierarchy** (HSSN): ``MetadataCatalog.get(name).class_hierarchy`` holds a 3-level
  taxonomy ``{"names": [classes, super-classes, roots], "parents": [...]}``: ellipse -> curved;
  rectangle, triangle, star -> polygonal; stripes, checker -> oriented; dots, blobs -> isotropic;
  curved, polygonal -> thing; oriented, isotropic -> stuff. Add a class by appending to
  ``THING_CLASSES`` / ``STUFF_ONLY_CLASSES`` in ``_synthetic.py`` with its drawing branch
  (``_shape_polygon`` / ``_texture_weight``), colour and super-class.
* **Superpixel-style evaluation**: every dict carries ``regions_file_name`` (the regions map
  above) and the metadata ``regions_root``; the instance-level maps are the panoptic PNGs.
* **High resolution**: every length is relative to the image size, so a high-resolution split is
  ``register_synthetic("synthetic_hr", image_size=1024, num_train=100, num_val=50)`` (its own
  folder and names ``synthetic_hr_*``). For mask refinement (CRM, one object per record, stored
  coarse masks, 2048 x 2048 val scenes with thin structures) see ``synthetic_highres.py``
  (``synthetic_highres_{train,val}``).
* All parameters are in :class:`SyntheticConfig`; ``register_synthetic(..., **overrides)`` passes
  any of them. A changed config or generator source regenerates the folder.
"""

import argparse
import dataclasses
import os
import sys

from ._synthetic import (  # noqa: F401  (public API)
    ALL_CLASSES,
    CLASS_TO_SUPER,
    GENERATOR_VERSION,
    IGNORE_LABEL,
    LABEL_DIVISOR,
    NUM_THINGS,
    STUFF_ONLY_CLASSES,
    SUPER_CLASSES,
    THING_CLASSES,
    Scene,
    SyntheticConfig,
    class_hierarchy,
    generate_synthetic_dataset,
    is_generated,
    register_synthetic,
    render_scene,
    scene_rng,
    split_paths,
    synthetic_metadata,
)

__all__ = [
    "SyntheticConfig",
    "Scene",
    "render_scene",
    "scene_rng",
    "generate_synthetic_dataset",
    "is_generated",
    "register_synthetic",
    "synthetic_metadata",
    "class_hierarchy",
    "split_paths",
]


def main(argv=None) -> int:
    """Command line: generate the synthetic dataset and print what was written."""
    from .layout import datasets_root

    default = SyntheticConfig()
    parser = argparse.ArgumentParser(description="Generate the seg_methods synthetic dataset.")
    parser.add_argument(
        "--root",
        default=os.path.join(datasets_root(), "synthetic"),
        help="dataset folder (default: $DETECTRON2_DATASETS/synthetic)",
    )
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    parser.add_argument("--num-train", type=int, default=default.num_train)
    parser.add_argument("--num-val", type=int, default=default.num_val)
    parser.add_argument("--image-size", type=int, default=default.height)
    parser.add_argument("--seed", type=int, default=default.seed)
    parser.add_argument("--workers", type=int, default=None, help="processes (default 2)")
    args = parser.parse_args(argv)
    cfg = dataclasses.replace(
        default,
        num_train=args.num_train,
        num_val=args.num_val,
        height=args.image_size,
        width=args.image_size,
        seed=args.seed,
    )
    print(f"synthetic dataset -> {os.path.abspath(args.root)}")
    out = generate_synthetic_dataset(
        args.root, cfg, force=args.force, num_workers=args.workers, verbose=True
    )
    if not out["generated"]:
        print("already up to date (params.json matches); use --force to regenerate")
        return 0
    counts = ", ".join(f"{k}: {v} images" for k, v in out["num_images"].items())
    print(
        f"wrote {counts} of {cfg.height}x{cfg.width}; {out['bytes'] / 2**20:.1f} MiB "
        f"in {out['seconds']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
