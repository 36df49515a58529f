"""Pixel-wise instance discrimination loss (CMT-DeepLab Eq. 14), shared by CMT-DeepLab and
ClustSeg.

    L_insdis = sum_{a in A} -1/|P(a)| sum_{p in P(a)} log( exp(f_a . f_p / tau)
                                                          / sum_{b in A} exp(f_a . f_b / tau) )

A is a set of |A| pixels sampled from the image with a bias towards small masks (CMT-DeepLab
Sec. 3.4), void pixels excluded; P(a) are the sampled pixels of the same ground-truth mask as a
(a itself included, as in supervised contrastive learning with multiple positives); tau = 0.3 is
the temperature of deeplab2's implementation. We average over the anchors of an image (the paper
writes a sum; averaging only rescales the loss) and then over the images that have pixels.

Sampling (our reading of "add bias to pixels' sampling probability based on the size of object
mask they belong to"): without replacement, with Gumbel-top-k on the logits
``sample_temperature * log(1 / area(mask of the pixel))``; with sample_temperature = 1 every mask
receives the same expected share of samples, with 0 sampling is uniform over non-void pixels.

Shape shorthand:
    B: batch size, HW: number of pixels, D: feature channels, K: number of sampled pixels
"""

from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["sample_pixels_by_inverse_area", "pixel_instance_discrimination_loss"]


def sample_pixels_by_inverse_area(
    mask_ids: Tensor,
    num_samples: int,
    sample_temperature: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Draw up to ``num_samples`` non-void pixels of one image without replacement, with
    probability increasing as the area of their mask decreases.

    Args:
        mask_ids (Tensor): (HW,) int64 ground-truth mask index of every pixel, -1 for void.
        num_samples (int): |A|; fewer are returned when the image has fewer non-void pixels.
        sample_temperature (float): exponent of the inverse area (0: uniform sampling).
        generator (torch.Generator or None): random generator (tests).

    Returns:
        Tensor: (K,) int64 pixel indices, K = min(num_samples, #non-void pixels).
    """
    valid = mask_ids >= 0
    num_valid = int(valid.sum())
    k = min(int(num_samples), num_valid)
    if k == 0:
        return torch.zeros(0, dtype=torch.int64, device=mask_ids.device)
    ids = mask_ids.clamp(min=0)
    area = torch.bincount(ids[valid], minlength=int(ids.max()) + 1).float()  # (num_masks,)
    logits = -sample_temperature * torch.log(area[ids].clamp(min=1.0))  # (HW,)
    logits = logits.masked_fill(~valid, float("-inf"))
    u = torch.rand(
        logits.shape, generator=generator, device=logits.device if generator is None else "cpu"
    ).to(logits.device)
    gumbel = -torch.log(-torch.log(u.clamp(1e-12, 1.0 - 1e-7)))
    return torch.topk(logits + gumbel, k).indices


def pixel_instance_discrimination_loss(
    features: Tensor,
    mask_ids: Tensor,
    *,
    num_samples: int = 4096,
    temperature: float = 0.3,
    sample_temperature: float = 1.0,
    normalize: bool = True,
    sample_indices: Optional[list] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Eq. 14 with multiple positives on sampled pixels, averaged over anchors and images.

    Args:
        features (Tensor): (B, D, HW) pixel features f.
        mask_ids (Tensor): (B, HW) int64 ground-truth mask index per pixel (any instance id that
            is unique within the image), -1 for void pixels (never sampled).
        num_samples (int): |A| per image (4096 in CMT-DeepLab).
        temperature (float): tau (0.3).
        sample_temperature (float): see :func:`sample_pixels_by_inverse_area`.
        normalize (bool): L2-normalise f before the dot products (features are usually already
            normalised; the temperature assumes unit vectors).
        sample_indices (list[Tensor] or None): per image (K_b,) pixel indices to use instead of
            sampling (tests).
        generator (torch.Generator or None): random generator of the sampling.

    Returns:
        Tensor: scalar loss (0 with a gradient path when no image has a non-void pixel).
    """
    if normalize:
        features = F.normalize(features, dim=1)
    losses = []
    for b in range(features.shape[0]):
        if sample_indices is not None:
            idx = sample_indices[b].to(features.device)
        else:
            idx = sample_pixels_by_inverse_area(
                mask_ids[b], num_samples, sample_temperature, generator
            )
        if idx.numel() == 0:
            continue
        f = features[b][:, idx]  # (D, K)
        ids = mask_ids[b][idx]  # (K,)
        logits = (f.t() @ f) / temperature  # (K, K): f_a . f_b / tau
        log_prob = F.log_softmax(logits, dim=1)  # normalised over b in A
        positives = (ids[:, None] == ids[None, :]).to(log_prob.dtype)  # (K, K), P(a) incl. a
        per_anchor = -(positives * log_prob).sum(1) / positives.sum(1)  # (K,)
        losses.append(per_anchor.mean())
    if not losses:
        return features.sum() * 0.0
    return torch.stack(losses).mean()
