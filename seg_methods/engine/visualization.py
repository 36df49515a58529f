"""Drawing model outputs and ground truth with detectron2's ``Visualizer``.

Used by the trainer after evaluation (``OUTPUT_DIR/vis/*.png``) and by ``demo/demo.py``.
Model outputs follow detectron2's conventions: "panoptic_seg" = (ids (H, W), segments_info),
"instances" with pred_masks (N, H, W), scores, pred_classes, "sem_seg" (C, H, W) scores.
"""

import logging
import os
from typing import Dict, List, Optional

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.evaluation import inference_context
from detectron2.utils.file_io import PathManager
from detectron2.utils.visualizer import ColorMode, Visualizer
from PIL import Image

logger = logging.getLogger(__name__)

# Preference order of the outputs drawn when only one is wanted (demo).
PREDICTION_KINDS = ("panoptic_seg", "instances", "sem_seg")


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
    vis = Visualizer(image_rgb, metadata, scale=scale, instance_mode=ColorMode.IMAGE)
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
    vis = Visualizer(image_rgb, metadata, scale=scale, instance_mode=ColorMode.IMAGE)
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
    """Run the model on records and save "ground truth | each prediction" strips as PNGs.

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
                panels.append(gt)
            for kind in available_prediction_kinds(outputs):
                panels.append(
                    draw_prediction(
                        image,
                        outputs,
                        metadata,
                        kind,
                        instance_score_threshold=instance_score_threshold,
                        scale=scale,
                    )
                )
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
