"""Per-format target builders: augmented label maps -> detectron2 ``Instances``.

Every builder returns an ``Instances`` of the (padded) image size with
``gt_classes`` (N,) int64, ``gt_masks`` (N, H, W) bool and ``gt_boxes`` (N, 4) XYXY boxes
enclosing each mask. Segments whose mask is empty after augmentation (cropped out) are dropped:
a query should not be matched to an object that is not visible. An image without segments
gives N = 0 with masks of shape (0, H, W).

Shape shorthand:
    H, W: padded image size; N: number of segments kept.
"""

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.structures import BitMasks, Instances


def _make_instances(classes: List[int], masks: List[torch.Tensor], image_size) -> Instances:
    """Stack masks and classes, drop empty masks, add enclosing boxes."""
    h, w = image_size
    instances = Instances((h, w))
    if masks:
        gt_masks = torch.stack(masks).to(torch.bool)  # (N, H, W)
        gt_classes = torch.as_tensor(classes, dtype=torch.int64)  # (N,)
        keep = gt_masks.flatten(1).any(dim=1)
        gt_masks, gt_classes = gt_masks[keep], gt_classes[keep]
    else:
        gt_masks = torch.zeros((0, h, w), dtype=torch.bool)
        gt_classes = torch.zeros((0,), dtype=torch.int64)
    instances.gt_classes = gt_classes
    bitmasks = BitMasks(gt_masks)
    instances.gt_boxes = bitmasks.get_bounding_boxes()
    instances.gt_masks = bitmasks.tensor
    return instances


def _check_class_range(labels: Sequence[int], num_classes: Optional[int], source: str) -> None:
    if num_classes is None:
        return
    bad = sorted({int(c) for c in labels if not 0 <= int(c) < num_classes})
    if bad:
        raise ValueError(
            f"{source}: labels {bad} are outside [0, {num_classes}) (the dataset metadata has "
            f"{num_classes} classes) and are not the ignore label."
        )


def semantic_targets(
    sem_seg: torch.Tensor, *, ignore_label: int, num_classes: Optional[int] = None, source=""
) -> Instances:
    """One binary mask per class present in a semantic label map.

    Args:
        sem_seg (Tensor): (H, W) int64 label map; ``ignore_label`` marks void/padding.
        ignore_label (int): label that produces no target.
        num_classes (int or None): when given, labels outside [0, num_classes) raise.
        source (str): file name used in error messages.

    Returns:
        Instances: gt_classes (N,), gt_masks (N, H, W), gt_boxes (N, 4).
    """
    classes = [int(c) for c in torch.unique(sem_seg).tolist() if int(c) != ignore_label]
    _check_class_range(classes, num_classes, f"semantic label map '{source}'")
    masks = [sem_seg == c for c in classes]
    return _make_instances(classes, masks, sem_seg.shape)


def panoptic_targets(
    pan_ids: torch.Tensor,
    segments_info: List[Dict],
    *,
    num_classes: Optional[int] = None,
    source: str = "",
) -> Instances:
    """One binary mask per non-crowd segment of a panoptic id map (things and stuff).

    Args:
        pan_ids (Tensor): (H, W) int64 segment ids (``rgb_to_ids`` of the panoptic PNG); ids absent
            from ``segments_info`` (void, padding) produce no target.
        segments_info (list[dict]): detectron2 panoptic records with "id", "category_id"
            (contiguous) and optional "iscrowd".
        num_classes (int or None): when given, category ids outside [0, num_classes) raise.
        source (str): file name used in error messages.

    Returns:
        Instances: gt_classes (N,), gt_masks (N, H, W), gt_boxes (N, 4).
    """
    segments = [s for s in segments_info if not s.get("iscrowd", 0)]
    classes = [int(s["category_id"]) for s in segments]
    _check_class_range(classes, num_classes, f"segments_info of panoptic PNG '{source}'")
    masks = [pan_ids == int(s["id"]) for s in segments]
    return _make_instances(classes, masks, pan_ids.shape)


def instance_targets(
    masks: List[torch.Tensor],
    classes: List[int],
    image_size,
    *,
    num_classes: Optional[int] = None,
    source: str = "",
) -> Instances:
    """Instances from per-object masks already rasterised and augmented.

    Args:
        masks (list[Tensor]): N masks, each (H, W) bool.
        classes (list[int]): N contiguous category ids.
        image_size (tuple[int, int]): (H, W), used when N = 0.
        num_classes (int or None): when given, category ids outside [0, num_classes) raise.
        source (str): file name used in error messages.

    Returns:
        Instances: gt_classes (N,), gt_masks (N, H, W), gt_boxes (N, 4).
    """
    _check_class_range(classes, num_classes, f"annotations of image '{source}'")
    return _make_instances(list(classes), list(masks), tuple(image_size))


def semantic_from_panoptic(
    pan_ids: np.ndarray, segments_info: List[Dict], ignore_label: int
) -> np.ndarray:
    """Semantic label map of a panoptic id map, computed before augmentation.

    Every segment (crowd included) gets its category id; pixels of unknown ids (void) get
    ``ignore_label``.

    Args:
        pan_ids (np.ndarray): (H, W) int segment ids.
        segments_info (list[dict]): records with "id" and contiguous "category_id".
        ignore_label (int): label for void pixels.

    Returns:
        np.ndarray: (H, W) label map, uint8 when every label fits, else float64 (exact for
        integers and supported by every detectron2 transform).
    """
    labels = [int(s["category_id"]) for s in segments_info] + [ignore_label]
    dtype = np.uint8 if 0 <= min(labels) and max(labels) <= 255 else np.float64
    sem = np.full(pan_ids.shape, ignore_label, dtype=dtype)
    for s in segments_info:
        sem[pan_ids == int(s["id"])] = int(s["category_id"])
    return sem
