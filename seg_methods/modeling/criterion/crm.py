"""CRM's training losses (official ``train.py`` + ``util/metrics_compute_crm.py`` +
``models/sobel_op.py``; the same losses as CascadePSP).

With p the sigmoid prediction and g the ground-truth mask in {0, 1}, both queried/taken at the
training input resolution (every pixel of the crop):

    L = w_l1 |p - g|_1 + w_l2 |p - g|_2^2 + w_grad |S(p) - S(g)|_1 (+ w_ce BCE(logits, g))

averaged over pixels, with the official weights w_l1 = 1, w_l2 = 1, w_grad = 5, w_ce = 0 (the
official code computes the BCE but weights it 0; we skip it unless its weight is set). S is the
official Sobel magnitude: a 3x3 box blur (zero padding, counted), then the Sobel kernels divided by
4 (zero padding), ``sqrt(gx^2 + gy^2 + 1e-4)``. Nothing else is supervised.

Difference from the official code: images of a batch may have different sizes here (the batch is
padded), so each term is computed on each image's own unpadded crop (the Sobel filter never sees
the padding) and averaged over all valid pixels of the batch, which equals the official batch mean
when every image has the same size (the official crops are all 224 x 224).

Shape shorthand:
    B: batch, H, W: padded size, h_i, w_i: image i's size
"""

from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["crm_losses", "sobel_magnitude"]

_SOBEL_X = ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0))
_SOBEL_Y = ((1.0, 2.0, 1.0), (0.0, 0.0, 0.0), (-1.0, -2.0, -1.0))


def sobel_magnitude(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Official ``SobelOperator``: box blur, Sobel / 4, gradient magnitude.

    Args:
        x (Tensor): (N, 1, H, W).
        eps (float): added under the square root (official: 1e-4).

    Returns:
        Tensor: (N, 1, H, W) gradient magnitude, >= sqrt(eps).
    """
    x = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
    kernels = x.new_tensor([_SOBEL_X, _SOBEL_Y]).unsqueeze(1) / 4  # (2, 1, 3, 3)
    grad = F.conv2d(x, kernels, padding=1)
    return torch.sqrt(grad[:, :1] ** 2 + grad[:, 1:] ** 2 + eps)


def crm_losses(
    logits: torch.Tensor,
    gt: torch.Tensor,
    image_sizes: Sequence[Tuple[int, int]],
    *,
    l1_weight: float = 1.0,
    l2_weight: float = 1.0,
    grad_weight: float = 5.0,
    ce_weight: float = 0.0,
    sobel_eps: float = 1e-4,
) -> Dict[str, torch.Tensor]:
    """Weighted CRM losses over each image's valid region.

    Args:
        logits (Tensor): (B, H, W) decoder logits at every pixel of the padded batch.
        gt (Tensor): (B, H, W) ground truth in [0, 1] (float).
        image_sizes (list[tuple[int, int]]): (h_i, w_i) of each image (its unpadded region).
        l1_weight, l2_weight, grad_weight, ce_weight (float): loss weights (official 1, 1, 5, 0).
        sobel_eps (float): see :func:`sobel_magnitude`.

    Returns:
        dict[str, Tensor]: "loss_l1", "loss_l2", "loss_grad" (and "loss_ce" when ce_weight > 0),
        each a weighted scalar; finite for any mask (an empty ground truth is a valid target).
    """
    if logits.shape != gt.shape or logits.dim() != 3 or len(image_sizes) != logits.shape[0]:
        raise ValueError(
            f"crm_losses: logits {tuple(logits.shape)}, gt {tuple(gt.shape)} and "
            f"{len(image_sizes)} image sizes do not describe the same (B, H, W) batch"
        )
    prob = torch.sigmoid(logits)
    sums = {"l1": logits.new_zeros(()), "l2": logits.new_zeros(()), "grad": logits.new_zeros(())}
    if ce_weight > 0:
        sums["ce"] = logits.new_zeros(())
    count = 0
    for i, (h, w) in enumerate(image_sizes):
        p, g = prob[i, :h, :w], gt[i, :h, :w]
        sums["l1"] = sums["l1"] + (p - g).abs().sum()
        sums["l2"] = sums["l2"] + ((p - g) ** 2).sum()
        grad_p = sobel_magnitude(p[None, None], sobel_eps)
        grad_g = sobel_magnitude(g[None, None], sobel_eps)
        sums["grad"] = sums["grad"] + (grad_p - grad_g).abs().sum()
        if "ce" in sums:
            sums["ce"] = sums["ce"] + F.binary_cross_entropy_with_logits(
                logits[i, :h, :w], (g > 0.5).to(logits.dtype), reduction="sum"
            )
        count += h * w
    count = max(count, 1)
    weights = {"l1": l1_weight, "l2": l2_weight, "grad": grad_weight, "ce": ce_weight}
    return {f"loss_{k}": v / count * weights[k] for k, v in sums.items()}
