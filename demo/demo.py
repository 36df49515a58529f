#!/usr/bin/env python
"""Run a seg_methods model on images and save drawings of its predictions.

    python demo/demo.py --config-file CONFIG --input IMG_OR_DIR_OR_GLOB [...] --output DIR \
        [--confidence 0.5] [--random-weights] [MODEL.WEIGHTS path/to/model.pth ...]

For each image the panoptic prediction is drawn if the model outputs one, else the instances
(score >= --confidence), else the semantic segmentation, with the class names of
``cfg.DATASETS.TEST[0]``. Runs on the CPU when CUDA is unavailable.

Weights: ``MODEL.WEIGHTS`` is required (a path that does not exist is an error); drawing the
predictions of random weights needs ``--random-weights``.

Output names: each drawing is a PNG named after the input's path relative to the deepest folder
common to all inputs, keeping the input's extension (``a.jpg`` -> ``a.jpg.png``; a ``.png`` input
keeps its name), so that ``a.jpg`` and ``a.png``, or ``x/a.png`` and ``y/a.png``, never overwrite
each other; sub-folders are mirrored under ``--output``.

ProtoSeg (``--paint-prototypes``): also writes ``<drawing>.prototypes.png`` (e.g.
``a.jpg.prototypes.png``), each pixel painted with the colour of its nearest prototype: the
class's hue, one shade per prototype (``seg_methods.engine.visualization.paint_prototypes``);
the model returns "prototype_index" because ``MODEL.PROTOSEG.OUTPUT_PROTOTYPE_INDEX`` is set.

Hierarchical Lovász Embeddings (``--paint-embedding``): also writes ``<drawing>.embedding.png``,
the first three dimensions of the unit pixel embedding as RGB (HLE Fig. 3;
``seg_methods.modeling.postprocessing.hle_decoding.embedding_to_rgb``); the model returns
"embedding" because ``MODEL.HLE.OUTPUT_EMBEDDING`` is set.

Unreadable images (not an image, truncated, missing) are reported by name and skipped; the run
goes on and prints the number of failures at the end. The exit code is 1 if any image failed.
"""

import argparse
import glob
import os
import sys
import time
from typing import List, NamedTuple, Tuple

from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.utils.logger import setup_logger
from PIL import Image

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from seg_methods.config import get_cfg  # noqa: E402
from seg_methods.engine import build_predictor, draw_prediction, resolve_device  # noqa: E402
from seg_methods.engine.visualization import available_prediction_kinds  # noqa: E402
from seg_methods.engine.visualization import paint_prototypes  # noqa: E402  (ProtoSeg painting)
from seg_methods.modeling.postprocessing.hle_decoding import embedding_to_rgb  # noqa: E402  (HLE)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# What reading a bad image file raises: PIL's UnidentifiedImageError and truncated files
# (OSError), decoder errors (ValueError), broken PNG chunks (SyntaxError).
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError)


