"""Hungarian matching between predicted (class, mask) pairs and ground-truth segments.

MaskFormer (Cheng et al., NeurIPS 2021) Sec. 3.2 matches the Q predictions of an image to its N
ground-truth segments with the bipartite assignment that minimises
``-p_i(c_j) + L_mask(m_i, m_j)``; Mask2Former (Cheng et al., CVPR 2022) Sec. 3.3 computes the mask
part on K uniformly sampled points shared by every prediction and target of the image. The total
cost here is ``cost_class * (-p_i(c_j)) + cost_mask * BCE + cost_dice * dice``, with the loss
weights as cost weights (Mask2Former's setting: 2 / 5 / 5).

Shape shorthand in this module:

    B: batch size
    Q: number of queries (predictions) per image
    C: number of classes; logits have C + 1 entries, the last one being "no object"
    N: number of ground-truth segments of one image
    P: number of sampled points
    H, W: predicted mask size; H', W': target mask size
"""

from typing import Callable, Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from scipy.optimize import linear_sum_assignment
from torch import nn

from .point_losses import pairwise_dice_loss, pairwise_sigmoid_ce_loss, sample_mask_points

__all__ = [
    "HungarianMatcher",
    "pairwise_class_cost",
    "pairwise_mask_costs",
    "uniform_point_coords",
]


