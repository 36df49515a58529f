"""Box matching costs and losses of DETR-style set prediction (used by Panoptic SegFormer).

Panoptic SegFormer (Li et al., CVPR 2022) trains its location decoder as Deformable DETR does:
every matched (query, thing) pair is supervised by a sigmoid focal class loss, an L1 loss on the
normalised (cx, cy, w, h) box and a generalised-IoU loss (Sec. 3.5, Eq. (5) ``L_det``: weights
2 / 5 / 2), and the Hungarian assignment minimises the same three terms as costs. The mask
decoder's masks (ReLU outputs, not logits) are supervised by the V-Net dice loss (Sec. 3.5,
``L_mask``, weight 2). Everything here is a pure function; the Hungarian solver itself is the
shared :class:`seg_methods.modeling.matcher.HungarianMatcher` (through its class-cost and
extra-cost hooks).

The box geometry comes from detectron2 (``pairwise_iou``, ``pairwise_intersection``) and fvcore
(``giou_loss``, ``sigmoid_focal_loss``).

Shape shorthand:
    Q: predictions, N: targets, K: thing classes, M: matched pairs, H, W: mask size
"""

import torch
from detectron2.structures import Boxes, pairwise_iou
from detectron2.structures.boxes import pairwise_intersection
from fvcore.nn import giou_loss, sigmoid_focal_loss

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "pairwise_l1_cost",
    "pairwise_giou",
    "focal_class_cost",
    "focal_class_loss",
    "box_l1_loss",
    "box_giou_loss",
    "vnet_dice_loss",
    "pairwise_vnet_dice_cost",
]


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) (cx, cy, w, h) -> (..., 4) (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), -1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) (x0, y0, x1, y1) -> (..., 4) (cx, cy, w, h)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), -1)


def pairwise_l1_cost(pred_cxcywh: torch.Tensor, target_cxcywh: torch.Tensor) -> torch.Tensor:
    """L1 distance of every prediction to every target box (DETR's box cost).

    Args:
        pred_cxcywh (Tensor): (Q, 4) normalised boxes.
        target_cxcywh (Tensor): (N, 4) normalised boxes.

    Returns:
        Tensor: (Q, N) sum over the 4 coordinates of |pred - target|.
    """
    return torch.cdist(pred_cxcywh.float(), target_cxcywh.float(), p=1)


def pairwise_giou(boxes1_xyxy: torch.Tensor, boxes2_xyxy: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of every pair, ``IoU - (|C| - |U|) / |C|`` with C the enclosing box.

    Args:
        boxes1_xyxy (Tensor): (Q, 4).
        boxes2_xyxy (Tensor): (N, 4).

    Returns:
        Tensor: (Q, N) in [-1, 1].
    """
    b1, b2 = Boxes(boxes1_xyxy.float()), Boxes(boxes2_xyxy.float())
    iou = pairwise_iou(b1, b2)  # (Q, N)
    inter = pairwise_intersection(b1, b2)  # (Q, N)
    union = b1.area()[:, None] + b2.area()[None, :] - inter
    lt = torch.min(b1.tensor[:, None, :2], b2.tensor[None, :, :2])
    rb = torch.max(b1.tensor[:, None, 2:], b2.tensor[None, :, 2:])
    enclosing = (rb - lt).clamp(min=0).prod(-1)  # (Q, N)
    return iou - (enclosing - union) / enclosing.clamp(min=1e-7)


def focal_class_cost(
    logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Focal-loss classification cost of Deformable DETR's matcher.

    ``cost[q, n] = alpha (1 - p)^gamma (-log p) - (1 - alpha) p^gamma (-log(1 - p))`` with
    ``p = sigmoid(logits[q, labels[n]])``: the focal loss of calling q positive for class
    ``labels[n]`` minus that of calling it negative.

    Args:
        logits (Tensor): (Q, K) sigmoid logits.
        labels (Tensor): (N,) int64 in [0, K).

    Returns:
        Tensor: (Q, N).
    """
    prob = logits.float().sigmoid()[:, labels]  # (Q, N)
    eps = 1e-8
    pos = alpha * (1 - prob).pow(gamma) * (-(prob + eps).log())
    neg = (1 - alpha) * prob.pow(gamma) * (-(1 - prob + eps).log())
    return pos - neg


def focal_class_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_pos: float,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Sigmoid focal loss summed over queries and classes, divided by ``num_pos``.

    Args:
        logits (Tensor): (Q, K) sigmoid logits.
        labels (Tensor): (Q,) int64 in [0, K]; K means background (all-zero one-hot target).
        num_pos (float): normaliser (matched targets, mmdet's ``avg_factor``).

    Returns:
        Tensor: scalar.
    """
    k = logits.shape[-1]
    onehot = torch.zeros(labels.shape[0], k + 1, dtype=logits.dtype, device=logits.device)
    onehot.scatter_(1, labels.view(-1, 1), 1.0)
    loss = sigmoid_focal_loss(logits, onehot[:, :k], alpha=alpha, gamma=gamma, reduction="sum")
    return loss / num_pos


def box_l1_loss(pred_cxcywh: torch.Tensor, target_cxcywh: torch.Tensor, num_pos: float):
    """L1 loss of matched normalised boxes (M, 4), summed, divided by ``num_pos``."""
    return (pred_cxcywh - target_cxcywh).abs().sum() / num_pos


def box_giou_loss(pred_xyxy: torch.Tensor, target_xyxy: torch.Tensor, num_pos: float):
    """``1 - GIoU`` of matched boxes (M, 4) (fvcore's ``giou_loss``), summed, / ``num_pos``."""
    if pred_xyxy.shape[0] == 0:
        return pred_xyxy.sum() * 0.0
    return giou_loss(pred_xyxy, target_xyxy, reduction="sum") / num_pos


def vnet_dice_loss(
    masks: torch.Tensor, targets: torch.Tensor, num_pos: float, eps: float = 1e-6
) -> torch.Tensor:
    """V-Net dice loss ``1 - 2 sum(m t) / (sum(m^2) + sum(t^2) + 2 eps)`` of paired masks.

    Panoptic SegFormer's masks are ReLU outputs used as they are (no sigmoid); the squared
    denominators are V-Net's (Milletari et al. 2016, Eq. 1). ``eps`` is added to both sums, as in
    the official loss (1e-6 there; the official matching cost uses 1e-3).

    Args:
        masks (Tensor): (M, H, W) non-negative mask predictions.
        targets (Tensor): (M, H, W) targets in [0, 1].
        num_pos (float): normaliser.

    Returns:
        Tensor: scalar, sum over the M pairs divided by ``num_pos``.
    """
    m = masks.flatten(1).float()
    t = targets.flatten(1).float()
    inter = (m * t).sum(-1)
    denom = (m * m).sum(-1) + eps + (t * t).sum(-1) + eps
    return (1 - 2 * inter / denom).sum() / num_pos


def pairwise_vnet_dice_cost(
    masks: torch.Tensor, targets: torch.Tensor, eps: float = 1e-3
) -> torch.Tensor:
    """V-Net dice loss of every (prediction, target) pair (the mask cost of the matching).

    Args:
        masks (Tensor): (Q, H, W) predictions.
        targets (Tensor): (N, H, W) targets, at the predictions' size.

    Returns:
        Tensor: (Q, N).
    """
    m = masks.flatten(1).float()
    t = targets.flatten(1).float()
    inter = m @ t.t()  # (Q, N)
    denom = (m * m).sum(-1)[:, None] + (t * t).sum(-1)[None, :] + 2 * eps
    return 1 - 2 * inter / denom
