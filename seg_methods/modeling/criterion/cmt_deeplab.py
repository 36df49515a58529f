"""CMT-DeepLab losses: MaX-DeepLab's PQ-style loss with its matching, mask-ID cross-entropy and
semantic loss, CMT-DeepLab's pixel-wise instance discrimination loss (Eq. 14) and mask
approximation loss (Eq. 13).

MaX-DeepLab (Wang et al., CVPR 2021) Sec. 3.2: masks are a softmax over the N mask slots per pixel.
PQ = RQ x SQ; MaX-DeepLab takes the class probability as the RQ proxy and the Dice coefficient as
the SQ proxy, so the similarity of prediction j and ground truth i is

    sim(i, j) = p_j(c_i) * Dice(m_i, m_j),    Dice(g, p) = 2 |g p| / (|g| + |p|)

(no smoothing: the similarity is the PQ proxy itself; a 1e-6 floor on the denominator only
guards empty masks). Hungarian matching sigma maximises sum_i sim(i, sigma(i)), and the PQ-style
loss is

    L_pos = sum_i  p_sigma(i)(c_i) * (1 - Dice_s(m_i, m_sigma(i)))        (mask term)
          + sum_i  Dice(m_i, m_sigma(i)) * (-log p_sigma(i)(c_i))         (class term)
    L_neg = sum_{j unmatched} -log p_j(void)
    L_PQ  = alpha * L_pos + (1 - alpha) * L_neg,   alpha = 0.75

where the weights p and Dice are constants (no gradient). The class term's weight is the same
unsmoothed Dice as the matching's; only the Dice *loss* of the mask term uses the smoothed
``Dice_s = (2 |g p| + 1) / (|g| + |p| + 1)`` (as deeplab2's mask Dice loss). We write the mask
term as ``1 - Dice_s`` (constant 1 added, as deeplab2 does, so the loss is non-negative) and
normalise both terms by the number of mask slots N, per image, then average over images
(deeplab2's normalisation of the class term; the dice term follows it). Void pixels are zeroed in
the softmax masks before any Dice.

Deep supervision: the auxiliary (per-layer) predictions get the same losses (suffix ``_<i>``).
With ``aux_matching="final"`` (default) they reuse the final prediction's matching sigma and its
constant weights Dice(m_i, m_sigma(i)) and p_sigma(i)(c_i), as kMaX-DeepLab does by default
(``SHARE_FINAL_MATCHING``; issue 7 attributes the same to MaX-DeepLab's reference); with
``"per_layer"`` every auxiliary prediction is matched anew on its own masks and classes.

Mask-ID cross-entropy: per non-void pixel, cross-entropy over the N slots of the slot matched to
the pixel's ground-truth mask (pixels of unmatched ground truths are ignored); mean over pixels.
Semantic loss: per-pixel cross-entropy of the semantic head, void ignored. Loss weights follow
MaX-DeepLab (PQ 3.0, mask-ID 0.3, instance discrimination 1.0, semantic 1.0) and CMT-DeepLab
(mask approximation 1.0).

Shape shorthand:
    B: batch, N: mask slots (cluster centres), C: classes (logits have C + 1, last = void),
    n: ground-truth masks of an image, k: matched pairs (min(N, n)), h, w: prediction size,
    HW = h * w, M: reference points
"""

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torch.nn import functional as F

from .base import WeightedCriterion, add_suffix, expand_aux_weights, supervised_outputs
from .pixel_contrastive import pixel_instance_discrimination_loss

__all__ = [
    "AUX_MATCHING_MODES",
    "CMTDeepLabCriterion",
    "PQMatch",
    "mask_extreme_points",
    "mask_approximation_loss",
    "paired_soft_dice",
    "pairwise_soft_dice",
    "pq_style_matching",
    "targets_to_pixel_ids",
]

AUX_MATCHING_MODES = ("final", "per_layer")

_EPS = 1e-6  # floor of Dice denominators (empty masks); not a smoothing term


