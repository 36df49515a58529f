"""Registered mappers: (target format, augmentation policy) pairs over :class:`SegDatasetMapper`.

Names are the values of ``cfg.INPUT.DATASET_MAPPER_NAME``:

=========================  =============  =======================================================
name                       targets from   training augmentation
=========================  =============  =======================================================
``mask_former_semantic``   semantic PNG   shortest-edge resize, category-area crop, [SSD], flip
``mask_former_panoptic``   panoptic PNG   same as semantic
``mask_former_instance``   COCO polygons  shortest-edge resize, random crop, [SSD], flip
``coco_panoptic_lsj``      panoptic PNG   flip, ResizeScale(MIN..MAX_SCALE), crop/pad IMAGE_SIZE
``coco_instance_lsj``      COCO polygons  same as coco_panoptic_lsj
=========================  =============  =======================================================

At test time (``is_train=False``) all of them resize with MIN_SIZE_TEST and build no targets.
"""

from ..build import DATASET_MAPPER_REGISTRY
from .base import SegDatasetMapper


@DATASET_MAPPER_REGISTRY.register()
def mask_former_semantic(cfg, is_train: bool = True) -> SegDatasetMapper:
    """Semantic targets (one mask per class present), Mask2Former augmentation."""
    return SegDatasetMapper(cfg, is_train, target="semantic", policy="shortest_edge")


@DATASET_MAPPER_REGISTRY.register()
def mask_former_panoptic(cfg, is_train: bool = True) -> SegDatasetMapper:
    """Panoptic targets (one mask per non-crowd segment), Mask2Former augmentation."""
    return SegDatasetMapper(cfg, is_train, target="panoptic", policy="shortest_edge")


@DATASET_MAPPER_REGISTRY.register()
def mask_former_instance(cfg, is_train: bool = True) -> SegDatasetMapper:
    """Instance targets from COCO polygon/RLE annotations, Mask2Former augmentation."""
    return SegDatasetMapper(cfg, is_train, target="instance", policy="shortest_edge")


@DATASET_MAPPER_REGISTRY.register()
def coco_panoptic_lsj(cfg, is_train: bool = True) -> SegDatasetMapper:
    """Panoptic targets with large-scale jitter to a fixed IMAGE_SIZE square."""
    return SegDatasetMapper(cfg, is_train, target="panoptic", policy="lsj")


@DATASET_MAPPER_REGISTRY.register()
def coco_instance_lsj(cfg, is_train: bool = True) -> SegDatasetMapper:
    """Instance targets with large-scale jitter to a fixed IMAGE_SIZE square."""
    return SegDatasetMapper(cfg, is_train, target="instance", policy="lsj")
