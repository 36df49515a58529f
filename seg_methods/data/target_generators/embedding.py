"""Instance-embedding targets for proposal-free panoptic segmentation (Hierarchical Lovász
Embeddings, and any method that groups pixels by an instance id map).

Registered as ``instance_embedding``: requires the ``panoptic`` and ``sem_seg`` label kinds and
writes

* ``"instance_ids"`` (H, W) int64: ``k`` in 1..K on the pixels of the k-th thing instance
  (non-crowd thing segments in ``segments_info`` order, those cropped away skipped), **0 on stuff**
  pixels, **-1 on void** (unlabelled pixels, crowd segments, padding);
* ``"instance_centers"`` (K, 2) float32: the mean (y, x) = (row, column) pixel position of each
  instance in the padded image, row k - 1 for id k;
* ``"instance_classes"`` (K,) int64: contiguous class id of each instance;
* ``"sem_seg"`` (H, W) int64: the semantic map (void and padding = ignore label), as the
  ``sem_seg`` generator writes it (both may be listed; the mapper checks that they agree).

Things are told from stuff by each segment's ``isthing`` flag, or by the metadata
``thing_dataset_id_to_contiguous_id`` when the flag is absent.

Shape shorthand:
    H, W: padded image size; K: number of thing instances kept.
"""

from typing import Dict, List, Optional, Sequence

import torch
from detectron2.config import configurable

from ..build import TARGET_GENERATOR_REGISTRY
from .base import (
    TargetGenerator,
    TargetLabels,
    segment_is_thing,
    thing_contiguous_ids,
    train_metadata,
)

STUFF_ID = 0
VOID_ID = -1


def instance_embedding_targets(
    pan_ids: torch.Tensor,
    segments_info: List[Dict],
    *,
    thing_ids: Optional[Sequence[int]] = None,
    source: str = "",
) -> Dict[str, torch.Tensor]:
    """Instance id map, centres and classes of a panoptic id map (see the module docstring).

    Args:
        pan_ids (Tensor): (H, W) int64 panoptic segment ids (padding -1; ids not listed in
            ``segments_info`` are void).
        segments_info (list[dict]): segments with "id", contiguous "category_id", optional
            "iscrowd" and "isthing".
        thing_ids (Sequence[int] or None): contiguous ids of the thing classes, used for
            segments without "isthing".
        source (str): file name for error messages.

    Returns:
        dict: "instance_ids" (H, W) int64, "instance_centers" (K, 2) float32,
        "instance_classes" (K,) int64.
    """
    ids = torch.full(pan_ids.shape, VOID_ID, dtype=torch.int64)  # (H, W)
    centers: List[torch.Tensor] = []
    classes: List[int] = []
    for seg in segments_info:
        mask = pan_ids == int(seg["id"])  # (H, W)
        if seg.get("iscrowd", 0) or not mask.any():
            continue  # crowd stays void; segments cropped away get no id
        if not segment_is_thing(seg, thing_ids, source):
            ids[mask] = STUFF_ID
            continue
        ids[mask] = len(classes) + 1
        yx = mask.nonzero().to(torch.float32)  # (P, 2) rows, columns
        centers.append(yx.mean(dim=0))
        classes.append(int(seg["category_id"]))
    return {
        "instance_ids": ids,
        "instance_centers": (
            torch.stack(centers) if centers else torch.zeros((0, 2), dtype=torch.float32)
        ),
        "instance_classes": torch.as_tensor(classes, dtype=torch.int64),
    }


class InstanceEmbeddingTargets(TargetGenerator):
    """Instance ids, centres, classes and the semantic map (see the module docstring)."""

    requires = ("panoptic", "sem_seg")

    @configurable
    def __init__(self, *, thing_ids: Optional[Sequence[int]] = None):
        """
        Args:
            thing_ids (Sequence[int] or None): contiguous ids of the thing classes, for
                segments without an "isthing" flag.
        """
        self.thing_ids = sorted(int(i) for i in thing_ids) if thing_ids is not None else None

    @classmethod
    def from_config(cls, cfg):
        return {"thing_ids": thing_contiguous_ids(train_metadata(cfg))}

    def __call__(self, labels: TargetLabels) -> Dict:
        out = instance_embedding_targets(
            labels.pan_ids,
            labels.segments_info,
            thing_ids=self.thing_ids,
            source=labels.source("panoptic"),
        )
        out["sem_seg"] = labels.sem_seg
        return out


@TARGET_GENERATOR_REGISTRY.register()
def instance_embedding(cfg) -> InstanceEmbeddingTargets:
    """Per-pixel instance ids (0 stuff, -1 void), instance centres and classes, semantic map."""
    return InstanceEmbeddingTargets(cfg)


__all__ = ["InstanceEmbeddingTargets", "instance_embedding_targets", "STUFF_ID", "VOID_ID"]
