#!/usr/bin/env python
"""Run a seg_methods model on images and save drawings of its predictions.

    python demo/demo.py --config-file CONFIG --input IMG_OR_DIR_OR_GLOB [...] --output DIR \
        [--confidence 0.5] [MODEL.WEIGHTS path/to/model.pth ...]

For each image the panoptic prediction is drawn if the model outputs one, else the instances
(score >= --confidence), else the semantic segmentation, with the class names of
``cfg.DATASETS.TEST[0]``. Runs on the CPU when CUDA is unavailable.
"""

import argparse
import glob
import os
import sys
import time

from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.utils.logger import setup_logger
from PIL import Image

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from seg_methods.config import get_cfg  # noqa: E402
from seg_methods.engine import build_predictor, draw_prediction, resolve_device  # noqa: E402
from seg_methods.engine.visualization import available_prediction_kinds  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument(
        "--input", nargs="+", required=True, help="image files, folders or glob patterns"
    )
    parser.add_argument("--output", required=True, help="folder for the drawings")
    parser.add_argument(
        "--confidence", type=float, default=0.5, help="minimum score of drawn instances"
    )
    parser.add_argument(
        "--opts",
        dest="flag_opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides KEY VALUE ... (detectron2 demo spelling)",
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ..."
    )
    return parser


def expand_inputs(inputs):
    """Files, folders (their images, sorted) and glob patterns -> list of image paths."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            names = sorted(os.listdir(item))
            paths += [os.path.join(item, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
        elif glob.has_magic(item):
            paths += sorted(p for p in glob.glob(item) if p.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"--input '{item}' is not a file, folder or matching glob")
    if not paths:
        raise FileNotFoundError(f"no image found in --input {inputs}")
    return paths


def setup_cfg(args):
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file, allow_unsafe=False)
    opts = list(args.opts) + list(args.flag_opts)
    if opts[:1] == ["--opts"]:
        opts = opts[1:]
    cfg.merge_from_list(opts)
    resolve_device(cfg)
    cfg.freeze()
    return cfg


def main(argv=None):
    args = get_parser().parse_args(argv)
    cfg = setup_cfg(args)
    paths = expand_inputs(args.input)
    predictor = build_predictor(cfg)
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else "__unused")
    os.makedirs(args.output, exist_ok=True)
    written = []
    for path in paths:
        image_bgr = read_image(path, format="BGR")
        start = time.perf_counter()
        outputs = predictor(image_bgr)
        elapsed = time.perf_counter() - start
        kinds = available_prediction_kinds(outputs)
        drawing = draw_prediction(
            image_bgr[:, :, ::-1], outputs, metadata, instance_score_threshold=args.confidence
        )
        out_path = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0] + ".png")
        Image.fromarray(drawing).save(out_path)
        written.append(out_path)
        print(f"{path}: {elapsed:.3f} s, outputs {kinds}, drew {kinds[0]} -> {out_path}")
    print(f"Wrote {len(written)} drawings to {args.output}")
    return written


if __name__ == "__main__":
    setup_logger(name="seg_methods")
    setup_logger()
    main()
