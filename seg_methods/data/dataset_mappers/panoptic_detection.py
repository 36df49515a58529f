"""Dataset mapper of detection-based panoptic models (``INPUT.DATASET_MAPPER_NAME =
"panoptic_detection"``), e.g. Unifying Training and Inference (``DenseAffinityPanoptic``).

:class:`~seg_methods.data.dataset_mappers.base.SegDatasetMapper` with the ``detection`` and
``sem_seg`` target generators and the ``shortest_edge`` augmentation policy (resize the shortest
edge, optional crop with the single-category area constraint, optional SSD colour jitter, flip).
The training output has "image" (3, H, W) uint8, "instances" (``gt_boxes``, ``gt_classes`` as
thing ranks, ``gt_masks`` as ``BitMasks``: what detectron2's RPN and ROI heads take) and
"sem_seg" (H, W) int64 with the void label on void and padding. Together they hold the panoptic
ground truth: thing segments from "instances", stuff from "sem_seg".

Test: the test-time resize only.
"""

from ..build import DATASET_MAPPER_REGISTRY
from .base import SegDatasetMapper


@DATASET_MAPPER_REGISTRY.register()
def panoptic_detection(cfg, is_train: bool = True) -> SegDatasetMapper:
    """Thing boxes + masks (thing ranks) and the semantic map, Mask2Former augmentation."""
    return SegDatasetMapper(cfg, is_train, targets=("detection", "sem_seg"), policy="shortest_edge")
