"""Dataset mapper of superpixel segmentation (``cfg.INPUT.DATASET_MAPPER_NAME = "superpixel"``).

:class:`~seg_methods.data.dataset_mappers.base.SegDatasetMapper` with the ``regions`` target
generator and the ``superpixel`` augmentation policy (ClustSeg Sec. 4.4: resize the shortest edge
to one of ``MIN_SIZE_TRAIN``, random crop when ``INPUT.CROP.ENABLED``, horizontal and vertical
flips with probability 0.5 each unless ``INPUT.RANDOM_FLIP`` is "none"), padded to
``INPUT.SIZE_DIVISIBILITY``. The training output has "image" (3, H, W) uint8 and "regions" (H, W)
int64: the ground-truth segment ids (one annotator drawn at random for BSDS500), -1 on padding.

Test: the test-time resize only; the evaluator reads the ground truth at full resolution.
"""

from ..build import DATASET_MAPPER_REGISTRY
from .base import REGION_PAD_ID, SegDatasetMapper  # noqa: F401  REGION_PAD_ID re-exported


@DATASET_MAPPER_REGISTRY.register()
def superpixel(cfg, is_train: bool = True) -> SegDatasetMapper:
    """Image + ground-truth region ids (superpixel segmentation)."""
    return SegDatasetMapper(cfg, is_train, targets=("regions",), policy="superpixel")
