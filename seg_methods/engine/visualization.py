"""Drawing model outputs and ground truth with detectron2's ``Visualizer``.

Used by the trainer after evaluation (``OUTPUT_DIR/vis/*.png``) and by ``demo/demo.py``.
Model outputs follow detectron2's conventions: "panoptic_seg" = (ids (H, W), segments_info),
"instances" with pred_masks (N, H, W), scores, pred_classes, "sem_seg" (C, H, W) scores.

The trainer's strips put the panels side by side, each under a title band
(:data:`PANEL_TITLES`: "ground truth", "panoptic", "instances", "semantic") of
:func:`title_band_height` rows.
"""

import logging
import os
from typing import Dict, List, Optional

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.data import detection_utils as utils
from detectron2.evaluation import inference_context
from detectron2.utils.file_io import PathManager
from detectron2.utils.visualizer import ColorMode, Visualizer
from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

# Preference order of the outputs drawn when only one is wanted (demo).
PREDICTION_KINDS = ("panoptic_seg", "instances", "sem_seg")
# Title of each panel of the trainer's drawings.
PANEL_TITLES = {
    "ground_truth": "ground truth",
    "panoptic_seg": "panoptic",
    "instances": "instances",
    "sem_seg": "semantic",
}
TITLE_BACKGROUND = (32, 32, 32)
TITLE_COLOR = (255, 255, 255)


