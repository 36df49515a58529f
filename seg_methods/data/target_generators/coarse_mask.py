"""Coarse masks for mask refinement (CRM; CascadePSP lineage).

Registered as ``coarse_mask``: picks one segment of the image at random and writes

* ``"gt_mask"`` (H, W) bool: its ground-truth mask;
* ``"coarse_mask"`` (H, W) float32: a degraded copy that the refinement model learns to repair.

The segment comes from the ``panoptic`` labels when the record has them (non-crowd segments,
things and stuff), else from the COCO ``annotations``, else from the ``sem_seg`` map (one mask per
class present, void excluded). Segments empty after augmentation are not drawn; an image without
segments gives two all-zero maps.

Perturbation (CascadePSP-style, on the unpadded part of the image; padding stays 0):

1. morphology: with probability ``dilate_prob`` dilate, else erode, the mask with an elliptic
   kernel (OpenCV ``MORPH_ELLIPSE``) of radius r drawn uniformly from ``radius_range``
   (integers, pixels; r = 0 leaves it unchanged);
2. resolution: shrink by an integer factor s drawn uniformly from ``downsample_range`` (area
   averaging, each side at least 1 pixel), enlarge back bilinearly;
3. ``threshold``: pixels >= threshold become 1, others 0 (None keeps the soft values in [0, 1]).

Every draw (segment, operation, r, s) uses the image's random generator
(``TargetLabels.random()``), so a mapper seeded by ``cfg.SEED`` repeats the same coarse masks.
CascadePSP also moves polygon vertices of the boundary; that step is not done here.

Shape shorthand:
    H, W: padded image size; h, w: image size before padding.
"""

from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch
from detectron2.config import configurable

from ..build import TARGET_GENERATOR_REGISTRY
from .base import TargetGenerator, TargetLabels


def perturb_mask(
    mask: np.ndarray,
    rng: np.random.Generator,
    *,
    radius_range: Tuple[int, int] = (1, 6),
    dilate_prob: float = 0.5,
    downsample_range: Tuple[int, int] = (2, 8),
    threshold: Optional[float] = 0.5,
) -> np.ndarray:
    """Degrade a binary mask (see the module docstring for the steps).

    Args:
        mask (np.ndarray): (h, w) bool or {0, 1} mask.
        rng (np.random.Generator): source of every random draw.
        radius_range (tuple[int, int]): inclusive range of the morphology radius (pixels).
        dilate_prob (float): probability of dilating (else eroding).
        downsample_range (tuple[int, int]): inclusive range of the integer shrink factor.
        threshold (float or None): binarisation threshold; None keeps soft values.

    Returns:
        np.ndarray: (h, w) float32 coarse mask in [0, 1].
    """
    r_lo, r_hi = int(radius_range[0]), int(radius_range[1])
    s_lo, s_hi = int(downsample_range[0]), int(downsample_range[1])
    if not (0 <= r_lo <= r_hi and 1 <= s_lo <= s_hi and 0.0 <= dilate_prob <= 1.0):
        raise ValueError(
            f"coarse-mask parameters need 0 <= radius_range[0] <= radius_range[1] (got "
            f"{radius_range}), 1 <= downsample_range[0] <= downsample_range[1] (got "
            f"{downsample_range}) and dilate_prob in [0, 1] (got {dilate_prob})."
        )
    h, w = mask.shape
    out = mask.astype(np.uint8)
    dilate = rng.random() < dilate_prob
    radius = int(rng.integers(r_lo, r_hi + 1))
    if radius > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        out = cv2.dilate(out, kernel) if dilate else cv2.erode(out, kernel)
    out = out.astype(np.float32)
    factor = int(rng.integers(s_lo, s_hi + 1))
    if factor > 1:
        small = (max(1, round(w / factor)), max(1, round(h / factor)))  # cv2 sizes are (w, h)
        out = cv2.resize(out, small, interpolation=cv2.INTER_AREA)
        out = cv2.resize(out, (w, h), interpolation=cv2.INTER_LINEAR)
        out = out.reshape(h, w)  # cv2 drops a 1-pixel axis
    if threshold is not None:
        out = (out >= threshold).astype(np.float32)
    return np.clip(out, 0.0, 1.0)


def _candidate_masks(labels: TargetLabels) -> List[torch.Tensor]:
    if labels.has("panoptic"):
        segs = [s for s in labels.segments_info if not s.get("iscrowd", 0)]
        masks = [labels.pan_ids == int(s["id"]) for s in segs]
    elif labels.has("annotations"):
        masks = [m.to(torch.bool) for m in labels.instance_masks]
    elif labels.has("sem_seg"):
        classes = [c for c in torch.unique(labels.sem_seg).tolist() if c != labels.ignore_label]
        masks = [labels.sem_seg == c for c in classes]
    else:
        raise KeyError(
            "the 'coarse_mask' target generator needs panoptic labels, COCO 'annotations' or a "
            f"semantic map; the record of '{labels.source('image')}' has none."
        )
    return [m for m in masks if m.any()]


class CoarseMaskTargets(TargetGenerator):
    """``{"gt_mask", "coarse_mask"}`` (see the module docstring)."""

    uses = ("panoptic", "annotations", "sem_seg")

    @configurable
    def __init__(
        self,
        *,
        radius_range: Tuple[int, int] = (1, 6),
        dilate_prob: float = 0.5,
        downsample_range: Tuple[int, int] = (2, 8),
        threshold: Optional[float] = 0.5,
    ):
        """
        Args:
            radius_range, dilate_prob, downsample_range, threshold: see :func:`perturb_mask`.
        """
        self.params = dict(
            radius_range=tuple(radius_range),
            dilate_prob=float(dilate_prob),
            downsample_range=tuple(downsample_range),
            threshold=threshold,
        )
        # fail at build time, not at the first image
        perturb_mask(np.zeros((1, 1), bool), np.random.default_rng(0), **self.params)

    @classmethod
    def from_config(cls, cfg):
        # CRM's own config node (issue 10) will set these; the defaults are documented above.
        return {}

    def __call__(self, labels: TargetLabels) -> Dict:
        H, W = labels.image_size
        h, w = labels.valid_size
        gt = torch.zeros((H, W), dtype=torch.bool)
        coarse = torch.zeros((H, W), dtype=torch.float32)
        masks = _candidate_masks(labels)
        if masks:
            rng = labels.random()
            gt = masks[int(rng.integers(len(masks)))].clone()
            gt[h:], gt[:, w:] = False, False
            coarse[:h, :w] = torch.from_numpy(perturb_mask(gt[:h, :w].numpy(), rng, **self.params))
        return {"gt_mask": gt, "coarse_mask": coarse}


@TARGET_GENERATOR_REGISTRY.register()
def coarse_mask(cfg) -> CoarseMaskTargets:
    """One random segment's mask and a perturbed, resampled copy of it (CRM)."""
    return CoarseMaskTargets(cfg)


__all__ = ["CoarseMaskTargets", "perturb_mask"]
