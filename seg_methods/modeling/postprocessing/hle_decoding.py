"""Panoptic decoding of Hierarchical Lovász Embeddings (HLE Sec. 3.5), pure PyTorch.

1. Semantic class of every pixel: argmax of psi (Eq. 9).
2. Things: the seed map is reduced by a 3x3 max-pool NMS (a pixel survives where it equals the
   pooled maximum) and thresholded, on pixels whose class is a thing class, giving candidate
   seeds in decreasing seed order.
3. :func:`greedy_seed_clustering` (the inner loop the compiled op of ``layers/hle_decode.py``
   replaces, ``impl`` / MODEL.HLE.DECODE.IMPL; the reference lives beside the op: it only takes
   tensors and returns tensors): repeatedly take the highest remaining candidate i, compute the
   kernel ``Phi(e_i, e_k) = exp(-d_cos(e_i, e_k) / (2 sigma_i^2) - |rho_i - rho_k|^2 /
   (2 sigma_spatial^2))`` against every pixel k (:func:`seed_kernel_row`), threshold it into the
   seed's mask, keep for each pixel the seed with the highest Phi among the seeds whose mask
   holds it (per-pixel argmax over seeds, streamed so no K x P matrix is formed), and suppress
   the candidates this seed absorbs (``Phi(e_i, e_j) > merge_threshold``: seeds of one object
   are merged).
4. The class of an instance is the semantic class at its seed pixel.
5. Stuff: pixels of stuff class k with ``psi_k > stuff_threshold`` (fewer false positives).
6. Segments are painted with the shared :class:`PanopticSegments` accumulator.

Fast variant (``downsample > 1``; the paper's supplementary, "post-processing on a down-sampled
embedding space"): steps 2-3 run on the embedding, variance and seed maps average-pooled by the
factor (embeddings re-normalised, positions at the pooled pixel centres), then every
full-resolution thing pixel is assigned to its best seed by :func:`assign_pixels_to_seeds`
(thresholded per-pixel argmax of Phi over the found seeds).

Shape shorthand:
    D: embedding dimension, C: classes, H, W: decoding size, P = H * W, K: seeds
"""

from typing import Dict, Iterable, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ...layers.hle_decode import (  # the inner loops: compiled ops beside their references
    assign_pixels_to_seeds,
    greedy_seed_clustering,
    hle_assign_pixels_to_seeds,
    hle_greedy_seed_clustering,
    seed_kernel_row,
)
from .panoptic_segments import PanopticSegments

__all__ = [
    "assign_pixels_to_seeds",
    "embedding_to_rgb",
    "greedy_seed_clustering",
    "hle_panoptic_decode",
    "seed_candidates",
    "seed_kernel_row",
]


def _positions(height: int, width: int, coord_scale: float, device, stride: float = 1.0):
    """(P, 2) (row, column) / coord_scale of the pixel centres of a map at ``stride``."""
    offset = (stride - 1.0) / 2.0  # centre of a stride x stride block, in input pixels
    ys = (torch.arange(height, device=device, dtype=torch.float32) * stride + offset) / coord_scale
    xs = (torch.arange(width, device=device, dtype=torch.float32) * stride + offset) / coord_scale
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)


