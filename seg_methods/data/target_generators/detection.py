"""Boxes + masks of the thing instances, for detection-based methods (detectron2 ROI heads).

Registered as ``detection``: uses the ``panoptic`` labels when the record has them (non-crowd
thing segments; stuff and crowd excluded), else the COCO ``annotations`` (non-crowd), and writes
``"instances"`` with

* ``gt_boxes`` (N, 4): ``Boxes``, XYXY, enclosing each (augmented) mask;
* ``gt_classes`` (N,) int64: the **thing rank** of the class (its index among the sorted thing
  contiguous ids of the metadata, 0..T-1), which is what detectron2's box/mask heads index with
  ``MODEL.ROI_HEADS.NUM_CLASSES = T``; when the metadata has no thing map the contiguous id is
  kept;
* ``gt_masks``: ``BitMasks`` (N, H, W), as ``mask_rcnn_loss`` crops them with
  ``crop_and_resize``.

Instances whose mask is empty after augmentation are dropped.

Shape shorthand:
    H, W: padded image size; N: number of thing instances kept; T: number of thing classes.
"""

from typing import Dict, List, Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.structures import BitMasks, Instances

from ..build import TARGET_GENERATOR_REGISTRY
from .base import (
    TargetGenerator,
    TargetLabels,
    segment_is_thing,
    thing_contiguous_ids,
    train_metadata,
)


def detection_targets(
    masks: List[torch.Tensor],
    classes: List[int],
    image_size,
    *,
    thing_ids: Optional[Sequence[int]] = None,
    source: str = "",
) -> Instances:
    """``Instances`` for detectron2's ROI heads from thing masks.

    Args:
        masks (list[Tensor]): N masks, each (H, W) bool.
        classes (list[int]): N contiguous class ids.
        image_size (tuple[int, int]): (H, W).
        thing_ids (Sequence[int] or None): sorted contiguous ids of the thing classes; class c
            becomes ``thing_ids.index(c)``. None keeps the ids.
        source (str): file name for error messages.

    Returns:
        Instances: gt_boxes (Boxes), gt_classes (N,) int64, gt_masks (BitMasks).
    """
    h, w = image_size
    if masks:
        gt_masks = torch.stack([m.to(torch.bool) for m in masks])  # (N, H, W)
    else:
        gt_masks = torch.zeros((0, h, w), dtype=torch.bool)
    keep = gt_masks.flatten(1).any(dim=1)
    gt_masks = gt_masks[keep]
    kept = [int(c) for c, k in zip(classes, keep.tolist()) if k]
    if thing_ids is not None:
        rank = {int(c): i for i, c in enumerate(thing_ids)}
        bad = sorted({c for c in kept if c not in rank})
        if bad:
            raise ValueError(
                f"{source}: classes {bad} are not thing classes (thing contiguous ids: "
                f"{list(thing_ids)}); a detection target needs thing instances only."
            )
        kept = [rank[c] for c in kept]
    instances = Instances((h, w))
    bitmasks = BitMasks(gt_masks)
    instances.gt_boxes = bitmasks.get_bounding_boxes()
    instances.gt_classes = torch.as_tensor(kept, dtype=torch.int64)
    instances.gt_masks = bitmasks
    return instances


class DetectionTargets(TargetGenerator):
    """``{"instances"}`` of thing boxes + masks (see the module docstring)."""

    uses = ("panoptic", "annotations")

    @configurable
    def __init__(self, *, thing_ids: Optional[Sequence[int]] = None):
        """
        Args:
            thing_ids (Sequence[int] or None): contiguous ids of the thing classes (values of
                the metadata's ``thing_dataset_id_to_contiguous_id``); they define the thing
                ranks and tell things from stuff for segments without "isthing".
        """
        self.thing_ids = sorted(int(i) for i in thing_ids) if thing_ids is not None else None

    @classmethod
    def from_config(cls, cfg):
        return {"thing_ids": thing_contiguous_ids(train_metadata(cfg))}

    def __call__(self, labels: TargetLabels) -> Dict:
        if labels.has("panoptic"):
            source = labels.source("panoptic")
            segments = [
                s
                for s in labels.segments_info
                if not s.get("iscrowd", 0) and segment_is_thing(s, self.thing_ids, source)
            ]
            masks = [labels.pan_ids == int(s["id"]) for s in segments]
            classes = [int(s["category_id"]) for s in segments]
        elif labels.has("annotations"):
            source = labels.source("image")
            masks, classes = labels.instance_masks, labels.instance_classes
        else:
            raise KeyError(
                f"the 'detection' target generator needs panoptic labels ('pan_seg_file_name' + "
                f"'segments_info') or COCO 'annotations'; the record of '{labels.source('image')}'"
                " has neither."
            )
        return {
            "instances": detection_targets(
                masks, classes, labels.image_size, thing_ids=self.thing_ids, source=source
            )
        }


@TARGET_GENERATOR_REGISTRY.register()
def detection(cfg) -> DetectionTargets:
    """Thing boxes + masks + thing-rank classes for detectron2's ROI heads."""
    return DetectionTargets(cfg)


__all__ = ["DetectionTargets", "detection_targets"]
