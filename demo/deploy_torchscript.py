#!/usr/bin/env python
"""Run a model exported by tools/export_model.py with torch alone and draw its prediction.

    python demo/deploy_torchscript.py --model DIR --input img.jpg --output out.png \
        [--op-library DIR/_C.cpython-311-x86_64-linux-gnu.so]

Deployment needs torch, numpy, Pillow, the exported folder (model.ts, its embedded metadata) and
the compiled op library of seg_methods (copied into the folder by the export tool), which is
loaded with ``torch.ops.load_library``: no seg_methods or detectron2 Python code is imported.

The image is resized to the size the model was traced at, the semantic map (argmax of
"sem_seg") or the superpixel map is resized back to the image (nearest) and drawn over it with
the dataset's colours, and the picture is written to --output.
"""

import argparse
import glob
import json
import os

import numpy as np
import torch
from PIL import Image

METADATA_NAME = "seg_methods_export.json"


def load_exported(model_path: str, op_library: str = None):
    """Load the op library, then the TorchScript model and its metadata.

    Args:
        model_path (str): model.ts or the folder holding it.
        op_library (str, optional): path of seg_methods' compiled library; default: the _C*.so
            in the model's folder, if any.

    Returns:
        (torch.jit.ScriptModule, dict): the model (eval mode) and the export metadata.
    """
    if os.path.isdir(model_path):
        model_path = os.path.join(model_path, "model.ts")
    folder = os.path.dirname(os.path.abspath(model_path))
    if op_library is None:
        found = sorted(glob.glob(os.path.join(folder, "_C*.so")))
        op_library = found[0] if found else None
    if op_library is not None:
        torch.ops.load_library(op_library)
    extra = {METADATA_NAME: ""}
    try:
        model = torch.jit.load(model_path, map_location="cpu", _extra_files=extra)
    except RuntimeError as e:
        if "seg_methods::" in str(e) and op_library is None:
            raise RuntimeError(
                f"{model_path} calls seg_methods' compiled ops: pass --op-library "
                "path/to/seg_methods/_C*.so (tools/export_model.py copies it next to model.ts)"
            ) from e
        raise
    return model.eval(), json.loads(extra[METADATA_NAME])


def palette(metadata: dict, num: int) -> np.ndarray:
    """(num, 3) uint8 colours: the dataset's stuff colours, else a fixed random palette."""
    colors = metadata.get("stuff_colors")
    if colors and len(colors) >= num:
        return np.asarray(colors[:num], dtype=np.uint8)
    return np.random.RandomState(0).randint(0, 256, (num, 3)).astype(np.uint8)


def predict(model, metadata: dict, rgb: np.ndarray) -> np.ndarray:
    """(H, W) int64 label map (semantic classes or superpixels) of an (H, W, 3) RGB image."""
    _, height, width = metadata["input"]["shape"]
    resized = np.asarray(Image.fromarray(rgb).resize((width, height), Image.BILINEAR))
    if metadata["input"]["channel_format"] == "BGR":
        resized = resized[:, :, ::-1]
    image = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))
    with torch.no_grad():
        outputs = dict(zip(metadata["outputs"], model(image)))
    if "sem_seg" in outputs:
        labels = outputs["sem_seg"].argmax(0)
    elif "superpixels" in outputs:
        labels = outputs["superpixels"]
    else:
        raise ValueError(f"no drawable output among {metadata['outputs']}")
    labels = labels.to(torch.int32).numpy()
    return np.asarray(Image.fromarray(labels).resize(rgb.shape[1::-1], Image.NEAREST))


def draw(rgb: np.ndarray, labels: np.ndarray, colors: np.ndarray, alpha: float = 0.6):
    """Blend the colourised label map over the image: (H, W, 3) uint8."""
    overlay = colors[labels % len(colors)]
    return (alpha * overlay + (1 - alpha) * rgb).astype(np.uint8)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--model", required=True, help="exported folder or model.ts")
    parser.add_argument("--input", required=True, help="image file")
    parser.add_argument("--output", required=True, help="picture to write (.png)")
    parser.add_argument("--op-library", help="seg_methods/_C*.so (default: next to model.ts)")
    args = parser.parse_args(argv)
    model, metadata = load_exported(args.model, args.op_library)
    rgb = np.asarray(Image.open(args.input).convert("RGB"))
    labels = predict(model, metadata, rgb)
    num = int(labels.max()) + 1
    if "sem_seg" in metadata["outputs"]:
        num = max(num, len(metadata.get("stuff_classes", [])))
    picture = draw(rgb, labels, palette(metadata, num))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    Image.fromarray(picture).save(args.output)
    classes = sorted(set(labels.flat))
    print(f"wrote {args.output} ({metadata['meta_architecture']}, {len(classes)} labels drawn)")


if __name__ == "__main__":
    main()
