"""Mask-classification targets: one binary mask per class / segment / object, as ``Instances``.

Registered generators (all write ``"instances"``):

==================  ==============  ======================================================
name                requires        one mask per
==================  ==============  ======================================================
``semantic_masks``  ``sem_seg``     class present in the semantic map (void excluded)
``panoptic_masks``  ``panoptic``    non-crowd panoptic segment (things and stuff)
``instance_masks``  ``annotations`` non-crowd COCO annotation
==================  ==============  ======================================================

Every builder returns an ``Instances`` of the (padded) image size with ``gt_classes`` (N,) int64,
``gt_masks`` (N, H, W) bool and ``gt_boxes`` (N, 4) XYXY boxes enclosing each mask (Mask2Former's
format). Segments whose mask is empty after augmentation (cropped out) are dropped: a query should
not be matched to an object that is not visible. An image without segments gives N = 0 with masks
of shape (0, H, W).

Shape shorthand:
    H, W: padded image size; N: number of segments kept.
"""

from typing import Dict, List, Optional

import torch
from detectron2.structures import BitMasks, Instances

from ..build import TARGET_GENERATOR_REGISTRY
from .base import TargetGenerator, TargetLabels, check_class_range


def make_instances(classes: List[int], masks: List[torch.Tensor], image_size) -> Instances:
    """Stack masks and classes, drop empty masks, add enclosing boxes.

    Args:
        classes (list[int]): N class ids.
        masks (list[Tensor]): N masks, each (H, W) bool.
        image_size (tuple[int, int]): (H, W), used when N = 0.

    Returns:
        Instances: gt_classes (N',), gt_masks (N', H, W) bool tensor, gt_boxes (N', 4), with the
        N' non-empty masks.
    """
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
    check_class_range(classes, num_classes, f"semantic label map '{source}'")
    masks = [sem_seg == c for c in classes]
    return make_instances(classes, masks, sem_seg.shape)


def panoptic_targets(
    pan_ids: torch.Tensor,
    segments_info: List[Dict],
    *,
    num_classes: Optional[int] = None,
    source: str = "",
) -> Instances:
    """One binary mask per non-crowd segment of a panoptic id map (things and stuff).

    Args:
        pan_ids (Tensor): (H, W) int64 segment ids (``rgb_to_ids`` of the panoptic PNG); ids
            absent from ``segments_info`` (void, padding) produce no target.
        segments_info (list[dict]): detectron2 panoptic records with "id", "category_id"
            (contiguous) and optional "iscrowd".
        num_classes (int or None): when given, category ids outside [0, num_classes) raise.
        source (str): file name used in error messages.

    Returns:
        Instances: gt_classes (N,), gt_masks (N, H, W), gt_boxes (N, 4).
    """
    segments = [s for s in segments_info if not s.get("iscrowd", 0)]
    classes = [int(s["category_id"]) for s in segments]
    check_class_range(classes, num_classes, f"segments_info of panoptic PNG '{source}'")
    masks = [pan_ids == int(s["id"]) for s in segments]
    return make_instances(classes, masks, pan_ids.shape)


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
    check_class_range(classes, num_classes, f"annotations of image '{source}'")
    return make_instances(list(classes), list(masks), tuple(image_size))


class SemanticMaskTargets(TargetGenerator):
    """``{"instances"}``: one mask per class of the semantic map (:func:`semantic_targets`)."""

    requires = ("sem_seg",)

    def __call__(self, labels: TargetLabels) -> Dict:
        return {
            "instances": semantic_targets(
                labels.sem_seg,
                ignore_label=labels.ignore_label,
                num_classes=labels.num_classes,
                source=labels.source("sem_seg"),
            )
        }


class PanopticMaskTargets(TargetGenerator):
    """``{"instances"}``: one mask per non-crowd segment (:func:`panoptic_targets`)."""

    requires = ("panoptic",)

    def __call__(self, labels: TargetLabels) -> Dict:
        return {
            "instances": panoptic_targets(
                labels.pan_ids,
                labels.segments_info,
                num_classes=labels.num_classes,
                source=labels.source("panoptic"),
            )
        }


class InstanceMaskTargets(TargetGenerator):
    """``{"instances"}``: one mask per non-crowd annotation (:func:`instance_targets`)."""

    requires = ("annotations",)

    def __call__(self, labels: TargetLabels) -> Dict:
        return {
            "instances": instance_targets(
                labels.instance_masks,
                labels.instance_classes,
                labels.image_size,
                num_classes=labels.num_classes,
                source=labels.source("image"),
            )
        }


@TARGET_GENERATOR_REGISTRY.register()
def semantic_masks(cfg) -> SemanticMaskTargets:
    """One mask per class present in the semantic map (semantic mask classification)."""
    return SemanticMaskTargets(cfg)


@TARGET_GENERATOR_REGISTRY.register()
def panoptic_masks(cfg) -> PanopticMaskTargets:
    """One mask per non-crowd panoptic segment (panoptic mask classification)."""
    return PanopticMaskTargets(cfg)


@TARGET_GENERATOR_REGISTRY.register()
def instance_masks(cfg) -> InstanceMaskTargets:
    """One mask per non-crowd COCO annotation (instance mask classification)."""
    return InstanceMaskTargets(cfg)


__all__ = [
    "InstanceMaskTargets",
    "PanopticMaskTargets",
    "SemanticMaskTargets",
    "instance_targets",
    "make_instances",
    "panoptic_targets",
    "semantic_targets",
]
