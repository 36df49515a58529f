"""Dataset mappers. Importing this package registers them in DATASET_MAPPER_REGISTRY."""

from . import mask_former  # noqa: F401  registers the mask_former_* and coco_*_lsj mappers
from . import refinement  # noqa: F401  registers the "refinement" mapper (CRM)
from . import superpixel  # noqa: F401  registers the "superpixel" mapper
from . import panoptic_detection  # noqa: F401  registers "panoptic_detection" (issue 9)
from ..target_generators import instance_targets, panoptic_targets, semantic_targets  # noqa: F401
from .base import AUGMENTATION_POLICIES, SegDatasetMapper, read_image_checked  # noqa: F401