def seed_candidates(
    seed: torch.Tensor, allowed: torch.Tensor, threshold: float, nms_kernel: int = 3
) -> torch.Tensor:
    """Candidate seeds: local maxima of the seed map (max-pool NMS) above ``threshold``.

    Args:
        seed (Tensor): (H, W) seed scores.
        allowed (Tensor): (H, W) bool, pixels that may be seeds (thing pixels).
        threshold (float): minimum seed score (strict).
        nms_kernel (int): odd max-pool window.

    Returns:
        Tensor: (K,) int64 flat indices, by decreasing seed score (ties: lower index first).
    """
    pooled = F.max_pool2d(seed[None, None], nms_kernel, stride=1, padding=nms_kernel // 2)[0, 0]
    keep = (seed == pooled) & (seed > threshold) & allowed  # (H, W)
    idx = keep.reshape(-1).nonzero().squeeze(1)  # (K,)
    scores = seed.reshape(-1)[idx]
    order = torch.sort(scores, descending=True, stable=True).indices
    return idx[order]


def hle_panoptic_decode(
    embedding: torch.Tensor,
    sigma: torch.Tensor,
    seed: torch.Tensor,
    sem_probs: torch.Tensor,
    *,
    thing_ids: Iterable[int],
    spatial_sigma: float,
    coord_scale: float,
    seed_threshold: float = 0.5,
    nms_kernel: int = 3,
    mask_threshold: float = 0.5,
    merge_threshold: float = 0.5,
    stuff_threshold: float = 0.5,
    thing_min_area: int = 0,
    stuff_min_area: int = 0,
    max_instances: int = 200,
    downsample: int = 1,
    impl: str = "auto",
) -> Dict:
    """Panoptic segmentation of one image from its HLE outputs (module docstring, steps 1-6).

    Args:
        embedding (Tensor): (D, H, W) unit instance embeddings.
        sigma (Tensor): (H, W) predicted instance variances.
        seed (Tensor): (H, W) seed scores in [0, 1].
        sem_probs (Tensor): (C, H, W) class probabilities psi.
        thing_ids (iterable[int]): contiguous thing classes.
        spatial_sigma (float): learned spatial bandwidth (positions in ``coord_scale`` pixels).
        coord_scale (float): position unit used in training (MODEL.HLE.COORD_SCALE).
        seed_threshold, nms_kernel, mask_threshold, merge_threshold, stuff_threshold,
        thing_min_area, stuff_min_area, max_instances, downsample: MODEL.HLE.DECODE.*.
        impl (str): the inner loops (step 3, the fast variant's assignment): "auto" (the compiled
            op of ``layers/hle_decode.py`` when built, else the reference), "ext" or "pytorch"
            (MODEL.HLE.DECODE.IMPL).

    Returns:
        dict: "panoptic_seg" (H, W) int32 (0 void), "segments_info" (list of dict),
        "instance_masks" (N, H, W) bool, "instance_classes" (N,) int64, "instance_scores" (N,)
        float (seed score of each kept instance).
    """
    d, h, w = embedding.shape
    device = embedding.device
    thing_ids = sorted(set(int(t) for t in thing_ids))
    sem = sem_probs.argmax(dim=0)  # (H, W)
    is_thing = torch.zeros(sem_probs.shape[0], dtype=torch.bool, device=device)
    if thing_ids:
        is_thing[torch.as_tensor(thing_ids, device=device)] = True
    thing_pixels = is_thing[sem]  # (H, W)
    emb_flat = embedding.reshape(d, -1).t()  # (P, D)
    pos = _positions(h, w, coord_scale, device)  # (P, 2)
    kw = dict(spatial_sigma=float(spatial_sigma), mask_threshold=mask_threshold, impl=impl)

    if downsample <= 1:
        cand = seed_candidates(seed, thing_pixels, seed_threshold, nms_kernel)
        labels, seeds, _ = hle_greedy_seed_clustering(
            cand,
            emb_flat,
            pos,
            sigma.reshape(-1),
            thing_pixels.reshape(-1),
            merge_threshold=merge_threshold,
            max_instances=max_instances,
            **kw,
        )
        seed_classes = sem.reshape(-1)[seeds]
        seed_scores = seed.reshape(-1)[seeds]
    else:
        f = int(downsample)
        emb_s = F.normalize(F.avg_pool2d(embedding[None], f, ceil_mode=True)[0], dim=0)
        sig_s = F.avg_pool2d(sigma[None, None], f, ceil_mode=True)[0, 0]
        seed_s = F.avg_pool2d(seed[None, None], f, ceil_mode=True)[0, 0]
        probs_s = F.avg_pool2d(sem_probs[None], f, ceil_mode=True)[0]
        sem_s = probs_s.argmax(dim=0)
        thing_s = is_thing[sem_s]
        hs, ws = seed_s.shape
        emb_s_flat = emb_s.reshape(d, -1).t()
        pos_s = _positions(hs, ws, coord_scale, device, stride=float(f))
        cand = seed_candidates(seed_s, thing_s, seed_threshold, nms_kernel)
        _, seeds_s, _ = hle_greedy_seed_clustering(
            cand,
            emb_s_flat,
            pos_s,
            sig_s.reshape(-1),
            thing_s.reshape(-1),
            merge_threshold=merge_threshold,
            max_instances=max_instances,
            **kw,
        )
        labels = hle_assign_pixels_to_seeds(
            emb_s_flat[seeds_s],
            pos_s[seeds_s],
            sig_s.reshape(-1)[seeds_s],
            emb_flat,
            pos,
            thing_pixels.reshape(-1),
            **kw,
        )
        seed_classes = sem_s.reshape(-1)[seeds_s]
        seed_scores = seed_s.reshape(-1)[seeds_s]

    segments = PanopticSegments((h, w), device, thing_ids=thing_ids)
    labels = labels.reshape(h, w)
    masks, classes, scores = [], [], []
    for k in range(int(seed_classes.numel())):
        mask = labels == k
        if int(mask.sum()) < max(thing_min_area, 1):
            continue
        if segments.add(mask, int(seed_classes[k])):
            masks.append(mask)
            classes.append(int(seed_classes[k]))
            scores.append(float(seed_scores[k]))
    for c in range(sem_probs.shape[0]):
        if c in thing_ids:
            continue
        mask = (sem == c) & (sem_probs[c] > stuff_threshold)
        if int(mask.sum()) < max(stuff_min_area, 1):
            continue
        segments.add(mask, c)
    panoptic_seg, segments_info = segments.result()
    return {
        "panoptic_seg": panoptic_seg,
        "segments_info": segments_info,
        "instance_masks": (
            torch.stack(masks) if masks else torch.zeros((0, h, w), dtype=torch.bool, device=device)
        ),
        "instance_classes": torch.as_tensor(classes, dtype=torch.int64, device=device),
        "instance_scores": torch.as_tensor(scores, dtype=torch.float32, device=device),
    }


def embedding_to_rgb(embedding: torch.Tensor, dims: Optional[Tuple[int, int, int]] = None):
    """The demo picture of Fig. 3 / 8: three embedding dimensions as RGB.

    Each unit-embedding component lies in [-1, 1] and is mapped linearly to [0, 255].

    Args:
        embedding (Tensor): (D, H, W) unit embeddings (D >= 1; missing channels are 0).
        dims (tuple[int, int, int] or None): the dimensions shown; default the first three.

    Returns:
        np.ndarray: (H, W, 3) uint8 RGB.
    """
    dims = tuple(dims) if dims is not None else (0, 1, 2)
    d = embedding.shape[0]
    chans = [embedding[i] if i < d else torch.zeros_like(embedding[0]) for i in dims]  # 3 x (H, W)
    rgb = ((torch.stack(chans, dim=-1).clamp(-1, 1) + 1.0) * 127.5).round()
    return rgb.to(torch.uint8).cpu().numpy().astype(np.uint8)
