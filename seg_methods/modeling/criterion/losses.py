"""Binary mask losses of matched (prediction, target) pairs, as pure functions.

Mask2Former (Cheng et al., CVPR 2022) supervises each matched (query, ground-truth segment) pair
with ``L_mask = lambda_ce * L_ce + lambda_dice * L_dice`` (Sec. 4, "Loss weights"; MaskFormer
Eq. (1) for the per-pair mask term), both evaluated on importance-sampled points (PointRend)
instead of the full mask (Sec. 3.3, "Improving training efficiency").

The point sampling and the pairwise (all predictions x all targets) costs the matcher uses live in
:mod:`seg_methods.modeling.point_losses`, below both the matcher and the criteria; they are
re-exported here so that ``from seg_methods.modeling.criterion.losses import ...`` keeps working.

Shape shorthand (as in :mod:`seg_methods.modeling.point_losses`): N pairs, P sampled points,
H, W mask size. Predictions are mask logits; targets are {0, 1} (or soft) values.
"""

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from ..point_losses import __all__ as _POINT_FUNCTIONS
from ..point_losses import (  # noqa: F401  (re-exported)
    mask_uncertainty,
    pairwise_dice_loss,
    pairwise_sigmoid_ce_loss,
    point_sample_pairs,
    sample_importance_points,
    sample_mask_points,
)

__all__ = ["sigmoid_ce_loss", "dice_loss", "point_sampled_mask_losses", *_POINT_FUNCTIONS]


def sigmoid_ce_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Binary cross-entropy on logits, averaged over points, summed over masks, / ``num_masks``.

    Args:
        inputs (Tensor): (N, P) mask logits (any trailing shape is flattened to P).
        targets (Tensor): (N, P) targets in [0, 1], same shape as ``inputs``.
        num_masks (float): normaliser (number of target masks in the batch).

    Returns:
        Tensor: scalar loss.
    """
    inputs = inputs.flatten(1)
    targets = targets.flatten(1)
    per_point = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")  # (N, P)
    return per_point.mean(1).sum() / num_masks


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Dice loss ``1 - (2 |p t| + 1) / (|p| + |t| + 1)`` with ``p = sigmoid(inputs)``.

    The "+1" smoothing of numerator and denominator is the one Mask2Former uses (V-Net dice with
    Laplace smoothing); it makes the loss of an empty prediction on an empty target 0.

    Args:
        inputs (Tensor): (N, P) mask logits (any trailing shape is flattened to P).
        targets (Tensor): (N, P) targets in [0, 1].
        num_masks (float): normaliser.

    Returns:
        Tensor: scalar loss (sum over the N masks divided by ``num_masks``).
    """
    probs = inputs.sigmoid().flatten(1)  # (N, P)
    targets = targets.flatten(1)
    numerator = 2 * (probs * targets).sum(-1)  # (N,)
    denominator = probs.sum(-1) + targets.sum(-1)  # (N,)
    loss = 1 - (numerator + 1) / (denominator + 1)
    return loss.sum() / num_masks


def point_sampled_mask_losses(
    pred_masks: torch.Tensor,
    target_masks: torch.Tensor,
    num_masks: float,
    *,
    num_points: int,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    point_coords_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid BCE and dice losses of paired masks on importance-sampled points.

    Args:
        pred_masks (Tensor): (N, H, W) matched prediction logits.
        target_masks (Tensor): (N, H', W') matched targets.
        num_masks (float): normaliser of both losses.
        num_points (int): P, points per mask.
        oversample_ratio (float): PointRend oversampling (Mask2Former: 3).
        importance_sample_ratio (float): fraction of importance-sampled points (Mask2Former: 0.75).
        point_coords_fn (callable, optional): maps (N, 1, H, W) logits to (N, P, 2) coordinates,
            replacing importance sampling (tests use it to fix the points).

    Returns:
        Tuple[Tensor, Tensor]: scalar (BCE loss, dice loss).
    """
    with torch.no_grad():
        if point_coords_fn is None:
            point_coords = sample_importance_points(
                pred_masks[:, None], num_points, oversample_ratio, importance_sample_ratio
            )  # (N, P, 2)
        else:
            point_coords = point_coords_fn(pred_masks[:, None])
    point_logits, point_labels = point_sample_pairs(pred_masks, target_masks, point_coords)
    return (
        sigmoid_ce_loss(point_logits, point_labels, num_masks),
        dice_loss(point_logits, point_labels, num_masks),
    )
