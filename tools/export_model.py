#!/usr/bin/env python
"""Export the inference of a seg_methods model to TorchScript or ONNX.

    python tools/export_model.py --config-file CONFIG --format torchscript|onnx --output DIR \
        [--sample-image IMG | --size H W] [--outputs sem_seg ...] [--reference-ops] \
        [--random-weights] \
        [MODEL.WEIGHTS model.pth ...]

Writes DIR/model.ts (or model.onnx) and DIR/seg_methods_export.json, and, for TorchScript graphs
that call compiled ops, a copy of the op library (DIR/_C*.so) for demo/deploy_torchscript.py.
The graph takes one (3, H, W) uint8 image in cfg.INPUT.FORMAT at the tracing size: the sample
image after the test-time resize (cfg.INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST), or --size. The
export is verified against eager inference on the sample image and on a different one, and the
maximum differences are printed. See seg_methods/export/ for what is exported per model.
"""

import argparse
import logging
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.data import transforms as T  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from seg_methods.config import get_cfg  # noqa: E402
from seg_methods.engine.trainer import build_checkpointer  # noqa: E402
from seg_methods.export import export_model  # noqa: E402
from seg_methods.utils.ext import load_extension  # noqa: E402


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--format", required=True, choices=["torchscript", "onnx"])
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--sample-image", help="tracing image (resized as at test time)")
    parser.add_argument(
        "--size", nargs=2, type=int, metavar=("H", "W"), help="random tracing image size"
    )
    parser.add_argument(
        "--outputs",
        nargs="+",
        help="outputs to export (default: every faithfully traceable one the model returns: "
        "sem_seg, superpixels); 'instances' on request",
    )
    parser.add_argument(
        "--reference-ops",
        action="store_true",
        help="trace the pure-PyTorch reference of every op (no compiled library needed to run "
        "the TorchScript file; always the case for ONNX)",
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="export without MODEL.WEIGHTS (random initialisation), e.g. for benchmarks",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE overrides")
    return parser


def setup_cfg(args):
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file, allow_unsafe=False)
    cfg.merge_from_list(args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def load_sample(cfg, path: str) -> torch.Tensor:
    """(3, H, W) uint8 image in cfg.INPUT.FORMAT, resized as DefaultPredictor does."""
    image = read_image(path, format=cfg.INPUT.FORMAT)
    aug = T.ResizeShortestEdge(
        [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
    )
    image = aug.get_transform(image).apply_image(image)
    return torch.as_tensor(image.astype("uint8").transpose(2, 0, 1).copy())


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="seg_methods")
    log = logging.getLogger("seg_methods")
    cfg = setup_cfg(args)
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        build_checkpointer(model, strict=True).load(cfg.MODEL.WEIGHTS)
    elif not args.random_weights:
        raise SystemExit(
            "MODEL.WEIGHTS is empty: pass MODEL.WEIGHTS path/to/model.pth, or --random-weights "
            "to export a randomly initialised model on purpose"
        )
    sample = load_sample(cfg, args.sample_image) if args.sample_image else None
    result = export_model(
        cfg,
        model,
        args.format,
        args.output,
        sample_image=sample,
        image_size=tuple(args.size) if args.size else None,
        outputs=args.outputs,
        reference_ops_only=args.reference_ops,
    )
    if result.ops:
        ext = load_extension()
        shutil.copy(ext.__file__, args.output)
        log.info(f"copied the op library {os.path.basename(ext.__file__)} to {args.output}")
    print(f"exported {cfg.MODEL.META_ARCHITECTURE} to {result.path}")
    print(f"  outputs: {result.output_names}; compiled ops in the graph: {result.ops or 'none'}")
    if result.verified:
        for image, diffs in result.max_abs_diff.items():
            print(f"  max |exported - eager| on the {image.replace('_', ' ')}: {diffs}")
    else:
        print("  not verified (onnxruntime is not installed)")
    return result


if __name__ == "__main__":
    main()
