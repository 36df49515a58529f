"""Panoptic SegFormer's losses (Li et al., CVPR 2022, Sec. 3.5, Eq. 5-6).

``L = lambda_things * L_things + lambda_stuff * L_stuff`` with

* ``L_things = sum_l L_det^(l) + L_mask^things``: for every location-decoder layer l a
  Hungarian-matched detection loss (focal class 2, box L1 5, GIoU 2), and a V-Net dice loss
  (weight 2) of the thing masks of the final tail and of every mask-decoder block;
* ``L_stuff``: dice of the stuff masks of the classes present in the image (tail and blocks) and a
  focal "present" loss of each stuff block's query (weight 4 = the official loss weight 2 times
  the official code's extra factor 2);
* ``lambda_things`` / ``lambda_stuff``: the share of thing / stuff segments among all segments of
  the batch (the official code's dynamic ratio; ``DYNAMIC_LOSS_RATIO``).

Assignments, as in the official code:

1. Layers 0..L-2 of the location decoder: one Hungarian matching each (focal 2, L1 5, GIoU 2).
2. Last layer: the *query filter* repeats the matching up to ``filter_max_pos`` rounds, removing
   the matched queries after each round; the first round supervises the detection loss, the
   union of all rounds is the set of thing queries given to the mask decoder.
3. The filtered queries' masks: a second Hungarian matching (focal 2, L1 5, GIoU 2, dice 2)
   assigns them to ground-truth things for the mask losses.

All matchings go through the shared :class:`~seg_methods.modeling.matcher.HungarianMatcher`
(its ``class_cost_fn`` and ``extra_cost_fn`` hooks carry the focal, box and dice costs).

Targets (per image, built by the meta-architecture): "labels" (N,) thing ranks in [0, K),
"boxes" (N, 4) normalised (cx, cy, w, h), "masks" (N, H, W) thing masks, "stuff_labels" (N_st,)
stuff ranks in [0, S_st), "stuff_masks" (N_st, H, W).

Shape shorthand:
    B: batch, Q: thing queries, T: filtered thing queries (padded), S_st: stuff queries,
    K: thing classes, N: ground-truth things of an image, h, w: mask-prediction size (1/8)
"""

from typing import Dict, List, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch.nn import functional as F

from ..box_losses import (
    box_cxcywh_to_xyxy,
    box_giou_loss,
    box_l1_loss,
    focal_class_cost,
    focal_class_loss,
    pairwise_giou,
    pairwise_l1_cost,
    pairwise_vnet_dice_cost,
    vnet_dice_loss,
)
from ..matcher import HungarianMatcher
from .base import WeightedCriterion, aux_suffix
from .set_criterion import _all_reduce_mean_num_masks

__all__ = ["PanopticSegFormerCriterion", "panoptic_segformer_weight_dict"]

_REMOVED = 1e8  # cost of a query already chosen by the query filter (official INF)


def panoptic_segformer_weight_dict(
    *,
    class_weight: float,
    bbox_weight: float,
    giou_weight: float,
    mask_weight: float,
    stuff_class_weight: float,
    dec_layers: int,
    thing_mask_layers: int,
    stuff_mask_layers: int,
) -> Dict[str, float]:
    """Loss name -> weight: final detection losses (no suffix) and layers ``_<i>`` < L-1; thing
    / stuff dice of the tail (no suffix) and of the blocks ``_<i>``; stuff focal of the blocks."""
    w = {"loss_cls": class_weight, "loss_bbox": bbox_weight, "loss_giou": giou_weight}
    for i in range(dec_layers - 1):
        w.update({f"{k}{aux_suffix(i)}": v for k, v in list(w.items())[:3]})
    w["loss_mask_things"] = mask_weight
    w.update({f"loss_mask_things{aux_suffix(i)}": mask_weight for i in range(thing_mask_layers)})
    w["loss_mask_stuff"] = mask_weight
    for i in range(stuff_mask_layers):
        w[f"loss_mask_stuff{aux_suffix(i)}"] = mask_weight
        w[f"loss_cls_stuff{aux_suffix(i)}"] = stuff_class_weight
    return w