def title_band_height(panel_height: int) -> int:
    """Rows of the title band above a panel of ``panel_height`` rows (1/16 of it, >= 20)."""
    return max(20, panel_height // 16)


def add_title(panel: np.ndarray, title: str) -> np.ndarray:
    """Put a band with ``title`` (white on dark grey, centred) above a drawing.

    Args:
        panel (np.ndarray): (H, W, 3) uint8 RGB drawing.
        title (str): text of the band.

    Returns:
        np.ndarray: (H + title_band_height(H), W, 3) uint8.
    """
    h, w = panel.shape[:2]
    band_h = title_band_height(h)
    band = Image.new("RGB", (w, band_h), TITLE_BACKGROUND)
    draw = ImageDraw.Draw(band)
    font = ImageFont.load_default(size=max(8, int(band_h * 0.7)))
    left, top, right, bottom = draw.textbbox((0, 0), title, font=font)
    xy = ((w - (right - left)) / 2 - left, (band_h - (bottom - top)) / 2 - top)
    draw.text(xy, title, fill=TITLE_COLOR, font=font)
    return np.concatenate([np.asarray(band), panel], axis=0)


def drawing_metadata(metadata):
    """Metadata whose ``thing_classes``/``thing_colors`` are indexed by contiguous class id.

    Panoptic datasets here use one label space for all classes (Mask2Former's convention:
    ``stuff_classes`` lists every class, things keep their joint contiguous ids), while
    detectron2's ``Visualizer`` looks thing names up as ``thing_classes[category_id]``. When
    ``stuff_classes`` covers every thing id, drawings use it (and ``stuff_colors``) for things
    too; otherwise (e.g. COCO instance datasets) ``metadata`` is returned unchanged.

    Args:
        metadata (Metadata): dataset metadata.

    Returns:
        Metadata: ``metadata`` or a copy with joint-indexed thing names and colours.
    """
    thing_map = metadata.get("thing_dataset_id_to_contiguous_id", None)
    names = metadata.get("stuff_classes", None)
    if not thing_map or not names or max(thing_map.values()) >= len(names):
        return metadata
    fields = dict(metadata.as_dict(), thing_classes=list(names))
    colors = metadata.get("stuff_colors", None)
    if colors is not None and len(colors) == len(names):
        fields["thing_colors"] = [list(c) for c in colors]
    else:
        fields.pop("thing_colors", None)
    return Metadata(**fields)


def available_prediction_kinds(outputs: Dict) -> List[str]:
    """Keys of :data:`PREDICTION_KINDS` present in one model output dict, in preference order."""
    return [k for k in PREDICTION_KINDS if k in outputs]


def draw_prediction(
    image_rgb: np.ndarray,
    outputs: Dict,
    metadata,
    kind: Optional[str] = None,
    *,
    instance_score_threshold: float = 0.5,
    scale: float = 1.0,
) -> np.ndarray:
    """Draw one kind of prediction over the image.

    Args:
        image_rgb (np.ndarray): (H, W, 3) uint8 RGB image at the output's resolution.
        outputs (dict): one model output dict.
        metadata: dataset metadata (class names/colours).
        kind (str or None): "panoptic_seg", "instances" or "sem_seg"; None picks the first
            available in :data:`PREDICTION_KINDS`.
        instance_score_threshold (float): instances with a lower score are not drawn.
        scale (float): size of the drawing relative to the image.

    Returns:
        np.ndarray: (scale * H, scale * W, 3) uint8 RGB drawing.
    """
    if kind is None:
        kinds = available_prediction_kinds(outputs)
        if not kinds:
            raise KeyError(f"model output has none of {PREDICTION_KINDS}: {sorted(outputs)}")
        kind = kinds[0]
    vis = Visualizer(
        image_rgb, drawing_metadata(metadata), scale=scale, instance_mode=ColorMode.IMAGE
    )
    if kind == "panoptic_seg":
        seg, segments_info = outputs["panoptic_seg"]
        out = vis.draw_panoptic_seg(seg.to("cpu"), segments_info)
    elif kind == "instances":
        inst = outputs["instances"].to("cpu")
        if inst.has("scores"):
            inst = inst[inst.scores >= instance_score_threshold]
        if inst.has("pred_boxes") and not inst.pred_boxes.tensor.any():
            inst.remove("pred_boxes")  # placeholder boxes of mask-only models
        out = vis.draw_instance_predictions(inst)
    elif kind == "sem_seg":
        out = vis.draw_sem_seg(outputs["sem_seg"].argmax(dim=0).to("cpu"))
    else:
        raise KeyError(f"unknown prediction kind '{kind}'; expected one of {PREDICTION_KINDS}")
    return out.get_image()


def draw_ground_truth(
    image_rgb: np.ndarray, record: Dict, metadata, *, scale: float = 1.0
) -> Optional[np.ndarray]:
    """Draw a dataset record's labels: panoptic if present, else instances, else semantic.

    Returns:
        np.ndarray or None: (scale * H, scale * W, 3) uint8 drawing; None when the record has
        no labels.
    """
    if "pan_seg_file_name" in record and "segments_info" in record:
        labels = {k: record[k] for k in ("pan_seg_file_name", "segments_info")}
    elif record.get("annotations") and all("bbox" in a for a in record["annotations"]):
        labels = {"annotations": record["annotations"]}
    elif "sem_seg_file_name" in record:
        labels = {"sem_seg_file_name": record["sem_seg_file_name"]}
    else:
        return None
    vis = Visualizer(
        image_rgb, drawing_metadata(metadata), scale=scale, instance_mode=ColorMode.IMAGE
    )
    return vis.draw_dataset_dict(labels).get_image()


def visualize_predictions(
    model,
    mapper,
    records: List[Dict],
    metadata,
    output_dir: str,
    *,
    instance_score_threshold: float = 0.5,
    min_size: int = 512,
) -> List[str]:
    """Run the model on records and save "ground truth | each prediction" strips as PNGs, each
    panel under its title (:func:`add_title`).

    Args:
        model (nn.Module): the model; switched to eval mode for the call and restored.
        mapper (callable): test-time dataset mapper.
        records (list[dict]): dataset records to draw.
        metadata: dataset metadata.
        output_dir (str): folder for ``<index>_<image name>.png``.
        instance_score_threshold (float): see :func:`draw_prediction`.
        min_size (int): smaller images are drawn enlarged so that their longer side is
            ``min_size`` (labels stay readable on small images).

    Returns:
        list[str]: paths of the written files.
    """
    PathManager.mkdirs(output_dir)
    paths = []
    with inference_context(model), torch.no_grad():
        for i, record in enumerate(records):
            outputs = model([mapper(record)])[0]
            image = utils.read_image(record["file_name"], format="RGB")
            scale = max(1.0, min_size / max(image.shape[:2]))
            panels = []
            gt = draw_ground_truth(image, record, metadata, scale=scale)
            if gt is not None:
                panels.append(add_title(gt, PANEL_TITLES["ground_truth"]))
            for kind in available_prediction_kinds(outputs):
                drawing = draw_prediction(
                    image,
                    outputs,
                    metadata,
                    kind,
                    instance_score_threshold=instance_score_threshold,
                    scale=scale,
                )
                panels.append(add_title(drawing, PANEL_TITLES[kind]))
            if not panels:
                continue
            stem = os.path.splitext(os.path.basename(record["file_name"]))[0]
            path = os.path.join(output_dir, f"{i:03d}_{stem}.png")
            with PathManager.open(path, "wb") as f:
                Image.fromarray(np.concatenate(panels, axis=1)).save(f, format="PNG")
            paths.append(path)
    return paths


def visualize_dataset_predictions(cfg, model, mapper, output_dir: str) -> List[str]:
    """Draw the first ``cfg.TEST.NUM_VIS_IMAGES`` images of ``cfg.DATASETS.TEST[0]``.

    Returns:
        list[str]: written paths (empty when NUM_VIS_IMAGES is 0 or there is no test set).
    """
    n = cfg.TEST.NUM_VIS_IMAGES
    if n <= 0 or not len(cfg.DATASETS.TEST):
        return []
    name = cfg.DATASETS.TEST[0]
    records = DatasetCatalog.get(name)[:n]
    paths = visualize_predictions(model, mapper, records, MetadataCatalog.get(name), output_dir)
    logger.info(f"Wrote {len(paths)} prediction drawings of '{name}' to {output_dir}")
    return paths


# ------------------------------------------------------------------------------------------------
# ProtoSeg: nearest-prototype painting (demo/demo.py --paint-prototypes)
# ------------------------------------------------------------------------------------------------
def prototype_palette(num_classes: int, num_prototypes: int) -> np.ndarray:
    """One RGB colour per (class, prototype): class c gets hue c / C, prototype m a shade.

    Shades go from dark (m = 0, HSV value 0.45) to bright (m = M - 1, value 1.0) at saturation
    0.85, so the prototypes of one class look alike and classes stay apart.

    Args:
        num_classes (int): C.
        num_prototypes (int): M.

    Returns:
        np.ndarray: (C * M, 3) uint8, row ``c * M + m``.
    """
    c = np.arange(num_classes, dtype=np.float64)[:, None].repeat(num_prototypes, axis=1)
    m = np.arange(num_prototypes, dtype=np.float64)[None, :].repeat(num_classes, axis=0)
    hue = c / max(num_classes, 1)
    value = 0.45 + 0.55 * m / max(num_prototypes - 1, 1)
    sat = np.full_like(hue, 0.85)
    # HSV -> RGB (vectorised colorsys.hsv_to_rgb)
    i = np.floor(hue * 6.0).astype(int) % 6
    f = hue * 6.0 - np.floor(hue * 6.0)
    p, q, t = value * (1 - sat), value * (1 - sat * f), value * (1 - sat * (1 - f))
    choices = [
        (value, t, p),
        (q, value, p),
        (p, value, t),
        (p, q, value),
        (t, p, value),
        (value, p, q),
    ]
    rgb = np.zeros(hue.shape + (3,))
    for k, (r, g, b) in enumerate(choices):
        sel = i == k
        rgb[sel] = np.stack([r[sel], g[sel], b[sel]], axis=-1)
    return np.round(rgb * 255).astype(np.uint8).reshape(-1, 3)


def paint_prototypes(
    prototype_index, num_classes: int, num_prototypes: int, image: Optional[np.ndarray] = None
) -> np.ndarray:
    """Paint each pixel with the colour of its nearest prototype (:func:`prototype_palette`).

    Args:
        prototype_index (Tensor or np.ndarray): (H, W) int ids ``c * M + m`` (ProtoSeg's
            "prototype_index" output).
        num_classes (int): C.
        num_prototypes (int): M.
        image (np.ndarray or None): (H, W, 3) uint8 RGB; if given, the painting is blended
            50/50 over it.

    Returns:
        np.ndarray: (H, W, 3) uint8 RGB.
    """
    if isinstance(prototype_index, torch.Tensor):
        prototype_index = prototype_index.cpu().numpy()
    ids = np.asarray(prototype_index, dtype=np.int64)
    total = num_classes * num_prototypes
    if ids.ndim != 2 or ids.size and (ids.min() < 0 or ids.max() >= total):
        raise ValueError(
            f"prototype_index must be (H, W) ids in [0, {total}) (C={num_classes} classes x "
            f"M={num_prototypes} prototypes), got shape {ids.shape}"
            + (f", range [{ids.min()}, {ids.max()}]" if ids.size else "")
        )
    painted = prototype_palette(num_classes, num_prototypes)[ids]
    if image is not None:
        if image.shape[:2] != ids.shape:
            raise ValueError(f"image {image.shape[:2]} and prototype_index {ids.shape} differ")
        painted = ((painted.astype(np.uint16) + image.astype(np.uint16)) // 2).astype(np.uint8)
    return painted
