"""Superpixel ground truth (``"regions"``), for the superpixel task (ClustSeg Sec. 4.4).

Registered as ``regions``: requires the ``regions`` label kind (``regions_file_name``; for
BSDS500-style files with several annotators, the mapper draws one at random) and writes
``"regions"`` (H, W) int64, the ground-truth region id of every pixel, -1 on padding.

Shape shorthand:
    H, W: padded image size.
"""

from typing import Dict


from ..build import TARGET_GENERATOR_REGISTRY
from .base import TargetGenerator, TargetLabels


class RegionTargets(TargetGenerator):
    """``{"regions": (H, W) int64}`` (see the module docstring)."""

    requires = ("regions",)

    def __call__(self, labels: TargetLabels) -> Dict:
        return {"regions": labels.regions}


@TARGET_GENERATOR_REGISTRY.register()
def regions(cfg) -> RegionTargets:
    """Ground-truth region ids (superpixel segmentation)."""
    return RegionTargets(cfg)


__all__ = ["RegionTargets"]
