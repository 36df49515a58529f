"""Set criterion of mask classification: Hungarian matching, then class and mask losses.

MaskFormer (Cheng et al., NeurIPS 2021) Eq. (1): for the matching sigma,
``L = sum_j [ -log p_sigma(j)(c_j) + 1{c_j != no-object} L_mask(m_sigma(j), m_j) ]``; the
no-object term is down-weighted by ``eos_coef`` (0.1). Mask2Former (Cheng et al., CVPR 2022)
Sec. 3.3 / 4: ``L_mask = 5 * BCE + 5 * dice`` on K = 12544 importance-sampled points, class
weight 2, and the same loss on the prediction of every decoder layer (deep supervision), each
layer matched on its own.

The criterion only reads the prediction dict, so any query-based decoder can use it.

Shape shorthand in this module:

    B: batch size
    Q: number of queries per image
    C: number of classes (logits have C + 1 entries, the last one is "no object")
    N_b: number of ground-truth segments of image b; M: number of matched pairs in the batch
    H, W: predicted mask size; H', W': target mask size
"""

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.utils.comm import get_world_size
from torch import nn

from ..matcher import HungarianMatcher
from .base import WeightedCriterion, expand_aux_weights
from .losses import point_sampled_mask_losses

__all__ = ["SetCriterion", "build_set_criterion", "mask_cls_weight_dict", "padded_target_size"]


def mask_cls_weight_dict(
    class_weight: float, mask_weight: float, dice_weight: float, num_aux_outputs: int = 0
) -> Dict[str, float]:
    """Loss weights keyed by loss name, including the ``_<i>`` keys of auxiliary outputs.

    Args:
        class_weight (float): weight of "loss_ce".
        mask_weight (float): weight of "loss_mask" (sigmoid BCE).
        dice_weight (float): weight of "loss_dice".
        num_aux_outputs (int): number of intermediate predictions supervised (deep supervision).

    Returns:
        dict[str, float]: {"loss_ce": ..., "loss_mask": ..., "loss_dice": ..., "loss_ce_0": ...}.
    """
    base = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
    return expand_aux_weights(base, num_aux_outputs)


def padded_target_size(masks: Sequence[torch.Tensor]) -> Tuple[int, int]:
    """Common padded size of a batch's target masks.

    Mask2Former's criterion stacks the target masks of a batch into one zero-padded tensor of the
    largest (H', W') (padding at the bottom and right) before point sampling; a smaller target is
    therefore sampled on the padded canvas, which shifts its normalised coordinates. We reproduce
    that: this returns the size every target is padded to.

    Args:
        masks (list[Tensor]): per image (N_b, H'_b, W'_b).

    Returns:
        tuple[int, int]: (max H', max W') over the images (images with N_b = 0 included).
    """
    return max(m.shape[-2] for m in masks), max(m.shape[-1] for m in masks)


