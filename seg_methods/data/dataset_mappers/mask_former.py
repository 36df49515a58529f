"""Registered mappers: (target generators, augmentation policy) over :class:`SegDatasetMapper`.

Names are the values of ``cfg.INPUT.DATASET_MAPPER_NAME``:

=========================  ================================  ====================================
name                       target generators                 training augmentation
=========================  ================================  ====================================
``mask_former_semantic``   semantic_masks, sem_seg           shortest-edge resize, category-area
                                                             crop, [SSD], flip
``mask_former_panoptic``   panoptic_masks, sem_seg           same as semantic
``mask_former_instance``   instance_masks, sem_seg?          shortest-edge resize, random crop,
                                                             [SSD], flip
``coco_panoptic_lsj``      panoptic_masks, sem_seg           flip, ResizeScale(MIN..MAX_SCALE),
                                                             crop/pad IMAGE_SIZE
``coco_instance_lsj``      instance_masks, sem_seg?          same as coco_panoptic_lsj
=========================  ================================  ====================================

(``sem_seg?``: the semantic map is written when the record has one.) Every mapper also calls
the generators listed in ``cfg.INPUT.EXTRA_TARGETS`` (e.g. ``["class_hierarchy"]``). At test
time (``is_train=False``) all of them resize with MIN_SIZE_TEST and build no targets.
"""

from ..build import DATASET_MAPPER_REGISTRY
from .base import SegDatasetMapper

SEMANTIC = ("semantic_masks", "sem_seg")
PANOPTIC = ("panoptic_masks", "sem_seg")
INSTANCE = ("instance_masks", "sem_seg?")


@DATASET_MAPPER_REGISTRY.register()
def mask_former_semantic(cfg, is_train: bool = True) -> SegDatasetMapper:
    """Semantic targets (one mask per class present), Mask2Former augmentation."""
    return SegDatasetMapper(cfg, is_train, targets=SEMANTIC, policy="shortest_edge")


@DATASET_MAPPER_REGISTRY.register()
def mask_former_panoptic(cfg, is_train: bool = True) -> SegDatasetMapper:
    """Panoptic targets (one mask per non-crowd segment), Mask2Former augmentation."""
    return SegDatasetMapper(cfg, is_train, targets=PANOPTIC, policy="shortest_edge")


@DATASET_MAPPER_REGISTRY.register()
def mask_former_instance(cfg, is_train: bool = True) -> SegDatasetMapper:
    """Instance targets from COCO polygon/RLE annotations, Mask2Former augmentation."""
    return SegDatasetMapper(cfg, is_train, targets=INSTANCE, policy="shortest_edge")


@DATASET_MAPPER_REGISTRY.register()
def coco_panoptic_lsj(cfg, is_train: bool = True) -> SegDatasetMapper:
    """Panoptic targets with large-scale jitter to a fixed IMAGE_SIZE square."""
    return SegDatasetMapper(cfg, is_train, targets=PANOPTIC, policy="lsj")


@DATASET_MAPPER_REGISTRY.register()
def coco_instance_lsj(cfg, is_train: bool = True) -> SegDatasetMapper:
    """Instance targets with large-scale jitter to a fixed IMAGE_SIZE square."""
    return SegDatasetMapper(cfg, is_train, targets=INSTANCE, policy="lsj")
