"""CMT-DeepLab losses: MaX-DeepLab's PQ-style loss with its matching, mask-ID cross-entropy and
semantic loss, CMT-DeepLab's pixel-wise instance discrimination loss (Eq. 14) and mask
approximation loss (Eq. 13).

MaX-DeepLab (Wang et al., CVPR 2021) Sec. 3.2: masks are a softmax over the N mask slots per pixel;
the similarity of prediction j and ground truth i is ``p_j(c_i) * Dice(m_i, m_j)``; Hungarian
matching maximises it; the PQ-style loss is

    L_pos = sum_i  p_sigma(i)(c_i) * (1 - Dice(m_i, m_sigma(i)))          (mask term)
          + sum_i  Dice(m_i, m_sigma(i)) * (-log p_sigma(i)(c_i))         (class term)
    L_neg = sum_{j unmatched} -log p_j(void)
    L_PQ  = alpha * L_pos + (1 - alpha) * L_neg,   alpha = 0.75

where the weights p and Dice are constants (no gradient). We write the mask term as
``1 - Dice`` (constant 1 added, as deeplab2 does, so the loss is non-negative) and normalise both
terms by the number of mask slots N, per image, then average over images (deeplab2's
normalisation of the class term; the dice term follows it). Dice uses the softmax masks with void
pixels zeroed and a +1 smoothing.

Mask-ID cross-entropy: per non-void pixel, cross-entropy over the N slots of the slot matched to
the pixel's ground-truth mask (pixels of unmatched ground truths are ignored); mean over pixels.
Semantic loss: per-pixel cross-entropy of the semantic head, void ignored. Loss weights follow
MaX-DeepLab (PQ 3.0, mask-ID 0.3, instance discrimination 1.0, semantic 1.0) and CMT-DeepLab
(mask approximation 1.0).

Shape shorthand:
    B: batch, N: mask slots (cluster centres), C: classes (logits have C + 1, last = void),
    n: ground-truth masks of an image, h, w: prediction size, HW = h * w, M: reference points
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.nn import functional as F

from ..matcher import pairwise_class_cost
from .pixel_contrastive import pixel_instance_discrimination_loss

__all__ = [
    "CMTDeepLabCriterion",
    "mask_extreme_points",
    "mask_approximation_loss",
    "pairwise_soft_dice",
    "pq_style_matching",
    "targets_to_pixel_ids",
]


def pairwise_soft_dice(gt_masks: Tensor, probs: Tensor, smooth: float = 0.0) -> Tensor:
    """Dice between every ground-truth mask and every predicted (soft) mask.

    Args:
        gt_masks (Tensor): (n, HW) in {0, 1}.
        probs (Tensor): (N, HW) mask probabilities (void pixels already zeroed).
        smooth (float): added to numerator and denominator.

    Returns:
        Tensor: (n, N) ``(2 |g p| + s) / (|g| + |p| + s)``.
    """
    inter = gt_masks @ probs.t()  # (n, N)
    denom = gt_masks.sum(1, keepdim=True) + probs.sum(1)[None, :]
    return (2 * inter + smooth) / (denom + smooth).clamp(min=1e-6)


@torch.no_grad()
def pq_style_matching(
    class_logits: Tensor, mask_probs: Tensor, labels: Tensor, gt_masks: Tensor
) -> Tuple[Tensor, Tensor]:
    """MaX-DeepLab's Hungarian matching maximising ``p_j(c_i) * Dice(m_i, m_j)`` for one image.

    Args:
        class_logits (Tensor): (N, C + 1).
        mask_probs (Tensor): (N, HW) softmax-over-slots masks, void pixels zeroed.
        labels (Tensor): (n,) classes.
        gt_masks (Tensor): (n, HW) binary float masks.

    Returns:
        tuple: (pred_idx, gt_idx) int64 CPU tensors of length min(N, n), pred_idx increasing.
    """
    if labels.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty.clone()
    class_prob = -pairwise_class_cost(class_logits.float(), labels)  # (N, n): p_j(c_i)
    dice = pairwise_soft_dice(gt_masks.float(), mask_probs.float()).t()  # (N, n)
    cost = -(class_prob * dice)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


def mask_extreme_points(masks: Tensor) -> Tensor:
    """Extreme coordinates and centre of binary masks, coordinates normalised to [0, 1].

    A pixel (i, j) of an (h, w) mask has coordinates (i / (h - 1), j / (w - 1)) (the same
    normalisation as the coord-conv pixel coordinates r^p of Eq. 12).

    Args:
        masks (Tensor): (n, h, w) binary masks, each non-empty.

    Returns:
        Tensor: (n, 6) = [min_h, max_h, min_w, max_w, avg_h, avg_w] (CMT-DeepLab Eq. 13's
        min(y^h), max(y^h), min(y^w), max(y^w), avg(y^h), avg(y^w)).
    """
    n, h, w = masks.shape
    m = masks.to(torch.float32)
    ys = torch.linspace(0, 1, h, device=masks.device) if h > 1 else masks.new_zeros(1).float()
    xs = torch.linspace(0, 1, w, device=masks.device) if w > 1 else masks.new_zeros(1).float()
    rows = m.amax(2) > 0  # (n, h) rows touched by the mask
    cols = m.amax(1) > 0  # (n, w)
    big = 2.0
    min_h = torch.where(rows, ys[None], ys.new_tensor(big)).amin(1)
    max_h = torch.where(rows, ys[None], ys.new_tensor(-big)).amax(1)
    min_w = torch.where(cols, xs[None], xs.new_tensor(big)).amin(1)
    max_w = torch.where(cols, xs[None], xs.new_tensor(-big)).amax(1)
    area = m.sum((1, 2)).clamp(min=1.0)
    avg_h = (m.sum(2) * ys[None]).sum(1) / area
    avg_w = (m.sum(1) * xs[None]).sum(1) / area
    return torch.stack([min_h, max_h, min_w, max_w, avg_h, avg_w], dim=1)


def mask_approximation_loss(ref_points: Tensor, gt_extremes: Tensor) -> Tensor:
    """CMT-DeepLab Eq. 13, L_loc = L_ext + L_cen, for K matched (reference mask, GT mask) pairs.

    Args:
        ref_points (Tensor): (K, 2M) predicted reference masks r^c = [r^{c,h}, r^{c,w}] (first M
            entries: h coordinates, last M: w coordinates), in [0, 1].
        gt_extremes (Tensor): (K, 6) from :func:`mask_extreme_points`.

    Returns:
        Tensor: scalar ``1/(4K) sum |extremes diff| + 1/(2K) sum |centre diff|`` (0 if K = 0).
    """
    k = ref_points.shape[0]
    if k == 0:
        return ref_points.sum() * 0.0
    m = ref_points.shape[1] // 2
    rh, rw = ref_points[:, :m], ref_points[:, m:]
    pred = torch.stack(
        [rh.amin(1), rh.amax(1), rw.amin(1), rw.amax(1), rh.mean(1), rw.mean(1)], dim=1
    )  # (K, 6)
    diff = (pred - gt_extremes.to(pred)).abs()
    l_ext = diff[:, :4].sum() / (4 * k)
    l_cen = diff[:, 4:].sum() / (2 * k)
    return l_ext + l_cen


def targets_to_pixel_ids(
    targets: List[Dict[str, Tensor]], size: Tuple[int, int], num_classes: int
) -> Tuple[List[Tensor], List[Tensor], Tensor, Tensor]:
    """Resize ground truth to the prediction size (nearest) and build per-pixel maps.

    Args:
        targets (list[dict]): per image "labels" (n,) and "masks" (n, H, W) non-overlapping.
        size (tuple): (h, w) prediction size.
        num_classes (int): C (the void label of the semantic map).

    Returns:
        tuple: per image masks (n', HW) float and labels (n',) (masks empty after resizing are
        dropped), mask ids (B, HW) int64 (-1 void) and semantic labels (B, HW) int64 (C void).
    """
    masks_out, labels_out, ids_out, sem_out = [], [], [], []
    for t in targets:
        masks = t["masks"]
        labels = t["labels"]
        if masks.shape[0] > 0:
            small = F.interpolate(masks[None].float(), size=size, mode="nearest")[0]  # (n, h, w)
        else:
            small = masks.new_zeros((0,) + tuple(size), dtype=torch.float32)
        small = small.flatten(1)  # (n, HW)
        keep = small.sum(1) > 0
        small, labels = small[keep], labels[keep]
        hw = size[0] * size[1]
        ids = torch.full((hw,), -1, dtype=torch.int64, device=small.device)
        sem = torch.full((hw,), num_classes, dtype=torch.int64, device=small.device)
        if small.shape[0]:
            covered = small.amax(0) > 0
            first = small.argmax(0)  # masks do not overlap
            ids = torch.where(covered, first, ids)
            sem = torch.where(covered, labels.to(sem.device)[first], sem)
        masks_out.append(small)
        labels_out.append(labels)
        ids_out.append(ids)
        sem_out.append(sem)
    return masks_out, labels_out, torch.stack(ids_out), torch.stack(sem_out)


class CMTDeepLabCriterion(nn.Module):
    """All CMT-DeepLab losses; ``forward`` returns unweighted losses, :meth:`apply_weights`
    multiplies them by ``weight_dict``.

    Loss names: "loss_pq_class", "loss_pq_dice", "loss_mask_id", "loss_loc" for the final
    prediction and with suffix ``_<i>`` for every auxiliary (per-layer) prediction, plus
    "loss_insdis" and "loss_sem" on the final pixel features / semantic logits.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        pq_weight: float = 3.0,
        pq_alpha: float = 0.75,
        mask_id_weight: float = 0.3,
        sem_weight: float = 1.0,
        insdis_weight: float = 1.0,
        loc_weight: float = 1.0,
        insdis_temperature: float = 0.3,
        insdis_num_samples: int = 4096,
        insdis_sample_temperature: float = 1.0,
        deep_supervision: bool = True,
        num_aux_outputs: int = 0,
    ):
        """
        Args:
            num_classes (int): C.
            pq_weight, mask_id_weight, sem_weight, insdis_weight, loc_weight (float): loss
                weights (MaX-DeepLab: 3.0, 0.3, 1.0, 1.0; CMT-DeepLab Eq. 13: 1.0).
            pq_alpha (float): alpha of the PQ-style loss (0.75).
            insdis_temperature, insdis_num_samples, insdis_sample_temperature: Eq. 14 settings.
            deep_supervision (bool): supervise the auxiliary outputs.
            num_aux_outputs (int): number of auxiliary outputs that receive weights.
        """
        super().__init__()
        self.num_classes = num_classes
        self.pq_alpha = pq_alpha
        self.insdis_temperature = insdis_temperature
        self.insdis_num_samples = insdis_num_samples
        self.insdis_sample_temperature = insdis_sample_temperature
        self.deep_supervision = deep_supervision
        per_output = {
            "loss_pq_class": pq_weight,
            "loss_pq_dice": pq_weight,
            "loss_mask_id": mask_id_weight,
            "loss_loc": loc_weight,
        }
        weights = dict(per_output)
        if deep_supervision:
            for i in range(num_aux_outputs):
                weights.update({f"{k}_{i}": v for k, v in per_output.items()})
        weights["loss_insdis"] = insdis_weight
        weights["loss_sem"] = sem_weight
        self.weight_dict = {k: v for k, v in weights.items() if v > 0}

    def prediction_losses(
        self,
        class_logits: Tensor,
        mask_logits: Tensor,
        gt_masks: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
        ref_points: Optional[Tensor] = None,
        gt_extremes: Optional[Sequence[Tensor]] = None,
        size: Optional[Tuple[int, int]] = None,
    ) -> Dict[str, Tensor]:
        """PQ-style, mask-ID and mask approximation losses of one prediction.

        Args:
            class_logits (Tensor): (B, N, C + 1).
            mask_logits (Tensor): (B, N, h', w') logits; resized (bilinear) to ``size``.
            gt_masks (list[Tensor]): per image (n, HW) binary float masks at ``size``.
            gt_labels (list[Tensor]): per image (n,) classes.
            ref_points (Tensor or None): (B, N, 2M) reference masks (Eq. 10).
            gt_extremes (list[Tensor] or None): per image (n, 6) extreme points and centres.
            size (tuple): (h, w) of the ground truth.

        Returns:
            dict[str, Tensor]: "loss_pq_class", "loss_pq_dice", "loss_mask_id" and, with
            reference points, "loss_loc".
        """
        if tuple(mask_logits.shape[-2:]) != tuple(size):
            mask_logits = F.interpolate(
                mask_logits, size=size, mode="bilinear", align_corners=False
            )
        logits = mask_logits.flatten(2).float()  # (B, N, HW)
        probs = logits.softmax(1)  # softmax over the N slots
        b_size, n_slots = logits.shape[:2]
        alpha = self.pq_alpha
        cls_losses, dice_losses, id_losses = [], [], []
        matched_refs, matched_ext = [], []
        for b in range(b_size):
            masks, labels = gt_masks[b], gt_labels[b].to(logits.device)
            non_void = masks.amax(0) if masks.shape[0] else logits.new_zeros(logits.shape[-1])
            p = probs[b] * non_void[None]  # (N, HW), void pixels zeroed
            rows, cols = pq_style_matching(class_logits[b], p, labels, masks)
            rows, cols = rows.to(logits.device), cols.to(logits.device)
            log_cls = F.log_softmax(class_logits[b].float(), dim=-1)  # (N, C + 1)

            # class term: positives weighted by their (constant) dice, negatives -> void
            dice = pairwise_soft_dice(masks[cols], p[rows], smooth=1.0).diagonal()  # (k,)
            target = torch.full((n_slots,), self.num_classes, device=logits.device)
            target[rows] = labels[cols]
            weight = torch.full((n_slots,), 1.0 - alpha, device=logits.device)
            weight[rows] = alpha * dice.detach()
            nll = -log_cls.gather(1, target[:, None])[:, 0]  # (N,)
            cls_losses.append((weight * nll).sum() / n_slots)

            # mask (dice) term: weighted by the (constant) matched class probability
            class_prob = log_cls[rows, labels[cols]].exp().detach()
            dice_losses.append(alpha * (class_prob * (1.0 - dice)).sum() / n_slots)

            # mask-ID cross-entropy over the slots, target = matched slot of the pixel's mask
            slot_of_gt = torch.full((masks.shape[0],), -1, dtype=torch.int64, device=logits.device)
            slot_of_gt[cols] = rows
            if masks.shape[0]:
                pixel_gt = masks.argmax(0)
                pixel_slot = torch.where(non_void > 0, slot_of_gt[pixel_gt], -1)  # (HW,)
            else:
                pixel_slot = torch.full_like(non_void, -1, dtype=torch.int64)
            if (pixel_slot >= 0).any():
                id_losses.append(
                    F.cross_entropy(logits[b].t(), pixel_slot, ignore_index=-1, reduction="mean")
                )
            else:
                id_losses.append(logits[b].sum() * 0.0)
            if ref_points is not None:
                matched_refs.append(ref_points[b][rows])
                matched_ext.append(gt_extremes[b][cols])
        out = {
            "loss_pq_class": torch.stack(cls_losses).mean(),
            "loss_pq_dice": torch.stack(dice_losses).mean(),
            "loss_mask_id": torch.stack(id_losses).mean(),
        }
        if ref_points is not None:
            out["loss_loc"] = mask_approximation_loss(
                torch.cat(matched_refs), torch.cat(matched_ext)
            )
        return out

    def forward(self, outputs: Dict, targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """
        Args:
            outputs (dict): "pred_logits" (B, N, C + 1), "pred_masks" (B, N, h, w) logits (the
                ground truth is resized to (h, w)), optional "ref_points" (B, N, 2M),
                "pixel_feature" (B, D, h, w), "sem_seg_logits" (B, C, h, w), "aux_outputs" list
                of dicts with "pred_logits", "pred_masks" (any size), optional "ref_points".
            targets (list[dict]): per image "labels" (n,) and "masks" (n, H, W).

        Returns:
            dict[str, Tensor]: unweighted scalar losses.
        """
        size = tuple(outputs["pred_masks"].shape[-2:])
        gt_masks, gt_labels, pixel_ids, pixel_sem = targets_to_pixel_ids(
            targets, size, self.num_classes
        )
        gt_extremes = None
        if outputs.get("ref_points") is not None:
            gt_extremes = [
                mask_extreme_points(m.reshape(-1, *size)) if m.shape[0] else m.new_zeros(0, 6)
                for m in gt_masks
            ]

        def one(pred):
            refs = pred.get("ref_points")
            return self.prediction_losses(
                pred["pred_logits"],
                pred["pred_masks"],
                gt_masks,
                gt_labels,
                ref_points=refs,
                gt_extremes=gt_extremes if refs is not None else None,
                size=size,
            )

        losses = one(outputs)
        if self.deep_supervision:
            for i, aux in enumerate(outputs.get("aux_outputs", [])):
                losses.update({f"{k}_{i}": v for k, v in one(aux).items()})
        if outputs.get("pixel_feature") is not None:
            losses["loss_insdis"] = pixel_instance_discrimination_loss(
                outputs["pixel_feature"].flatten(2),
                pixel_ids,
                num_samples=self.insdis_num_samples,
                temperature=self.insdis_temperature,
                sample_temperature=self.insdis_sample_temperature,
            )
        if outputs.get("sem_seg_logits") is not None:
            sem_logits = outputs["sem_seg_logits"]
            if tuple(sem_logits.shape[-2:]) != size:
                sem_logits = F.interpolate(sem_logits, size=size, mode="bilinear")
            if (pixel_sem != self.num_classes).any():
                losses["loss_sem"] = F.cross_entropy(
                    sem_logits.flatten(2).float(), pixel_sem, ignore_index=self.num_classes
                )
            else:
                losses["loss_sem"] = sem_logits.sum() * 0.0
        return losses

    def apply_weights(self, losses: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Multiply each loss by its weight; losses without a weight are dropped."""
        return {k: v * self.weight_dict[k] for k, v in losses.items() if k in self.weight_dict}

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, weight_dict={self.weight_dict}"
