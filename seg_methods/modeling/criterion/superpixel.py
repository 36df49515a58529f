"""Superpixel losses of ClustSeg (App. A.4) as pure functions.

ClustSeg trains superpixels "jointly with the smooth L1 loss and the SLIC loss (Yang et al. 2020),
with coefficients 10 and 1". The paper gives no more detail; our reading, on the soft pixel-to-
superpixel assignment ``P = softmax_K(mask logits)`` (the E-step of Eq. 10 at stride 4):

* reconstruction (SSFCN, Yang et al. CVPR 2020, Eq. 1-3): for a per-pixel property f,
  superpixel centres ``u_k = sum_p P[k, p] f(p) / sum_p P[k, p]`` and the reconstruction
  ``f'(p) = sum_k P[k, p] u_k``;
* SLIC loss (SSFCN Eq. 4 with semantic labels): cross-entropy between the reconstructed one-hot
  ground-truth region labels and the true ones, plus ``m / S * ||p - p'||_2`` on the pixel
  positions (S: superpixel sampling interval, m: compactness, 0.003 in SSFCN); both averaged over
  the valid pixels;
* smooth L1 loss: smooth-L1 between the reconstructed and the true pixel colours (the normalised
  input averaged over each stride-4 cell), averaged over valid pixels and channels.

Shape shorthand:
    B: batch, K: superpixels, P: pixels of the stride-4 map (h * w), R: regions of an image
"""

from typing import Dict, Mapping, Tuple

import torch
from torch.nn import functional as F

from .base import WeightedCriterion, expand_aux_weights

__all__ = [
    "soft_reconstruct",
    "slic_loss",
    "colour_smooth_l1_loss",
    "superpixel_losses",
    "SuperpixelCriterion",
]


