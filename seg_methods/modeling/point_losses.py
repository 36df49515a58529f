"""Point sampling of masks and pairwise mask costs, as pure functions.

Mask2Former (Cheng et al., CVPR 2022) evaluates its mask terms on sampled points instead of the
full masks (Sec. 3.3, "Improving training efficiency"): uniformly random points shared by every
prediction and target for the matching cost (the pairwise forms below, all predictions against
all targets), and PointRend importance-sampled points for the loss of matched pairs.

This module sits below both the matcher and the criteria (it imports neither), so that
``matcher.py`` and ``criterion/`` can import it without importing each other.

Shape shorthand in this module:

    N: number of (prediction, target) pairs, or of predictions in the pairwise forms
    M: number of targets in the pairwise forms
    P: number of sampled points
    H, W: height and width of a mask

Every function takes mask *logits* for the predictions and {0, 1} (or soft, in [0, 1]) values for
the targets.
"""

from typing import Tuple

import torch
import torch.nn.functional as F
from detectron2.projects.point_rend.point_features import (
    get_uncertain_point_coords_with_randomness,
    point_sample,
)

__all__ = [
    "pairwise_sigmoid_ce_loss",
    "pairwise_dice_loss",
    "mask_uncertainty",
    "sample_importance_points",
    "sample_mask_points",
    "point_sample_pairs",
]


def pairwise_sigmoid_ce_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy between every prediction and every target (a matching cost).

    Uses ``BCE(x, t) = t * BCE(x, 1) + (1 - t) * BCE(x, 0)``, so the (N, M) matrix is two matrix
    products instead of N * M separate losses.

    Args:
        inputs (Tensor): (N, P) prediction logits.
        targets (Tensor): (M, P) targets in [0, 1].

    Returns:
        Tensor: (N, M) cost; entry (i, j) is the BCE of prediction i against target j averaged over
        the P points.
    """
    num_points = inputs.shape[1]
    # -log(sigmoid(x)) and -log(1 - sigmoid(x)), computed stably.
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    cost = torch.einsum("np,mp->nm", pos, targets) + torch.einsum(
        "np,mp->nm", neg, 1 - targets
    )  # (N, M)
    return cost / num_points


def pairwise_dice_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice loss (same smoothing as
    :func:`seg_methods.modeling.criterion.losses.dice_loss`) between every prediction and target.

    Args:
        inputs (Tensor): (N, P) prediction logits.
        targets (Tensor): (M, P) targets in [0, 1].

    Returns:
        Tensor: (N, M) cost ``1 - (2 p_i . t_j + 1) / (|p_i| + |t_j| + 1)``.
    """
    probs = inputs.sigmoid().flatten(1)  # (N, P)
    numerator = 2 * torch.einsum("np,mp->nm", probs, targets)  # (N, M)
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]  # (N, M)
    return 1 - (numerator + 1) / (denominator + 1)


def mask_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """PointRend's class-agnostic uncertainty: ``-|logit|`` (highest where the logit is near 0).

    Args:
        logits (Tensor): (N, 1, P) point logits.

    Returns:
        Tensor: (N, 1, P) uncertainty.
    """
    if logits.shape[1] != 1:
        raise ValueError(f"expected class-agnostic logits (N, 1, ...), got {tuple(logits.shape)}")
    return -torch.abs(logits)


def sample_importance_points(
    mask_logits: torch.Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
) -> torch.Tensor:
    """PointRend importance sampling of training points (Mask2Former Sec. 3.3).

    Draws ``num_points * oversample_ratio`` uniform candidates per mask, keeps the
    ``importance_sample_ratio * num_points`` most uncertain ones (:func:`mask_uncertainty` of the
    bilinearly sampled logit) and fills up with fresh uniform points. Delegates to detectron2's
    ``get_uncertain_point_coords_with_randomness``.

    Args:
        mask_logits (Tensor): (N, 1, H, W) mask logits.
        num_points (int): P.
        oversample_ratio (float): >= 1.
        importance_sample_ratio (float): in [0, 1].

    Returns:
        Tensor: (N, P, 2) point coordinates in [0, 1] x [0, 1], (x, y) order.
    """
    return get_uncertain_point_coords_with_randomness(
        mask_logits, mask_uncertainty, num_points, oversample_ratio, importance_sample_ratio
    )


def sample_mask_points(masks: torch.Tensor, point_coords: torch.Tensor) -> torch.Tensor:
    """Bilinear values (align_corners=False, zeros outside) of masks at normalised points.

    Args:
        masks (Tensor): (N, H, W) single-channel maps (logits or targets).
        point_coords (Tensor): (N, P, 2) coordinates in [0, 1] x [0, 1], (x, y) order.

    Returns:
        Tensor: (N, P) sampled values.
    """
    return point_sample(masks[:, None], point_coords, align_corners=False).squeeze(1)


def point_sample_pairs(
    pred_masks: torch.Tensor, target_masks: torch.Tensor, point_coords: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bilinearly sample (align_corners=False) paired prediction and target masks at points.

    The target values are sampled without gradient; predictions and targets may have different
    resolutions since coordinates are normalised.

    Args:
        pred_masks (Tensor): (N, H, W) prediction logits.
        target_masks (Tensor): (N, H', W') targets (converted to the predictions' dtype).
        point_coords (Tensor): (N, P, 2) coordinates in [0, 1] x [0, 1].

    Returns:
        Tuple[Tensor, Tensor]: (N, P) point logits and (N, P) point targets.
    """
    with torch.no_grad():
        point_labels = sample_mask_points(target_masks.to(pred_masks), point_coords)
    point_logits = sample_mask_points(pred_masks, point_coords)
    return point_logits, point_labels