class DemoResult(NamedTuple):
    """What :func:`main` did.

    Attributes:
        written (list[str]): drawings written, in input order.
        failed (list[tuple[str, str]]): (input path, reason) of each image that was skipped.
    """

    written: List[str]
    failed: List[Tuple[str, str]]


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
        "--random-weights",
        action="store_true",
        help="draw the predictions of randomly initialised weights when MODEL.WEIGHTS is empty "
        "(refused otherwise)",
    )
    # --- ProtoSeg prototype painting ---
    parser.add_argument(
        "--paint-prototypes",
        action="store_true",
        help="ProtoSeg models: also write <drawing>.prototypes.png, each pixel coloured by its "
        "nearest prototype (class hue, prototype shade)",
    )
    # --- end ProtoSeg prototype painting ---
    parser.add_argument(
        "--paint-embedding",
        action="store_true",
        help="Hierarchical Lovasz Embedding models: also write <drawing>.embedding.png, the "
        "embedding's first three dimensions as RGB",
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
    """Files, folders (their images, sorted) and glob patterns -> list of image paths (each
    once, in the order given)."""
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
    seen, unique = set(), []
    for p in paths:
        key = os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def output_paths(paths: List[str], output_dir: str) -> List[str]:
    """The drawing of each input (see the module docstring for the naming rule).

    Args:
        paths (list[str]): input images.
        output_dir (str): the ``--output`` folder.

    Returns:
        list[str]: one PNG path per input, all different.
    """
    folders = [os.path.dirname(os.path.abspath(p)) for p in paths]
    root = os.path.commonpath(folders)
    outs = []
    for p in paths:
        rel = os.path.relpath(os.path.abspath(p), root)
        if not rel.lower().endswith(".png"):
            rel += ".png"
        outs.append(os.path.join(output_dir, rel))
    clashes = {o for o in outs if outs.count(o) > 1}
    if clashes:  # only possible with inputs such as "a.jpg" next to "a.jpg.png"
        raise ValueError(f"several inputs would be drawn to the same file(s): {sorted(clashes)}")
    return outs


def setup_cfg(args):
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file, allow_unsafe=False)
    opts = list(args.opts) + list(args.flag_opts)
    if opts[:1] == ["--opts"]:
        opts = opts[1:]
    cfg.merge_from_list(opts)
    # --- ProtoSeg prototype painting ---
    if getattr(args, "paint_prototypes", False):
        if cfg.MODEL.META_ARCHITECTURE != "ProtoSeg":
            raise ValueError(
                "--paint-prototypes needs a ProtoSeg model; MODEL.META_ARCHITECTURE is "
                f"{cfg.MODEL.META_ARCHITECTURE!r}"
            )
        cfg.MODEL.PROTOSEG.OUTPUT_PROTOTYPE_INDEX = True
    # --- end ProtoSeg prototype painting ---
    if getattr(args, "paint_embedding", False):
        if cfg.MODEL.META_ARCHITECTURE != "HierarchicalLovaszEmbedding":
            raise ValueError(
                "--paint-embedding needs a HierarchicalLovaszEmbedding model; "
                f"MODEL.META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE!r}"
            )
        cfg.MODEL.HLE.OUTPUT_EMBEDDING = True
    resolve_device(cfg)
    cfg.freeze()
    return cfg


def main(argv=None) -> DemoResult:
    """Draw the predictions of every input image; see the module docstring.

    Returns:
        DemoResult: the drawings written and the images skipped (with the reason).
    """
    args = get_parser().parse_args(argv)
    cfg = setup_cfg(args)
    paths = expand_inputs(args.input)
    outs = output_paths(paths, args.output)
    predictor = build_predictor(cfg, allow_random_weights=args.random_weights)
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else "__unused")
    written, failed = [], []
    for path, out_path in zip(paths, outs):
        try:
            image_bgr = read_image(path, format="BGR")
        except UNREADABLE_IMAGE_ERRORS as e:
            reason = f"{type(e).__name__}: {e}"
            failed.append((path, reason))
            print(f"{path}: SKIPPED, cannot read the image ({reason})", file=sys.stderr)
            continue
        start = time.perf_counter()
        outputs = predictor(image_bgr)
        elapsed = time.perf_counter() - start
        kinds = available_prediction_kinds(outputs)
        drawing = draw_prediction(
            image_bgr[:, :, ::-1], outputs, metadata, instance_score_threshold=args.confidence
        )
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        Image.fromarray(drawing).save(out_path)
        written.append(out_path)
        print(f"{path}: {elapsed:.3f} s, outputs {kinds}, drew {kinds[0]} -> {out_path}")
        # --- ProtoSeg prototype painting ---
        if args.paint_prototypes:
            proto_path = out_path[: -len(".png")] + ".prototypes.png"
            painting = paint_prototypes(
                outputs["prototype_index"],
                cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
                cfg.MODEL.PROTOSEG.NUM_PROTOTYPES,
            )
            Image.fromarray(painting).save(proto_path)
            written.append(proto_path)
            print(f"{path}: painted nearest prototypes -> {proto_path}")
        # --- end ProtoSeg prototype painting ---
        if args.paint_embedding:
            emb_path = out_path[: -len(".png")] + ".embedding.png"
            Image.fromarray(embedding_to_rgb(outputs["embedding"])).save(emb_path)
            written.append(emb_path)
            print(f"{path}: painted the embedding (dimensions 0-2 as RGB) -> {emb_path}")
    print(f"Wrote {len(written)} drawings to {args.output}")
    if failed:
        print(
            f"{len(failed)} of {len(paths)} image(s) could not be read and were skipped: "
            + ", ".join(p for p, _ in failed),
            file=sys.stderr,
        )
    return DemoResult(written, failed)


def cli(argv=None) -> int:
    """Command-line entry: :func:`main`, then the exit code (1 if an image was skipped)."""
    return 1 if main(argv).failed else 0


if __name__ == "__main__":
    setup_logger(name="seg_methods")
    setup_logger()
    sys.exit(cli())