def soft_reconstruct(assign: torch.Tensor, feats: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Reconstruct per-pixel properties through the superpixel centres (SSFCN Eq. 1-3).

    Args:
        assign (Tensor): (B, K, P) soft assignment, each column summing to 1.
        feats (Tensor): (B, F, P) pixel properties (zero where invalid).
        eps (float): guards empty superpixels.

    Returns:
        Tensor: (B, F, P) reconstruction ``f'``.
    """
    mass = assign.sum(-1, keepdim=True)  # (B, K, 1)
    centres = torch.bmm(assign, feats.transpose(1, 2)) / (mass + eps)  # (B, K, F)
    return torch.bmm(centres.transpose(1, 2), assign)  # (B, F, P)


def slic_loss(
    assign: torch.Tensor,
    labels: torch.Tensor,
    positions: torch.Tensor,
    interval: float,
    compactness: float,
    eps: float = 1e-8,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """SSFCN's SLIC loss: label cross-entropy and position term, on the valid pixels.

    Void pixels (label < 0) take part in neither term nor in the centres.

    Args:
        assign (Tensor): (B, K, P) soft assignment.
        labels (Tensor): (B, P) int64 region ids, < 0 = void.
        positions (Tensor): (2, P) pixel positions (y, x) in input pixels.
        interval (float): S, the superpixel sampling interval in input pixels.
        compactness (float): m.

    Returns:
        tuple[Tensor, Tensor]: the cross-entropy term and the position term (scalars).
    """
    ce_terms, pos_terms = [], []
    for a, lab in zip(assign, labels):
        valid = lab >= 0
        if not valid.any():
            ce_terms.append(a.sum() * 0)
            pos_terms.append(a.sum() * 0)
            continue
        ids, inv = torch.unique(lab[valid], return_inverse=True)
        onehot = a.new_zeros(len(ids), lab.shape[0])  # (R, P)
        onehot[:, valid] = F.one_hot(inv, len(ids)).t().to(a.dtype)
        pos = positions.to(a.dtype) * valid.to(a.dtype)  # (2, P)
        av = a * valid.to(a.dtype)  # void pixels do not shape the centres
        recon = soft_reconstruct(av[None], torch.cat([onehot, pos])[None], eps)[0]
        prob = recon[: len(ids), valid].gather(0, inv[None])[0]  # (P_valid,)
        ce_terms.append(-(prob.clamp(min=eps)).log().mean())
        dist = (recon[len(ids) :, valid] - pos[:, valid]).norm(dim=0)  # (P_valid,)
        pos_terms.append(dist.mean() * compactness / interval)
    return torch.stack(ce_terms).mean(), torch.stack(pos_terms).mean()


def colour_smooth_l1_loss(
    assign: torch.Tensor, colours: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Smooth-L1 between reconstructed and true pixel colours, over valid pixels.

    Args:
        assign (Tensor): (B, K, P) soft assignment.
        colours (Tensor): (B, 3, P) pixel colours.
        valid (Tensor): (B, P) bool.

    Returns:
        Tensor: scalar.
    """
    v = valid.to(assign.dtype)
    recon = soft_reconstruct(assign * v[:, None], colours * v[:, None])
    per = F.smooth_l1_loss(recon, colours, reduction="none").mean(1)  # (B, P)
    return (per * v).sum() / v.sum().clamp(min=1)


def superpixel_losses(
    mask_logits: torch.Tensor,
    regions: torch.Tensor,
    image: torch.Tensor,
    *,
    compactness: float,
) -> Dict[str, torch.Tensor]:
    """ClustSeg's superpixel losses on one prediction (unweighted).

    Args:
        mask_logits (Tensor): (B, K, h', w') pixel-superpixel logits (any resolution; resized
            bilinearly to the stride-4 grid h x w = H/4 x W/4).
        regions (Tensor): (B, H, W) int64 ground-truth region ids, < 0 = void/padding.
        image (Tensor): (B, 3, H, W) normalised input.
        compactness (float): m of the SLIC loss.

    Returns:
        dict: "loss_slic_ce", "loss_slic_pos", "loss_smooth_l1" (scalars).
    """
    b, k = mask_logits.shape[:2]
    big_h, big_w = regions.shape[-2:]
    h, w = -(-big_h // 4), -(-big_w // 4)
    if mask_logits.shape[-2:] != (h, w):
        mask_logits = F.interpolate(mask_logits, size=(h, w), mode="bilinear", align_corners=False)
    assign = mask_logits.float().flatten(2).softmax(dim=1)  # (B, K, P): E-step over clusters
    # labels at the centre of each stride-4 cell
    ys = (torch.arange(h, device=regions.device) * 4 + 2).clamp(max=big_h - 1)
    xs = (torch.arange(w, device=regions.device) * 4 + 2).clamp(max=big_w - 1)
    labels = regions[:, ys][:, :, xs].flatten(1)  # (B, P)
    gy, gx = torch.meshgrid(ys.float(), xs.float(), indexing="ij")
    positions = torch.stack([gy.reshape(-1), gx.reshape(-1)])  # (2, P), input pixels
    interval = (big_h * big_w / k) ** 0.5  # S
    ce, pos = slic_loss(assign, labels, positions, interval, compactness)
    colours = F.adaptive_avg_pool2d(image.float(), (h, w)).flatten(2)  # (B, 3, P)
    smooth = colour_smooth_l1_loss(assign, colours, labels >= 0)
    return {"loss_slic_ce": ce, "loss_slic_pos": pos, "loss_smooth_l1": smooth}


class SuperpixelCriterion(WeightedCriterion):
    """ClustSeg's superpixel losses on the final prediction and, with deep supervision, on every
    auxiliary one (suffix ``_<i>``), weighted 1 x SLIC + 10 x smooth L1 (App. A.4).

    ``forward`` returns the unweighted losses; :meth:`apply_weights` weighs them.

    Args:
        slic_weight (float): weight of "loss_slic_ce" and "loss_slic_pos".
        smooth_l1_weight (float): weight of "loss_smooth_l1".
        compactness (float): m of the SLIC loss.
        num_aux_outputs (int): entries of the decoder's ``outputs["aux_outputs"]``.
        deep_supervision (bool): also supervise the auxiliary outputs
            (``MODEL.MASK_CLS.DEEP_SUPERVISION``, the same switch as the set criterion's).
    """

    def __init__(
        self,
        *,
        slic_weight: float,
        smooth_l1_weight: float,
        compactness: float,
        num_aux_outputs: int,
        deep_supervision: bool = True,
    ):
        base = {
            "loss_slic_ce": slic_weight,
            "loss_slic_pos": slic_weight,
            "loss_smooth_l1": smooth_l1_weight,
        }
        super().__init__(expand_aux_weights(base, num_aux_outputs if deep_supervision else 0))
        self.compactness = compactness
        self.deep_supervision = deep_supervision

    def forward(self, outputs: Mapping, targets: Mapping) -> Dict[str, torch.Tensor]:
        """
        Args:
            outputs (dict): "pred_masks" (B, K, h', w') and optional "aux_outputs".
            targets (dict): "regions" (B, H, W) int64 region ids (< 0 = void / padding) and
                "image" (B, 3, H, W), the normalised input (the colours to reconstruct).

        Returns:
            dict[str, Tensor]: unweighted "loss_slic_ce", "loss_slic_pos", "loss_smooth_l1" and
            their ``_<i>`` copies for the auxiliary outputs.
        """
        regions, image = targets["regions"], targets["image"]
        return self.deep_supervision_losses(
            lambda pred: superpixel_losses(
                pred["pred_masks"], regions, image, compactness=self.compactness
            ),
            outputs,
            deep_supervision=self.deep_supervision,
        )

    def extra_repr(self) -> str:
        return f"compactness={self.compactness}, deep_supervision={self.deep_supervision}"
