"""Panoptic SegFormer's inference: mask-wise merging by score x mask confidence (Sec. 3.6).

For every candidate (the top-k (thing query, class) pairs and every stuff query):

* binary mask ``b = m > 0.5`` of its ReLU mask m;
* mask confidence ``conf = sum(m * b) / (sum(b) + 1)`` and final score ``s = cls * conf^2``
  (the official code squares the confidence);
* candidates in decreasing s; one is skipped when s is below its threshold (0.25 for things and
  stuff), when b is empty, or when more than its overlap threshold (0.4 things, 0.2 stuff) of b is
  already painted; otherwise its not-yet-painted pixels are painted.

The painting and ``segments_info`` are the shared :class:`PanopticSegments` (no area test of its
own: the overlap filter above is the official one). Without any thing candidate above threshold
the output holds the stuff segments only.

Shape shorthand:
    N: candidates, H, W: output size
"""

from typing import Dict, Iterable, List, Tuple

import torch

from .panoptic_segments import PanopticSegments

__all__ = ["mask_confidence", "score_overlap_merge"]


def mask_confidence(masks: torch.Tensor, mask_threshold: float = 0.5) -> torch.Tensor:
    """``sum(m * (m > t)) / (#(m > t) + 1)`` per mask.

    Args:
        masks (Tensor): (N, H, W) non-negative masks.
        mask_threshold (float): t.

    Returns:
        Tensor: (N,).
    """
    binary = (masks > mask_threshold).to(masks.dtype)
    return (masks * binary).flatten(1).sum(-1) / (binary.flatten(1).sum(-1) + 1)


def score_overlap_merge(
    masks: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    is_thing: torch.Tensor,
    *,
    thing_ids: Iterable[int],
    mask_threshold: float = 0.5,
    thing_score_threshold: float = 0.25,
    stuff_score_threshold: float = 0.25,
    thing_overlap_threshold: float = 0.4,
    stuff_overlap_threshold: float = 0.2,
) -> Tuple[torch.Tensor, List[Dict]]:
    """Official mask-wise merging (module docstring).

    Args:
        masks (Tensor): (N, H, W) candidate masks (ReLU outputs).
        scores (Tensor): (N,) final scores (class score x confidence^2).
        labels (Tensor): (N,) contiguous class ids.
        is_thing (Tensor): (N,) bool, which thresholds apply.
        thing_ids (iterable[int]): contiguous thing ids (for ``segments_info["isthing"]``).
        mask_threshold (float): binarisation threshold of the masks.
        thing_score_threshold, stuff_score_threshold (float): minimum scores.
        thing_overlap_threshold, stuff_overlap_threshold (float): a candidate is skipped when
            ``painted area of b / area of b`` exceeds it.

    Returns:
        tuple: (panoptic_seg (H, W) int32, 0 = void; segments_info list of {"id", "isthing",
        "category_id"}), detectron2's format.
    """
    segments = PanopticSegments(masks.shape[-2:], masks.device, thing_ids=thing_ids)
    order = torch.sort(scores, descending=True, stable=True).indices.tolist()
    painted = torch.zeros(masks.shape[-2:], dtype=torch.bool, device=masks.device)
    for i in order:
        thing = bool(is_thing[i])
        score_thr = thing_score_threshold if thing else stuff_score_threshold
        overlap_thr = thing_overlap_threshold if thing else stuff_overlap_threshold
        if float(scores[i]) < score_thr:
            continue
        binary = masks[i] > mask_threshold
        area = int(binary.sum())
        if area == 0:
            continue
        overlap = int((binary & painted).sum())
        if overlap / area > overlap_thr:
            continue
        visible = binary & ~painted
        if segments.add(visible, int(labels[i])):
            painted |= visible
    return segments.result()
