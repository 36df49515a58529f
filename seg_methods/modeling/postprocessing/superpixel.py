"""Superpixel inference of a clustering model as a pure tensor function.

Every pixel goes to the cluster with the largest logit ``<e_k, f(p)>`` (the hard assignment
``one-hot(argmax_K M)`` of ClustSeg Sec. 3.1), with the stride-4 features ``f`` resized as
Mask2Former resizes mask logits (bilinear to the padded input size, crop, bilinear to the output
size). Because the logits are linear in ``f``, this equals resizing the K logit maps, without
ever holding K full-resolution maps.

Shape shorthand:
    K: clusters, C: mask-embedding channels, h, w: stride-4 size, H_pad, W_pad: padded input
"""

from typing import Sequence

import torch
from torch.nn import functional as F

__all__ = ["superpixel_inference"]


def superpixel_inference(
    mask_embed: torch.Tensor,
    mask_features: torch.Tensor,
    padded_size: Sequence[int],
    image_size: Sequence[int],
    output_size: Sequence[int],
    rows_per_chunk: int = 64,
) -> torch.Tensor:
    """Superpixel label map of one image.

    Args:
        mask_embed (Tensor): (K, C) cluster embeddings.
        mask_features (Tensor): (C, h, w) per-pixel embeddings.
        padded_size (sequence[int]): (H_pad, W_pad) of the padded input batch.
        image_size (sequence[int]): (H_img, W_img) of this image before padding.
        output_size (sequence[int]): (height, width) requested.
        rows_per_chunk (int): output rows scored at once (bounds memory to K x rows x width).

    Returns:
        Tensor: (height, width) int64 cluster index of every pixel.
    """
    f = F.interpolate(
        mask_features[None].float(), size=tuple(padded_size), mode="bilinear", align_corners=False
    )[:, :, : image_size[0], : image_size[1]]
    if tuple(f.shape[-2:]) != tuple(output_size):
        f = F.interpolate(f, size=tuple(output_size), mode="bilinear", align_corners=False)
    f = f[0]  # (C, height, width)
    e = mask_embed.float()
    out = torch.empty(tuple(output_size), dtype=torch.long, device=f.device)
    for r in range(0, f.shape[1], rows_per_chunk):
        logits = torch.einsum("kc,chw->khw", e, f[:, r : r + rows_per_chunk])
        out[r : r + rows_per_chunk] = logits.argmax(0)
    return out
