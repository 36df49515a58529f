"""Inference post-processing as pure tensor functions."""

from .mask_classification import (  # noqa: F401
    instance_inference,
    mask_cls_inference_kwargs,
    mask_cls_postprocess,
    mask_wise_merge,
    output_sizes_from_inputs,
    panoptic_inference,
    per_pixel_merge,
    semantic_inference,
    thing_ids_from_metadata,
)
from .panoptic_segments import PanopticSegments  # noqa: F401
