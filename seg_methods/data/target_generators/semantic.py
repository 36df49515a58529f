"""Per-pixel semantic targets with void (``"sem_seg"``), for per-pixel heads and losses.

Registered as ``sem_seg``: requires the ``sem_seg`` label kind and writes ``"sem_seg"`` (H, W)
int64, the class id of every pixel, ``ignore_label`` on void pixels and on padding (so a
cross-entropy with ``ignore_index=ignore_label`` skips both). Panoptic records without a
semantic PNG get the map derived from the panoptic PNG (crowd segments keep their class).

Shape shorthand:
    H, W: padded image size.
"""

from typing import Dict, Optional

import torch
from detectron2.config import configurable

from ..build import TARGET_GENERATOR_REGISTRY
from .base import TargetGenerator, TargetLabels, check_class_range, train_metadata


def semantic_seg_target(
    sem_seg: torch.Tensor, *, ignore_label: int, num_classes: Optional[int] = None, source=""
) -> torch.Tensor:
    """Check a semantic label map and return it as the per-pixel target.

    Args:
        sem_seg (Tensor): (H, W) integer class ids, ``ignore_label`` on void and padding.
        ignore_label (int): the void label.
        num_classes (int or None): when given, labels other than ``ignore_label`` outside
            [0, num_classes) raise ``ValueError`` naming ``source``.
        source (str): file name for error messages.

    Returns:
        Tensor: (H, W) int64.
    """
    target = sem_seg.to(torch.int64)
    if num_classes is not None:
        labels = [int(c) for c in torch.unique(target).tolist() if int(c) != ignore_label]
        check_class_range(labels, num_classes, f"semantic label map '{source}'")
    return target


class SemanticSegTargets(TargetGenerator):
    """``{"sem_seg": (H, W) int64}`` (see the module docstring)."""

    requires = ("sem_seg",)

    @configurable
    def __init__(self, *, num_classes: Optional[int] = None):
        """
        Args:
            num_classes (int or None): number of semantic classes (``len(stuff_classes)`` of
                the training set, which lists every class); None skips the range check.
        """
        self.num_classes = num_classes

    @classmethod
    def from_config(cls, cfg):
        meta = train_metadata(cfg)
        names = meta.get("stuff_classes", None) if meta is not None else None
        return {"num_classes": len(names) if names else None}

    def __call__(self, labels: TargetLabels) -> Dict:
        return {
            "sem_seg": semantic_seg_target(
                labels.sem_seg,
                ignore_label=labels.ignore_label,
                num_classes=self.num_classes,
                source=labels.source("sem_seg"),
            )
        }


@TARGET_GENERATOR_REGISTRY.register()
def sem_seg(cfg) -> SemanticSegTargets:
    """Per-pixel class ids, void and padding = ignore label."""
    return SemanticSegTargets(cfg)


__all__ = ["SemanticSegTargets", "semantic_seg_target"]