def pairwise_soft_dice(gt_masks: Tensor, probs: Tensor, smooth: float = 0.0) -> Tensor:
    """Dice between every ground-truth mask and every predicted (soft) mask.

    Args:
        gt_masks (Tensor): (n, HW) in {0, 1}.
        probs (Tensor): (N, HW) mask probabilities (void pixels already zeroed).
        smooth (float): added to numerator and denominator (0: the Dice coefficient itself).

    Returns:
        Tensor: (n, N) ``(2 |g p| + s) / (|g| + |p| + s)``.
    """
    inter = gt_masks @ probs.t()  # (n, N)
    denom = gt_masks.sum(1, keepdim=True) + probs.sum(1)[None, :]
    return (2 * inter + smooth) / (denom + smooth).clamp(min=_EPS)


def paired_soft_dice(gt_masks: Tensor, probs: Tensor, smooth: float = 0.0) -> Tensor:
    """Dice of k (ground truth, prediction) pairs, row i with row i.

    Args:
        gt_masks (Tensor): (k, HW) in {0, 1}.
        probs (Tensor): (k, HW) mask probabilities (void pixels already zeroed).
        smooth (float): as in :func:`pairwise_soft_dice`.

    Returns:
        Tensor: (k,) ``(2 |g p| + s) / (|g| + |p| + s)``.
    """
    inter = (gt_masks * probs).sum(1)  # (k,)
    denom = gt_masks.sum(1) + probs.sum(1)
    return (2 * inter + smooth) / (denom + smooth).clamp(min=_EPS)


class PQMatch(NamedTuple):
    """Hungarian matching of one image and its constant PQ-style loss weights.

    Attributes:
        pred_idx (Tensor): (k,) int64 matched slots sigma(i), increasing.
        gt_idx (Tensor): (k,) int64 matched ground-truth masks i.
        dice (Tensor): (k,) Dice(m_i, m_sigma(i)), unsmoothed, no gradient: the class-term
            weight (SQ proxy).
        class_prob (Tensor): (k,) p_sigma(i)(c_i), no gradient: the mask-term weight (RQ proxy).
    """

    pred_idx: Tensor
    gt_idx: Tensor
    dice: Tensor
    class_prob: Tensor


@torch.no_grad()
def pq_style_matching(
    class_logits: Tensor, mask_probs: Tensor, labels: Tensor, gt_masks: Tensor
) -> PQMatch:
    """MaX-DeepLab's Hungarian matching maximising ``p_j(c_i) * Dice(m_i, m_j)`` for one image.

    Args:
        class_logits (Tensor): (N, C + 1).
        mask_probs (Tensor): (N, HW) softmax-over-slots masks, void pixels zeroed.
        labels (Tensor): (n,) classes.
        gt_masks (Tensor): (n, HW) binary float masks.

    Returns:
        PQMatch: k = min(N, n) pairs on the device of ``class_logits``, with the unsmoothed Dice
        and the class probability of every matched pair.
    """
    device = class_logits.device
    if labels.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        zeros = torch.zeros(0, device=device)
        return PQMatch(empty, empty.clone(), zeros, zeros.clone())
    class_prob = class_logits.float().softmax(-1)[:, labels]  # (N, n): p_j(c_i)
    dice = pairwise_soft_dice(gt_masks.float(), mask_probs.float()).t()  # (N, n), unsmoothed
    similarity = class_prob * dice  # PQ proxy: RQ (class) x SQ (Dice)
    if not bool(torch.isfinite(similarity).all()):  # scipy would fail less clearly
        raise FloatingPointError(
            "CMT-DeepLab PQ-style matching: the similarity holds NaN or Inf: the model's class or "
            "mask predictions are not finite (diverged weights?)."
        )
    rows, cols = linear_sum_assignment(-similarity.cpu().numpy())
    rows = torch.as_tensor(rows, dtype=torch.int64, device=device)
    cols = torch.as_tensor(cols, dtype=torch.int64, device=device)
    return PQMatch(rows, cols, dice[rows, cols], class_prob[rows, cols])


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