def _all_reduce_mean_num_masks(num_masks: int, device: torch.device) -> float:
    """Number of target masks averaged over distributed workers, at least 1.

    In a single process no tensor is made (no device round trip, no host sync); the value is
    rounded to float32 as the distributed path does.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return max(float(np.float32(num_masks)), 1.0)
    n = torch.as_tensor([num_masks], dtype=torch.float, device=device)
    torch.distributed.all_reduce(n)
    return torch.clamp(n / get_world_size(), min=1).item()


class SetCriterion(WeightedCriterion):
    """Hungarian-matched classification + mask losses, with optional deep supervision.

    ``forward`` returns the *unweighted* losses (as Mask2Former's criterion does);
    :meth:`apply_weights` (from :class:`WeightedCriterion`) multiplies them by ``weight_dict`` and
    drops the ones it lacks.
    """

    @configurable
    def __init__(
        self,
        *,
        num_classes: int,
        matcher: nn.Module,
        weight_dict: Dict[str, float],
        eos_coef: float,
        losses: Sequence[str] = ("labels", "masks"),
        num_points: int,
        oversample_ratio: float,
        importance_sample_ratio: float,
        deep_supervision: bool = True,
        point_coords_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ):
        """
        Args:
            num_classes (int): C, number of classes without "no object".
            matcher (nn.Module): callable ``(outputs, targets) -> [(pred_idx, tgt_idx)] * B``,
                e.g. :class:`seg_methods.modeling.matcher.HungarianMatcher`.
            weight_dict (dict[str, float]): loss name -> weight, used by :meth:`apply_weights`.
            eos_coef (float): cross-entropy weight of the no-object class (others weigh 1).
            losses (sequence[str]): subset of ("labels", "masks"), computed in this order.
            num_points (int): points per matched mask for the mask losses.
            oversample_ratio (float): PointRend oversampling ratio.
            importance_sample_ratio (float): fraction of importance-sampled points.
            deep_supervision (bool): whether to compute losses for ``outputs["aux_outputs"]``.
            point_coords_fn (callable, optional): (M, 1, H, W) logits -> (M, P, 2) coordinates,
                replacing importance sampling (tests pass fixed points).
        """
        super().__init__(weight_dict)
        unknown = set(losses) - {"labels", "masks"}
        if unknown:
            raise ValueError(f"unknown losses {sorted(unknown)}; expected 'labels' and/or 'masks'")
        self.num_classes = num_classes
        self.matcher = matcher
        self.eos_coef = eos_coef
        self.losses = list(losses)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.deep_supervision = deep_supervision
        self.point_coords_fn = point_coords_fn
        # Same buffer name as Mask2Former's criterion, so its checkpoints load without
        # unexpected keys ("criterion.empty_weight").
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    @classmethod
    def from_config(cls, cfg, num_classes: int, num_aux_outputs: int):
        m = cfg.MODEL.MASK_CLS
        num_aux = num_aux_outputs if m.DEEP_SUPERVISION else 0
        return {
            "num_classes": num_classes,
            "matcher": HungarianMatcher(cfg),
            "weight_dict": mask_cls_weight_dict(
                m.CLASS_WEIGHT, m.MASK_WEIGHT, m.DICE_WEIGHT, num_aux
            ),
            "eos_coef": m.NO_OBJECT_WEIGHT,
            "losses": ("labels", "masks"),
            "num_points": m.TRAIN_NUM_POINTS,
            "oversample_ratio": m.OVERSAMPLE_RATIO,
            "importance_sample_ratio": m.IMPORTANCE_SAMPLE_RATIO,
            "deep_supervision": m.DEEP_SUPERVISION,
        }

    # ------------------------------------------------------------------ losses
    def loss_labels(
        self, outputs: Dict, targets: List[Dict], indices: List[Tuple], num_masks: float
    ) -> Dict[str, torch.Tensor]:
        """Weighted cross-entropy over C + 1 classes; unmatched queries target "no object".

        Args:
            outputs (dict): needs "pred_logits" (B, Q, C + 1).
            targets (list[dict]): need "labels" (N_b,).
            indices (list[tuple]): matcher output.
            num_masks (float): unused (the CE is a weighted mean over all B * Q queries).

        Returns:
            dict: {"loss_ce": scalar}.
        """
        logits = outputs["pred_logits"].float()  # (B, Q, C + 1)
        batch_idx, src_idx = self._src_permutation_idx(indices)
        matched_labels = torch.cat(
            [t["labels"][tgt.to(t["labels"].device)] for t, (_, tgt) in zip(targets, indices)]
        ).to(device=logits.device, dtype=torch.int64)
        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device
        )  # (B, Q), no-object everywhere...
        target_classes[batch_idx, src_idx] = matched_labels  # ...except at matched queries
        # weighted mean: sum_i w[y_i] * nll_i / sum_i w[y_i]
        loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)
        return {"loss_ce": loss_ce}

    def loss_masks(
        self, outputs: Dict, targets: List[Dict], indices: List[Tuple], num_masks: float
    ) -> Dict[str, torch.Tensor]:
        """Point-sampled sigmoid BCE and dice of the matched (prediction, target) pairs.

        Targets are zero-padded (bottom/right) to the largest target size in the batch before
        sampling, as Mask2Former does (see :func:`padded_target_size`).

        Args:
            outputs (dict): needs "pred_masks" (B, Q, H, W) logits.
            targets (list[dict]): need "masks" (N_b, H'_b, W'_b).
            indices (list[tuple]): matcher output.
            num_masks (float): normaliser.

        Returns:
            dict: {"loss_mask": scalar, "loss_dice": scalar}.
        """
        pred_masks = outputs["pred_masks"]
        batch_idx, src_idx = self._src_permutation_idx(indices)
        src_masks = pred_masks[batch_idx, src_idx]  # (M, H, W)

        pad_h, pad_w = padded_target_size([t["masks"] for t in targets])
        matched = []
        for t, (_, tgt) in zip(targets, indices):
            masks = t["masks"][tgt.to(t["masks"].device)].to(src_masks)  # (n_b, H'_b, W'_b)
            # zero padding at the bottom and right up to (pad_h, pad_w)
            masks = F.pad(masks, (0, pad_w - masks.shape[-1], 0, pad_h - masks.shape[-2]))
            matched.append(masks)
        target_masks = torch.cat(matched)  # (M, pad_h, pad_w)

        loss_mask, loss_dice = point_sampled_mask_losses(
            src_masks,
            target_masks,
            num_masks,
            num_points=self.num_points,
            oversample_ratio=self.oversample_ratio,
            importance_sample_ratio=self.importance_sample_ratio,
            point_coords_fn=self.point_coords_fn,
        )
        return {"loss_mask": loss_mask, "loss_dice": loss_dice}

    @staticmethod
    def _src_permutation_idx(indices) -> Tuple[torch.Tensor, torch.Tensor]:
        """(batch index, query index) of every matched prediction, images in order."""
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        return batch_idx, src_idx

    def get_loss(self, loss: str, outputs, targets, indices, num_masks) -> Dict[str, torch.Tensor]:
        fn = {"labels": self.loss_labels, "masks": self.loss_masks}[loss]
        return fn(outputs, targets, indices, num_masks)

    # ------------------------------------------------------------------ forward
    def forward(
        self, outputs: Dict, targets: List[Dict[str, torch.Tensor]]
    ) -> Dict[str, torch.Tensor]:
        """Match and compute the losses of the final prediction and of every auxiliary one.

        Args:
            outputs (dict): "pred_logits": (B, Q, C + 1); "pred_masks": (B, Q, H, W) logits;
                optional "aux_outputs": list of dicts with the same two keys (one per
                intermediate decoder layer).
            targets (list[dict]): B dicts with "labels": (N_b,) int64 in [0, C) and
                "masks": (N_b, H'_b, W'_b) (bool, uint8 or float).

        Returns:
            dict[str, Tensor]: unweighted scalar losses "loss_ce", "loss_mask", "loss_dice" and,
            for auxiliary output i, "loss_ce_<i>", "loss_mask_<i>", "loss_dice_<i>".
        """
        num_masks = _all_reduce_mean_num_masks(
            sum(len(t["labels"]) for t in targets), outputs["pred_logits"].device
        )
        return self.deep_supervision_losses(
            self.matched_losses,
            outputs,
            targets,
            num_masks,
            deep_supervision=self.deep_supervision,
        )

    def matched_losses(
        self, outputs: Dict, targets: List[Dict[str, torch.Tensor]], num_masks: float
    ) -> Dict[str, torch.Tensor]:
        """Match one prediction on its own, then compute its losses (unweighted, no suffix).

        Args:
            outputs (dict): one prediction: "pred_logits" (B, Q, C + 1), "pred_masks" (B, Q, H, W).
            targets (list[dict]): see :meth:`forward`.
            num_masks (float): normaliser of the mask losses.

        Returns:
            dict[str, Tensor]: "loss_ce", "loss_mask", "loss_dice" (those of ``self.losses``).
        """
        indices = self.matcher(outputs, targets)  # every decoder layer is matched on its own
        losses = {}
        for loss in self.losses:
            losses.update(self.get_loss(loss, outputs, targets, indices, num_masks))
        return losses

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, eos_coef={self.eos_coef}, losses={self.losses}, "
            f"num_points={self.num_points}, oversample_ratio={self.oversample_ratio}, "
            f"importance_sample_ratio={self.importance_sample_ratio}, "
            f"deep_supervision={self.deep_supervision}, weight_dict={self.weight_dict}"
        )


def build_set_criterion(cfg, num_classes: int, num_aux_outputs: int) -> SetCriterion:
    """Build the criterion from ``cfg.MODEL.MASK_CLS.*``.

    Args:
        cfg (CfgNode): config with the shared keys (``add_common_config``).
        num_classes (int): C, without "no object".
        num_aux_outputs (int): number of entries the decoder puts in ``outputs["aux_outputs"]``
            (Mask2Former: 9 = the learnable-query prediction plus 8 of its 9 layers); their
            losses get weights only when ``MASK_CLS.DEEP_SUPERVISION`` is on.

    Returns:
        SetCriterion
    """
    return SetCriterion(cfg, num_classes, num_aux_outputs)
