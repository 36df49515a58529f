"""Panoptic matching loss of "Unifying Training and Inference for Panoptic Segmentation" (Sec. 3.5).

The panoptic submodule is fed the *predicted* detections, so the channel of P that an object gets
is not known in advance. Ground-truth thing segments are matched to the detections by box IoU
(Eq. 5)::

    T* = argmax_{Z in pi(T)} IoU_t(box(Z), B)                                      (Eq. 5)

* the box IoU between a segment and a detection of different classes is 0;
* a pair counts only if its IoU is >= t (t = 0.5);
* the permutation maximising the total IoU is a maximum-weight bipartite matching, solved with
  the Hungarian algorithm (scipy's ``linear_sum_assignment``) on the IoUs below t set to 0;
* ground-truth segments left without a detection become "ignore" (no loss on their pixels);
* detections that overlap a matched segment by IoU >= t but lost it to a better detection
  ("detections matching to the same ground truth segment are all removed except the top match")
  are removed from the potential before the panoptic submodule runs;
* detections matching nothing (false positives) stay: no pixel targets them, so the
  cross-entropy pushes their channels down.

The stuff classes always have their own channel (one full-image box each, Sec. 3.3), so stuff
pixels target their class's channel. The loss is the cross-entropy on P over the non-ignored
pixels of the batch (P is used as the logits of a softmax over the channels).

Shape shorthand:
    G: ground-truth thing segments, D: detections (D' after removing duplicates), S: stuff
    classes, N = D' + S channels, H, W: target size, h, w: size of P
"""

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_iou

from .base import WeightedCriterion

__all__ = [
    "PanopticMatch",
    "PanopticMatchingCriterion",
    "match_segments_to_detections",
    "panoptic_matching_target",
]


@dataclass
class PanopticMatch:
    """Result of :func:`match_segments_to_detections`.

    Attributes:
        det_for_gt (Tensor): (G,) int64, the detection matched to each segment, -1 if none.
        keep (Tensor): (D,) bool, False for the duplicate detections to remove.
        iou (Tensor): (G, D) class-aware box IoU (0 across classes).
    """

    det_for_gt: torch.Tensor
    keep: torch.Tensor
    iou: torch.Tensor


def match_segments_to_detections(
    gt_boxes: torch.Tensor,
    gt_classes: torch.Tensor,
    det_boxes: torch.Tensor,
    det_classes: torch.Tensor,
    threshold: float = 0.5,
) -> PanopticMatch:
    """Eq. 5: match ground-truth segments to detections by class-aware box IoU >= ``threshold``.

    Args:
        gt_boxes (Tensor): (G, 4) XYXY tight boxes of the ground-truth thing segments.
        gt_classes (Tensor): (G,) classes (any id space shared with ``det_classes``).
        det_boxes (Tensor): (D, 4) XYXY predicted boxes.
        det_classes (Tensor): (D,) predicted classes.
        threshold (float): t of Eq. 5.

    Returns:
        PanopticMatch: matched detection per segment and the detections to keep.
    """
    g, d = gt_boxes.shape[0], det_boxes.shape[0]
    device = det_boxes.device
    det_for_gt = torch.full((g,), -1, dtype=torch.int64, device=device)
    keep = torch.ones(d, dtype=torch.bool, device=device)
    if g == 0 or d == 0:
        return PanopticMatch(det_for_gt, keep, det_boxes.new_zeros((g, d)))
    with torch.no_grad():
        iou = box_iou(gt_boxes.float(), det_boxes.float())  # (G, D)
        iou = iou * (gt_classes.view(-1, 1) == det_classes.view(1, -1))  # 0 across classes
        eligible = iou >= threshold
        weights = torch.where(eligible, iou, torch.zeros_like(iou))
    rows, cols = linear_sum_assignment(weights.cpu().numpy(), maximize=True)
    rows_t = torch.as_tensor(rows, dtype=torch.int64, device=device)
    cols_t = torch.as_tensor(cols, dtype=torch.int64, device=device)
    valid = eligible[rows_t, cols_t]
    det_for_gt[rows_t[valid]] = cols_t[valid]
    matched = torch.zeros(d, dtype=torch.bool, device=device)
    matched[cols_t[valid]] = True
    # A detection that is not matched but reaches t with some segment is a duplicate of that
    # segment's match (an unmatched eligible pair would have raised the total IoU).
    keep = matched | ~eligible.any(dim=0)
    return PanopticMatch(det_for_gt, keep, iou)