def pairwise_class_cost(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Classification matching cost ``-softmax(logits)[i, labels[j]]``.

    MaskFormer Sec. 3.2 uses ``-p_i(c_j)`` rather than the negative log-likelihood so that the
    class and mask terms have comparable ranges (the constant 1 of ``1 - p`` is dropped: it does
    not change the assignment).

    Args:
        logits (Tensor): (Q, C + 1) class logits.
        labels (Tensor): (N,) int64 target classes in [0, C).

    Returns:
        Tensor: (Q, N) cost.
    """
    return -logits.softmax(-1)[:, labels]


def uniform_point_coords(num_points: int, device: torch.device) -> torch.Tensor:
    """Default point generator of the matcher: P points uniform in [0, 1]^2 (one set per image).

    Args:
        num_points (int): P.
        device (torch.device): where to create them.

    Returns:
        Tensor: (1, P, 2) coordinates, (x, y) order.
    """
    return torch.rand(1, num_points, 2, device=device)


def pairwise_mask_costs(
    pred_masks: torch.Tensor, target_masks: torch.Tensor, point_coords: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pairwise sigmoid-BCE and dice costs of all predictions vs all targets on shared points.

    Both mask sets are sampled bilinearly (align_corners=False) at the same points; the costs are
    computed in float32.

    Args:
        pred_masks (Tensor): (Q, H, W) mask logits.
        target_masks (Tensor): (N, H', W') targets in [0, 1] (bool, uint8 or float).
        point_coords (Tensor): (1, P, 2) or (P, 2) coordinates in [0, 1]^2.

    Returns:
        Tuple[Tensor, Tensor]: (Q, N) BCE cost and (Q, N) dice cost.
    """
    coords = point_coords.reshape(1, -1, 2).float()  # (1, P, 2)
    pred_points = sample_mask_points(
        pred_masks.float(), coords.expand(pred_masks.shape[0], -1, -1)
    )  # (Q, P)
    tgt_points = sample_mask_points(
        target_masks.float(), coords.expand(target_masks.shape[0], -1, -1)
    )  # (N, P)
    return (
        pairwise_sigmoid_ce_loss(pred_points, tgt_points),
        pairwise_dice_loss(pred_points, tgt_points),
    )


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to ground-truth segments, solved per image.

    Predictions left unmatched are supervised as "no object" by the criterion. Targets are matched
    at their own resolution (no padding is needed: point coordinates are normalised).
    """

    @configurable
    def __init__(
        self,
        *,
        cost_class: float = 1.0,
        cost_mask: float = 1.0,
        cost_dice: float = 1.0,
        num_points: int = 112 * 112,
        point_coords_fn: Optional[Callable[[int, torch.device], torch.Tensor]] = None,
        class_cost_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
        extra_cost_fn: Optional[Callable[[Dict, int, Dict], torch.Tensor]] = None,
    ):
        """
        Args:
            cost_class (float): weight of the classification cost.
            cost_mask (float): weight of the pairwise sigmoid-BCE cost.
            cost_dice (float): weight of the pairwise dice cost.
            num_points (int): P, number of uniformly sampled points per image.
            point_coords_fn (callable, optional): ``(num_points, device) -> (1, P, 2)``
                coordinates in [0, 1]^2, called once per image; defaults to
                :func:`uniform_point_coords`. Tests pass fixed points through it.
            class_cost_fn (callable, optional): ``(logits (Q, K'), labels (N,)) -> (Q, N)``
                unweighted classification cost; defaults to :func:`pairwise_class_cost`
                (``-softmax``). HSSN's Mask2Former variant passes its tree-min score.
            extra_cost_fn (callable, optional): extra-cost hook, ``(outputs, b, target_b) ->
                (Q, N)`` weighted cost added to image b's cost (Panoptic SegFormer's box L1 +
                GIoU costs). With mask weights 0, ``outputs`` needs no "pred_masks".
        """
        super().__init__()
        self.extra_cost_fn = extra_cost_fn
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0 and extra_cost_fn is None:
            raise ValueError("at least one matching cost weight must be non-zero")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points
        self.point_coords_fn = point_coords_fn or uniform_point_coords
        self.class_cost_fn = class_cost_fn or pairwise_class_cost

    @classmethod
    def from_config(cls, cfg):
        m = cfg.MODEL.MASK_CLS
        return {
            "cost_class": m.CLASS_WEIGHT,
            "cost_mask": m.MASK_WEIGHT,
            "cost_dice": m.DICE_WEIGHT,
            "num_points": m.TRAIN_NUM_POINTS,
        }

    @torch.no_grad()
    def cost_matrix(
        self, logits: torch.Tensor, pred_masks: torch.Tensor, labels: torch.Tensor, target_masks
    ) -> torch.Tensor:
        """Weighted matching cost of one image (draws that image's points).

        Args:
            logits (Tensor): (Q, C + 1) class logits.
            pred_masks (Tensor or None): (Q, H, W) mask logits (None: no mask costs).
            labels (Tensor): (N,) target classes.
            target_masks (Tensor): (N, H', W') target masks.

        Returns:
            Tensor: (Q, N) float32 cost on the CPU.
        """
        # The points are drawn even when N = 0 so that the random stream does not depend on
        # which images are empty.
        point_coords = self.point_coords_fn(self.num_points, logits.device)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            cost_class = self.class_cost_fn(logits.float(), labels)  # (Q, N)
            if pred_masks is None:  # extra-cost hook users without mask costs
                cost = self.cost_class * cost_class
            else:
                cost_bce, cost_dice = pairwise_mask_costs(pred_masks, target_masks, point_coords)
                cost = (
                    self.cost_mask * cost_bce
                    + self.cost_class * cost_class
                    + self.cost_dice * cost_dice
                )  # (Q, N)
        return cost.reshape(logits.shape[0], -1).cpu()

    @torch.no_grad()
    def forward(
        self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Match the predictions of every image to its targets.

        Args:
            outputs (dict): "pred_logits": (B, Q, C + 1) class logits; "pred_masks": (B, Q, H, W)
                mask logits. Other keys are ignored.
            targets (list[dict]): B dicts with "labels": (N_b,) int64 and "masks": (N_b, H', W').

        Returns:
            list[tuple[Tensor, Tensor]]: per image, (pred_idx, tgt_idx) int64 CPU tensors of
            length min(Q, N_b); pred_idx is increasing and prediction ``pred_idx[k]`` is matched
            to target ``tgt_idx[k]``.
        """
        logits = outputs["pred_logits"]
        indices = []
        for b in range(logits.shape[0]):
            cost = self.image_cost(outputs, targets, b)
            if cost.shape[1] == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            if not bool(torch.isfinite(cost).all()):  # scipy would fail less clearly
                raise FloatingPointError(
                    f"HungarianMatcher: the matching cost of image {b} of the batch holds NaN or "
                    "Inf: the model's class or mask predictions are not finite (diverged "
                    "weights?)."
                )
            rows, cols = linear_sum_assignment(cost.numpy())
            indices.append(
                (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
            )
        return indices

    @torch.no_grad()
    def image_cost(
        self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]], b: int
    ) -> torch.Tensor:
        """(Q, N) float32 CPU cost of image ``b``: :meth:`cost_matrix` plus the extra-cost hook.

        "pred_masks" may be absent from ``outputs`` when ``cost_mask`` and ``cost_dice`` are 0.
        """
        pred_masks = outputs.get("pred_masks")
        if pred_masks is None and (self.cost_mask != 0 or self.cost_dice != 0):
            raise KeyError("HungarianMatcher: outputs have no 'pred_masks' but mask costs are on")
        cost = self.cost_matrix(
            outputs["pred_logits"][b],
            None if pred_masks is None else pred_masks[b],
            targets[b]["labels"],
            targets[b].get("masks"),
        )
        if self.extra_cost_fn is not None:  # extra-cost hook (e.g. box costs)
            cost = cost + self.extra_cost_fn(outputs, b, targets[b]).float().cpu()
        return cost

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
            f"cost_dice={self.cost_dice}, num_points={self.num_points}"
        )