class CMTDeepLabCriterion(WeightedCriterion):
    """All CMT-DeepLab losses; ``forward`` returns unweighted losses, :meth:`apply_weights`
    (from :class:`WeightedCriterion`) multiplies them by ``weight_dict``.

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
        aux_matching: str = "final",
        dice_smooth: float = 1.0,
    ):
        """
        Args:
            num_classes (int): C.
            pq_weight, mask_id_weight, sem_weight, insdis_weight, loc_weight (float): loss
                weights (MaX-DeepLab: 3.0, 0.3, 1.0, 1.0; CMT-DeepLab Eq. 13: 1.0).
            pq_alpha (float): alpha of the PQ-style loss (0.75).
            insdis_temperature, insdis_num_samples, insdis_sample_temperature: Eq. 14 settings.
            deep_supervision (bool): supervise the auxiliary outputs
                (``MODEL.MASK_CLS.DEEP_SUPERVISION``).
            num_aux_outputs (int): number of auxiliary outputs that receive weights.
            aux_matching (str): "final" (auxiliary outputs reuse the final prediction's matching
                and weights) or "per_layer" (each is matched anew);
                ``MODEL.CMT_DEEPLAB.AUX_MATCHING``.
            dice_smooth (float): smoothing of the Dice loss term only (1.0, as deeplab2).
        """
        if aux_matching not in AUX_MATCHING_MODES:
            raise ValueError(
                f"MODEL.CMT_DEEPLAB.AUX_MATCHING must be one of {AUX_MATCHING_MODES}, "
                f"got {aux_matching!r}"
            )
        per_output = {
            "loss_pq_class": pq_weight,
            "loss_pq_dice": pq_weight,
            "loss_mask_id": mask_id_weight,
            "loss_loc": loc_weight,
        }
        weights = expand_aux_weights(per_output, num_aux_outputs if deep_supervision else 0)
        weights.update({"loss_insdis": insdis_weight, "loss_sem": sem_weight})
        super().__init__({k: v for k, v in weights.items() if v > 0})
        self.num_classes = num_classes
        self.pq_alpha = pq_alpha
        self.insdis_temperature = insdis_temperature
        self.insdis_num_samples = insdis_num_samples
        self.insdis_sample_temperature = insdis_sample_temperature
        self.deep_supervision = deep_supervision
        self.aux_matching = aux_matching
        self.dice_smooth = dice_smooth

    @staticmethod
    def mask_logits_at(mask_logits: Tensor, size: Tuple[int, int]) -> Tensor:
        """(B, N, h', w') mask logits -> (B, N, HW) float logits at ``size`` (bilinear)."""
        if tuple(mask_logits.shape[-2:]) != tuple(size):
            mask_logits = F.interpolate(
                mask_logits, size=size, mode="bilinear", align_corners=False
            )
        return mask_logits.flatten(2).float()

    @staticmethod
    def match(
        class_logits: Tensor,
        logits: Tensor,
        gt_masks: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
        non_void: Tensor,
    ) -> List[PQMatch]:
        """:func:`pq_style_matching` of every image of a prediction.

        Args:
            class_logits (Tensor): (B, N, C + 1).
            logits (Tensor): (B, N, HW) mask logits (softmax over N gives the masks).
            gt_masks (list[Tensor]): per image (n, HW) binary float masks.
            gt_labels (list[Tensor]): per image (n,) classes.
            non_void (Tensor): (B, HW) 1 for non-void pixels.

        Returns:
            list[PQMatch]: one per image.
        """
        probs = logits.softmax(1) * non_void[:, None]  # (B, N, HW), void pixels zeroed
        return [
            pq_style_matching(
                class_logits[b], probs[b], gt_labels[b].to(logits.device), gt_masks[b]
            )
            for b in range(logits.shape[0])
        ]

    def prediction_losses(
        self,
        class_logits: Tensor,
        logits: Tensor,
        matches: Sequence[PQMatch],
        gt_masks: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
        non_void: Tensor,
        ref_points: Optional[Tensor] = None,
        gt_extremes: Optional[Sequence[Tensor]] = None,
    ) -> Dict[str, Tensor]:
        """PQ-style, mask-ID and mask approximation losses of one prediction, given a matching.

        Args:
            class_logits (Tensor): (B, N, C + 1).
            logits (Tensor): (B, N, HW) mask logits at the ground-truth size.
            matches (list[PQMatch]): per image matching and constant weights (this prediction's
                own, or the final prediction's with ``aux_matching="final"``).
            gt_masks (list[Tensor]): per image (n, HW) binary float masks.
            gt_labels (list[Tensor]): per image (n,) classes.
            non_void (Tensor): (B, HW) 1 for non-void pixels.
            ref_points (Tensor or None): (B, N, 2M) reference masks (Eq. 10).
            gt_extremes (list[Tensor] or None): per image (n, 6) extreme points and centres.

        Returns:
            dict[str, Tensor]: "loss_pq_class", "loss_pq_dice", "loss_mask_id" and, with
            reference points, "loss_loc".
        """
        b_size, n_slots = logits.shape[:2]
        if class_logits.shape[1] != n_slots or len(matches) != b_size:
            raise ValueError(
                f"prediction with {class_logits.shape[1]} class / {n_slots} mask slots for "
                f"{b_size} images does not fit a matching of {len(matches)} images"
            )
        probs = logits.softmax(1) * non_void[:, None]  # (B, N, HW), void pixels zeroed
        alpha, device = self.pq_alpha, logits.device
        cls_losses, dice_losses, id_losses = [], [], []
        matched_refs, matched_ext = [], []
        for b, match in enumerate(matches):
            masks, labels = gt_masks[b], gt_labels[b].to(device)
            rows, cols = match.pred_idx.to(device), match.gt_idx.to(device)
            log_cls = F.log_softmax(class_logits[b].float(), dim=-1)  # (N, C + 1)

            # class term: positives weighted by their constant, unsmoothed Dice,
            # negatives -> void with weight 1 - alpha
            target = torch.full((n_slots,), self.num_classes, device=device)
            target[rows] = labels[cols]
            weight = torch.full((n_slots,), 1.0 - alpha, device=device)
            weight[rows] = alpha * match.dice.to(device)
            nll = -log_cls.gather(1, target[:, None])[:, 0]  # (N,)
            cls_losses.append((weight * nll).sum() / n_slots)

            # mask term: smoothed Dice loss weighted by the constant matched class probability
            dice_s = paired_soft_dice(masks[cols], probs[b][rows], smooth=self.dice_smooth)
            class_prob = match.class_prob.to(device)
            dice_losses.append(alpha * (class_prob * (1.0 - dice_s)).sum() / n_slots)

            # mask-ID cross-entropy over the slots, target = matched slot of the pixel's mask
            slot_of_gt = torch.full((masks.shape[0],), -1, dtype=torch.int64, device=device)
            slot_of_gt[cols] = rows
            if masks.shape[0]:
                pixel_slot = torch.where(non_void[b] > 0, slot_of_gt[masks.argmax(0)], -1)
            else:
                pixel_slot = torch.full_like(non_void[b], -1, dtype=torch.int64)
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
        non_void = (pixel_ids >= 0).float()  # (B, HW)
        gt_extremes = None
        if outputs.get("ref_points") is not None:
            gt_extremes = [
                mask_extreme_points(m.reshape(-1, *size)) if m.shape[0] else m.new_zeros(0, 6)
                for m in gt_masks
            ]

        losses: Dict[str, Tensor] = {}
        final_matches = None
        # final prediction first (suffix ""), then the auxiliary ones (suffix "_<i>")
        for suffix, pred in supervised_outputs(outputs, self.deep_supervision):
            logits = self.mask_logits_at(pred["pred_masks"], size)  # (B, N, HW)
            if suffix and self.aux_matching == "final":
                matches = final_matches  # the final prediction's matching and weights
            else:
                matches = self.match(pred["pred_logits"], logits, gt_masks, gt_labels, non_void)
            if not suffix:
                final_matches = matches
            refs = pred.get("ref_points")
            prediction = self.prediction_losses(
                pred["pred_logits"],
                logits,
                matches,
                gt_masks,
                gt_labels,
                non_void,
                ref_points=refs if gt_extremes is not None else None,
                gt_extremes=gt_extremes,
            )
            losses.update(add_suffix(prediction, suffix))

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

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, aux_matching={self.aux_matching!r}, "
            f"weight_dict={self.weight_dict}"
        )