def panoptic_matching_target(
    gt_masks: torch.Tensor,
    det_for_gt: torch.Tensor,
    keep: torch.Tensor,
    sem_seg: torch.Tensor,
    stuff_ids: Sequence[int],
    ignore_value: int,
) -> torch.Tensor:
    """Per-pixel target channel of P for one image (channels: kept detections, then stuff).

    Args:
        gt_masks (Tensor): (G, H, W) bool masks of the ground-truth thing segments.
        det_for_gt (Tensor): (G,) matched detection of each segment (-1: none), indexing the
            detections *before* duplicates are removed.
        keep (Tensor): (D,) bool, the detections kept as channels.
        sem_seg (Tensor): (H, W) int64 semantic labels (``ignore_value`` for void).
        stuff_ids (sequence[int]): contiguous ids of the S stuff classes, in channel order.
        ignore_value (int): label written for ignored pixels.

    Returns:
        Tensor: (H, W) int64 in [0, D' + S) or ``ignore_value``: stuff pixels target channel
        D' + j of their class, pixels of a matched segment target its detection's channel, and
        everything else (void, unmatched segments, thing pixels outside every segment, e.g.
        crowd) is ignored.
    """
    target = torch.full_like(sem_seg, ignore_value)
    num_kept = int(keep.sum())
    for j, stuff in enumerate(stuff_ids):
        target[sem_seg == int(stuff)] = num_kept + j
    channel_of_det = torch.cumsum(keep.long(), 0) - 1  # (D,) channel of each kept detection
    for gi in range(gt_masks.shape[0]):
        det = int(det_for_gt[gi])
        if det < 0 or not bool(keep[det]):
            continue
        target[gt_masks[gi]] = channel_of_det[det]
    return target


class PanopticMatchingCriterion(WeightedCriterion):
    """Cross-entropy on the panoptic logits P against the matched targets (Sec. 3.5).

    ``forward(panoptic_logits, targets)`` returns ``{"loss_panoptic"}``, the mean over every
    non-ignored pixel of the batch (0, attached to the graph, when there is none).

    Args:
        weight (float): weight of "loss_panoptic" (1.0 on Cityscapes, 0.1 on COCO).
        ignore_value (int): ignored target label.
    """

    def __init__(self, *, weight: float = 1.0, ignore_value: int = 255):
        super().__init__({"loss_panoptic": weight})
        self.ignore_value = ignore_value

    def forward(
        self, panoptic_logits: List[torch.Tensor], targets: List[torch.Tensor]
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            panoptic_logits (list[Tensor]): per image (N_i, h, w) logits P (N_i may be 0);
                bilinearly upsampled to the target size when it differs.
            targets (list[Tensor]): per image (H, W) int64 channel targets
                (:func:`panoptic_matching_target`).

        Returns:
            dict[str, Tensor]: {"loss_panoptic": scalar} (unweighted).
        """
        if len(panoptic_logits) != len(targets):
            raise ValueError(
                f"{len(panoptic_logits)} panoptic logit maps but {len(targets)} targets"
            )
        total, count = None, 0
        anchor = None
        for logits, target in zip(panoptic_logits, targets):
            anchor = logits.sum() * 0.0 if anchor is None else anchor + logits.sum() * 0.0
            valid = target != self.ignore_value
            num_valid = int(valid.sum())
            if num_valid == 0 or logits.shape[0] == 0:
                continue
            if int(target[valid].max()) >= logits.shape[0]:
                raise ValueError(
                    f"panoptic target channel {int(target[valid].max())} is out of range for "
                    f"{logits.shape[0]} channels"
                )
            if tuple(logits.shape[-2:]) != tuple(target.shape):
                logits = F.interpolate(
                    logits[None], size=tuple(target.shape), mode="bilinear", align_corners=False
                )[0]
            loss = F.cross_entropy(
                logits[None], target[None], ignore_index=self.ignore_value, reduction="sum"
            )
            total = loss if total is None else total + loss
            count += num_valid
        if total is None:
            if anchor is None:
                raise ValueError("PanopticMatchingCriterion got an empty batch")
            return {"loss_panoptic": anchor}
        return {"loss_panoptic": total / count + anchor}
