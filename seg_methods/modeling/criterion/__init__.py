"""Losses: the shared mask-classification set criterion and pure loss functions."""

from .losses import (  # noqa: F401
    dice_loss,
    mask_uncertainty,
    pairwise_dice_loss,
    pairwise_sigmoid_ce_loss,
    point_sample_pairs,
    point_sampled_mask_losses,
    sample_importance_points,
    sample_mask_points,
    sigmoid_ce_loss,
)
from .set_criterion import (  # noqa: F401
    SetCriterion,
    build_set_criterion,
    mask_cls_weight_dict,
    padded_target_size,
)