class PanopticSegFormerCriterion(WeightedCriterion):
    """Matchings and losses of Panoptic SegFormer (module docstring).

    Args:
        weight_dict (dict[str, float]): :func:`panoptic_segformer_weight_dict`.
        cost_class, cost_bbox, cost_giou, cost_dice (float): matching cost weights.
        focal_alpha, focal_gamma (float): focal loss / cost parameters.
        filter_max_pos (int): rounds of the query filter (queries per thing, at most).
        dynamic_loss_ratio (bool): scale thing and stuff losses by their segment shares.
    """

    def __init__(
        self,
        *,
        weight_dict: Dict[str, float],
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        cost_dice: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        filter_max_pos: int = 3,
        dynamic_loss_ratio: bool = True,
    ):
        super().__init__(weight_dict)
        self.cost_bbox, self.cost_giou, self.cost_dice = cost_bbox, cost_giou, cost_dice
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.filter_max_pos = filter_max_pos
        self.dynamic_loss_ratio = dynamic_loss_ratio

        def class_cost(logits, labels):
            return focal_class_cost(logits, labels, focal_alpha, focal_gamma)

        # box matching (location decoder) and box + mask matching (mask decoder), both on the
        # shared solver; its mask-point costs stay off (these masks are not logits)
        self.box_matcher, self.mask_matcher = (
            HungarianMatcher(
                cost_class=cost_class,
                cost_mask=0.0,
                cost_dice=0.0,
                num_points=1,
                class_cost_fn=class_cost,
                extra_cost_fn=extra,
            )
            for extra in (self._box_cost, self._box_and_dice_cost)
        )

    # ------------------------------------------------------------------ matching costs
    def _box_cost(self, outputs: Dict, b: int, target: Dict) -> torch.Tensor:
        """(Q, N) ``cost_bbox * L1 - cost_giou * GIoU`` of image b (extra-cost hook)."""
        pred, tgt = outputs["pred_boxes"][b].float(), target["boxes"].float()
        giou = pairwise_giou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(tgt))
        return self.cost_bbox * pairwise_l1_cost(pred, tgt) - self.cost_giou * giou

    def _box_and_dice_cost(self, outputs: Dict, b: int, target: Dict) -> torch.Tensor:
        """Box costs plus ``cost_dice *`` V-Net dice of the masks (targets resized to them)."""
        cost = self._box_cost(outputs, b, target)
        masks = outputs["thing_masks"][b]  # (T, h, w)
        tgt = resize_masks(target["masks"], masks.shape[-2:])
        return cost + self.cost_dice * pairwise_vnet_dice_cost(masks, tgt)

    # ------------------------------------------------------------------ query filter
    @torch.no_grad()
    def filter_queries(
        self, outputs: Dict, targets: List[Dict]
    ) -> Tuple[List[Tuple[torch.Tensor, torch.Tensor]], List[torch.Tensor]]:
        """Query filter of the last location-decoder layer (module docstring, step 2).

        Args:
            outputs (dict): "pred_logits" (B, Q, K), "pred_boxes" (B, Q, 4).
            targets (list[dict]): B target dicts.

        Returns:
            tuple: the first round's (pred_idx, tgt_idx) per image (as the matcher returns) and
            the filtered query indices per image, (T_b,) int64 increasing.
        """
        first, selected = [], []
        for b, target in enumerate(targets):
            cost = self.box_matcher.image_cost(outputs, targets, b)  # (Q, N)
            num_q, n = cost.shape
            if n == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                first.append((empty, empty.clone()))
                selected.append(empty.clone())
                continue
            rounds = max(1, min(self.filter_max_pos, num_q // n))
            cost = cost.clone()
            chosen, round0 = [], None
            for r in range(rounds):
                rows, cols = linear_sum_assignment(cost.numpy())
                rows_t = torch.as_tensor(rows, dtype=torch.int64)
                cols_t = torch.as_tensor(cols, dtype=torch.int64)
                if r == 0:
                    round0 = (rows_t, cols_t)
                chosen.append(rows_t)
                cost[rows_t] = _REMOVED  # matched queries leave the next rounds
                if len(chosen) * n >= num_q:
                    break
            first.append(round0)
            selected.append(torch.cat(chosen).unique(sorted=True))
        return first, selected

    # ------------------------------------------------------------------ losses
    def detection_losses(self, outputs, targets, indices, num_things: float):
        """Focal class, L1 and GIoU losses of one location-decoder layer (Eq. 5, ``L_det``)."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        b_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        q_idx = torch.cat([src for src, _ in indices])
        labels = torch.full(
            logits.shape[:2], logits.shape[-1], dtype=torch.int64, device=logits.device
        )
        tgt_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(boxes)
        b_idx, q_idx = b_idx.to(logits.device), q_idx.to(logits.device)
        labels[b_idx, q_idx] = tgt_labels.to(logits.device)
        loss_cls = focal_class_loss(
            logits.flatten(0, 1), labels.flatten(), num_things, self.focal_alpha, self.focal_gamma
        )
        pred = boxes[b_idx, q_idx]
        return {
            "loss_cls": loss_cls,
            "loss_bbox": box_l1_loss(pred, tgt_boxes, num_things),
            "loss_giou": box_giou_loss(
                box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(tgt_boxes), num_things
            ),
        }

    def forward(self, outputs: Dict, targets: List[Dict]) -> Dict[str, torch.Tensor]:
        """Unweighted losses (already scaled by the dynamic thing / stuff ratio).

        Args:
            outputs (dict): the meta-architecture's training outputs: "pred_logits",
                "pred_boxes", "aux_outputs" (location decoder), "first_round" (step 2's first
                round), "selected" (filtered queries per image), "thing_masks" (B, T, h, w),
                "thing_masks_aux" (list), "stuff_masks" (B, S_st, h, w), "stuff_masks_aux",
                "stuff_logits_aux" (list of (B, S_st)).
            targets (list[dict]): see the module docstring.

        Returns:
            dict[str, Tensor]: losses named as :func:`panoptic_segformer_weight_dict`.
        """
        device = outputs["pred_logits"].device
        num_things = _all_reduce_mean_num_masks(sum(len(t["labels"]) for t in targets), device)
        num_stuff = _all_reduce_mean_num_masks(sum(len(t["stuff_labels"]) for t in targets), device)
        losses: Dict[str, torch.Tensor] = {}
        for i, aux in enumerate(outputs["aux_outputs"]):
            indices = self.box_matcher(aux, targets)
            for k, v in self.detection_losses(aux, targets, indices, num_things).items():
                losses[f"{k}{aux_suffix(i)}"] = v
        losses.update(self.detection_losses(outputs, targets, outputs["first_round"], num_things))
        thing_losses = self.thing_mask_losses(outputs, targets, num_things)
        stuff_losses = self.stuff_losses(outputs, targets, num_stuff)
        if self.dynamic_loss_ratio:
            thing_ratio = num_things / (num_things + num_stuff)
            stuff_ratio = num_stuff / (num_things + num_stuff)
        else:
            thing_ratio = stuff_ratio = 1.0
        losses = {k: v * thing_ratio for k, v in losses.items()}
        losses.update({k: v * thing_ratio for k, v in thing_losses.items()})
        losses.update({k: v * stuff_ratio for k, v in stuff_losses.items()})
        return losses

    def thing_mask_losses(self, outputs: Dict, targets: List[Dict], num_things: float):
        """Dice of the filtered queries' masks after the second matching (step 3)."""
        masks = outputs["thing_masks"]  # (B, T, h, w)
        selected = outputs["selected"]
        preds, tgts, aux_preds = [], [], [[] for _ in outputs["thing_masks_aux"]]
        for b, (sel, target) in enumerate(zip(selected, targets)):
            t = len(sel)
            if t == 0 or len(target["labels"]) == 0:
                continue
            sub = {
                "pred_logits": outputs["pred_logits"][b : b + 1, sel.to(masks.device)],
                "pred_boxes": outputs["pred_boxes"][b : b + 1, sel.to(masks.device)],
                "thing_masks": masks[b : b + 1, :t].detach(),
            }
            ((src, tgt),) = self.mask_matcher(sub, [target])
            src, tgt = src.to(masks.device), tgt.to(masks.device)
            preds.append(masks[b, src])
            tgts.append(target["masks"][tgt])
            for j, aux in enumerate(outputs["thing_masks_aux"]):
                aux_preds[j].append(aux[b, src])
        zero = masks.sum() * 0.0
        if not preds:
            losses = {"loss_mask_things": zero}
            losses.update(
                {f"loss_mask_things{aux_suffix(j)}": a.sum() * 0.0
                 for j, a in enumerate(outputs["thing_masks_aux"])}
            )  # fmt: skip
            return losses
        pred = torch.cat(preds)
        losses = {"loss_mask_things": self._dice(pred, tgts, num_things)}
        for j, a in enumerate(aux_preds):
            losses[f"loss_mask_things{aux_suffix(j)}"] = self._dice(torch.cat(a), tgts, num_things)
        return losses

    @staticmethod
    def _dice(pred: torch.Tensor, targets: List[torch.Tensor], num: float) -> torch.Tensor:
        """Official recipe: predictions upsampled x2 (to 1/4), targets resized to them."""
        up = F.interpolate(pred[None], scale_factor=2.0, mode="bilinear", align_corners=False)[0]
        tgt = torch.cat([resize_masks(t, up.shape[-2:]) for t in targets])
        return vnet_dice_loss(up, tgt, num)

    def stuff_losses(self, outputs: Dict, targets: List[Dict], num_stuff: float):
        """Dice of the present stuff classes' masks and the focal "present" loss per block."""
        masks = outputs["stuff_masks"]  # (B, S_st, h, w)
        b_idx, s_idx, tgts = [], [], []
        present = torch.zeros(masks.shape[:2], dtype=torch.bool, device=masks.device)
        for b, target in enumerate(targets):
            lab = target["stuff_labels"].to(masks.device)
            present[b, lab] = True
            b_idx.append(torch.full_like(lab, b))
            s_idx.append(lab)
            tgts.append(target["stuff_masks"])
        b_idx, s_idx = torch.cat(b_idx), torch.cat(s_idx)
        losses = {}
        all_masks = [("", masks)] + [
            (aux_suffix(j), m) for j, m in enumerate(outputs["stuff_masks_aux"])
        ]
        for suffix, m in all_masks:
            if b_idx.numel() == 0:
                losses[f"loss_mask_stuff{suffix}"] = m.sum() * 0.0
            else:
                losses[f"loss_mask_stuff{suffix}"] = self._dice(m[b_idx, s_idx], tgts, num_stuff)
        labels = (~present).long().flatten()  # 0: present (the one class), 1: background
        for j, logits in enumerate(outputs["stuff_logits_aux"]):
            losses[f"loss_cls_stuff{aux_suffix(j)}"] = focal_class_loss(
                logits.reshape(-1, 1), labels, num_stuff, self.focal_alpha, self.focal_gamma
            )
        return losses


def resize_masks(masks: torch.Tensor, size) -> torch.Tensor:
    """(N, H, W) masks (any dtype) -> (N, *size) float, bilinear (the official targets)."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size), dtype=torch.float32)
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks.float()
    return F.interpolate(
        masks[None].float(), size=tuple(size), mode="bilinear", align_corners=False
    )[0]
