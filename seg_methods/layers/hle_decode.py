"""Compiled HLE decoding kernel (Hierarchical Lovász Embeddings, Sec. 3.5).

Drop-in replacements of the inner loops of the panoptic decoding of
``seg_methods/modeling/postprocessing/hle_decoding.py``, beside their pure-PyTorch references
(same arguments, same results):

* :func:`hle_seed_kernel_row` for ``seed_kernel_row``: the instance kernel of a seed against every
  pixel (Eq. 7-8 with the seed as the mean, Sec. 3.5),
  ``Phi(e_i, e_k) = exp(-d_cos(e_i, e_k) / (2 sigma_i^2) - |rho_i - rho_k|^2 / (2 sigma_sp^2))``
  with ``d_cos(a, b) = 1 - a^T b``;
* :func:`hle_greedy_seed_clustering` for ``greedy_seed_clustering``: greedy seed suppression
  (a later candidate j is merged into seed i when ``Phi(e_i, e_j) > merge_threshold``), the
  thresholded kernel of every kept seed and the per-pixel argmax over the seeds (in seed order,
  ties keep the earlier seed);
* :func:`hle_assign_pixels_to_seeds` for ``assign_pixels_to_seeds`` (the fast variant's last step).

The compiled op (``torch.ops.seg_methods.hle_*``, CPU and CUDA kernels in
``layers/csrc/hle_decode/``) never forms a (K, P) matrix nor a (P,) temporary per seed: it selects
the seeds over the candidates alone (which seeds are kept only depends on Phi between
candidates), then makes one pass over the pixels of ``pixel_mask``, each scanning the kept seeds
in order; on the CPU it skips, per group of 64 pixels, the seeds that provably cannot make any of
them join (a conservative bound of Phi over the group), and computes ``exp`` only where a pixel may
join. The decisions are the same comparisons as the reference's (``Phi > mask_threshold``,
``Phi > best``, ``Phi <= merge``) on the same formula evaluated in the same order, so labels and
seeds are identical except where two values are equal to within rounding (a dot product summed in
another order, a 1-ulp different ``exp``); ``best`` agrees to rounding.

Forward only: decoding has no gradient. The op registers no autograd formula; the wrappers pass
detached tensors, so the results never require grad.

``impl="auto"`` runs the compiled op when it is built for the inputs' device and falls back to the
reference otherwise; ``impl="ext"`` requires the op; ``impl="pytorch"`` always runs the reference
(:func:`seed_kernel_row`, :func:`greedy_seed_clustering`, :func:`assign_pixels_to_seeds`, in this
file; ``hle_decoding`` re-exports them). The op computes in the embeddings' dtype
(float32 or float64; half precision runs in float32 and ``best`` / the row are cast back) and casts
positions, sigmas and seed values to it; the reference instead mixes float32 positions into a
float64 computation, so float64 parity needs float64 positions.

Shape shorthand:
    P: pixels (H * W), D: embedding dimension, K0: candidate seeds, K: seeds.
"""

from typing import List, Tuple

import torch

from seg_methods.utils.ext import ext_has_cuda, has_op

__all__ = [
    "assign_pixels_to_seeds",
    "greedy_seed_clustering",
    "hle_assign_pixels_to_seeds",
    "hle_greedy_seed_clustering",
    "hle_seed_kernel_row",
    "seed_kernel_row",
]

_IMPLS = ("auto", "ext", "pytorch")
_OPS = ("hle_kernel_rows", "hle_assign_pixels", "hle_seed_clustering")


def _use_ext(tensor: torch.Tensor, impl: str, what: str) -> bool:
    """Whether to run the compiled op on ``tensor``'s device for ``impl``."""
    if impl not in _IMPLS:
        raise ValueError(f"{what}: impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "pytorch":
        return False
    available = all(has_op(name) for name in _OPS)
    device_ok = tensor.device.type == "cpu" or (tensor.device.type == "cuda" and ext_has_cuda())
    if impl == "ext" and not (available and device_ok):
        raise RuntimeError(
            f"{what}: impl='ext' needs the compiled ops {_OPS} of seg_methods._C for device "
            f"{tensor.device}; they are {'built' if available else 'not built'}"
            + ("" if device_ok else " but not for this device")
            + ". Use impl='auto' to fall back to the pure-PyTorch reference."
        )
    return available and device_ok


def _kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the compiled kernels run in (float32 for half precision)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _as(t, dtype: torch.dtype, device) -> torch.Tensor:
    """``t`` (tensor or number) detached, as ``dtype`` on ``device``."""
    return torch.as_tensor(t, device=device).detach().to(dtype)


# ------------------------------------------------------------------------------------------------
# pure-PyTorch references (the decoding of Sec. 3.5 as first written; the ops reproduce them)
# ------------------------------------------------------------------------------------------------
def seed_kernel_row(
    seed_embedding: torch.Tensor,
    seed_position: torch.Tensor,
    seed_sigma: torch.Tensor,
    embeddings: torch.Tensor,
    positions: torch.Tensor,
    spatial_sigma: float,
) -> torch.Tensor:
    """Phi of one seed against every pixel (Sec. 3.5; Eq. 8 with the seed as the mean).

    Args:
        seed_embedding (Tensor): (D,) unit embedding e_i of the seed.
        seed_position (Tensor): (2,) its position rho_i.
        seed_sigma (Tensor): scalar, its predicted variance sigma_i.
        embeddings (Tensor): (P, D) unit pixel embeddings.
        positions (Tensor): (P, 2) pixel positions.
        spatial_sigma (float): the learned spatial bandwidth.

    Returns:
        Tensor: (P,) in (0, 1].
    """
    d_cos = 1.0 - embeddings @ seed_embedding  # (P,)
    d_pos = ((positions - seed_position) ** 2).sum(dim=1)  # (P,)
    return torch.exp(-d_cos / (2.0 * seed_sigma**2) - d_pos / (2.0 * spatial_sigma**2))


def greedy_seed_clustering(
    candidates: torch.Tensor,
    embeddings: torch.Tensor,
    positions: torch.Tensor,
    sigmas: torch.Tensor,
    pixel_mask: torch.Tensor,
    *,
    spatial_sigma: float,
    mask_threshold: float,
    merge_threshold: float,
    max_instances: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 3 of the module docstring: seeds in order, their kernel, threshold, per-pixel argmax
    over seeds, seed suppression. A compiled kernel replaces this function one for one.

    Args:
        candidates (Tensor): (K0,) flat pixel indices, by decreasing seed score.
        embeddings (Tensor): (P, D) unit embeddings.
        positions (Tensor): (P, 2).
        sigmas (Tensor): (P,) predicted instance variances.
        pixel_mask (Tensor): (P,) bool, pixels that may join an instance (thing pixels).
        spatial_sigma (float): spatial bandwidth.
        mask_threshold (float): ``Phi > mask_threshold``: the pixel is in the seed's mask.
        merge_threshold (float): ``Phi(seed, candidate) > merge_threshold``: candidate merged.
        max_instances (int): at most this many seeds are taken.

    Returns:
        (Tensor, Tensor, Tensor): labels (P,) int64 in [-1, K) (-1: no instance), seeds (K,)
        int64 flat indices of the kept seeds, best (P,) float the winning Phi (0 where -1).
    """
    num_pixels = embeddings.shape[0]
    labels = torch.full((num_pixels,), -1, dtype=torch.int64, device=embeddings.device)
    best = torch.zeros(num_pixels, dtype=embeddings.dtype, device=embeddings.device)
    active = torch.ones(candidates.numel(), dtype=torch.bool, device=embeddings.device)
    seeds: List[int] = []
    for c in range(candidates.numel()):
        if len(seeds) >= max_instances:
            break
        if not bool(active[c]):
            continue
        i = int(candidates[c])
        row = seed_kernel_row(
            embeddings[i], positions[i], sigmas[i], embeddings, positions, spatial_sigma
        )  # (P,)
        take = pixel_mask & (row > mask_threshold) & (row > best)
        labels[take] = len(seeds)
        best[take] = row[take]
        seeds.append(i)
        active &= row[candidates] <= merge_threshold  # seed suppression (merging)
        active[c] = False
    seeds_t = torch.as_tensor(seeds, dtype=torch.int64, device=embeddings.device)
    return labels, seeds_t, best


def assign_pixels_to_seeds(
    seed_embeddings: torch.Tensor,
    seed_positions: torch.Tensor,
    seed_sigmas: torch.Tensor,
    embeddings: torch.Tensor,
    positions: torch.Tensor,
    pixel_mask: torch.Tensor,
    *,
    spatial_sigma: float,
    mask_threshold: float,
) -> torch.Tensor:
    """Thresholded per-pixel argmax of Phi over given seeds (the fast variant's last step).

    Args:
        seed_embeddings (Tensor): (K, D); seed_positions (K, 2); seed_sigmas (K,).
        embeddings (Tensor): (P, D); positions (P, 2); pixel_mask (P,) bool.

    Returns:
        Tensor: (P,) int64 labels in [-1, K).
    """
    labels = torch.full((embeddings.shape[0],), -1, dtype=torch.int64, device=embeddings.device)
    best = torch.zeros(embeddings.shape[0], dtype=embeddings.dtype, device=embeddings.device)
    for k in range(seed_embeddings.shape[0]):
        row = seed_kernel_row(
            seed_embeddings[k],
            seed_positions[k],
            seed_sigmas[k],
            embeddings,
            positions,
            spatial_sigma,
        )
        take = pixel_mask & (row > mask_threshold) & (row > best)
        labels[take] = k
        best[take] = row[take]
    return labels


# ------------------------------------------------------------------------------------------------
# compiled ops, falling back to the references
# ------------------------------------------------------------------------------------------------
def hle_seed_kernel_row(
    seed_embedding: torch.Tensor,
    seed_position: torch.Tensor,
    seed_sigma: torch.Tensor,
    embeddings: torch.Tensor,
    positions: torch.Tensor,
    spatial_sigma: float,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """Phi of one seed against every pixel (Sec. 3.5; Eq. 8 with the seed as the mean).

    Same arguments and result as ``hle_decoding.seed_kernel_row``.

    Args:
        seed_embedding (Tensor): (D,) unit embedding e_i of the seed.
        seed_position (Tensor): (2,) its position rho_i.
        seed_sigma (Tensor or float): scalar, its predicted variance sigma_i.
        embeddings (Tensor): (P, D) unit pixel embeddings (any strides).
        positions (Tensor): (P, 2) pixel positions.
        spatial_sigma (float): the learned spatial bandwidth.
        impl (str): "auto", "ext" (compiled op, error if unavailable) or "pytorch".

    Returns:
        Tensor: (P,) in (0, 1] for unit embeddings, in the dtype of ``embeddings``.
    """
    if not _use_ext(embeddings, impl, "hle_seed_kernel_row"):
        return seed_kernel_row(
            seed_embedding, seed_position, seed_sigma, embeddings, positions, spatial_sigma
        )
    dtype, dev = _kernel_dtype(embeddings.dtype), embeddings.device
    rows = torch.ops.seg_methods.hle_kernel_rows(
        _as(seed_embedding, dtype, dev).reshape(1, -1),
        _as(seed_position, dtype, dev).reshape(1, 2),
        _as(seed_sigma, dtype, dev).reshape(1),
        embeddings.detach().to(dtype),
        _as(positions, dtype, dev),
        float(spatial_sigma),
    )  # (1, P)
    return rows[0].to(embeddings.dtype)


def hle_greedy_seed_clustering(
    candidates: torch.Tensor,
    embeddings: torch.Tensor,
    positions: torch.Tensor,
    sigmas: torch.Tensor,
    pixel_mask: torch.Tensor,
    *,
    spatial_sigma: float,
    mask_threshold: float,
    merge_threshold: float,
    max_instances: int,
    impl: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy seed clustering of the HLE decoding (Sec. 3.5): seeds in order, their kernel,
    threshold, per-pixel argmax over seeds, seed suppression.

    Same arguments and results as ``hle_decoding.greedy_seed_clustering``.

    Args:
        candidates (Tensor): (K0,) int64 flat pixel indices, by decreasing seed score.
        embeddings (Tensor): (P, D) unit embeddings (any strides: the (D, H, W) map's
            ``reshape(D, -1).t()`` is read in place).
        positions (Tensor): (P, 2).
        sigmas (Tensor): (P,) predicted instance variances.
        pixel_mask (Tensor): (P,) bool, pixels that may join an instance (thing pixels).
        spatial_sigma (float): spatial bandwidth.
        mask_threshold (float): ``Phi > mask_threshold``: the pixel is in the seed's mask.
        merge_threshold (float): ``Phi(seed, candidate) > merge_threshold``: candidate merged.
        max_instances (int): at most this many seeds are taken.
        impl (str): "auto", "ext" (compiled op, error if unavailable) or "pytorch".

    Returns:
        (Tensor, Tensor, Tensor): labels (P,) int64 in [-1, K) (-1: no instance), seeds (K,)
        int64 flat indices of the kept seeds, best (P,) the winning Phi (0 where -1), in the
        dtype of ``embeddings``.
    """
    kw = dict(
        spatial_sigma=spatial_sigma,
        mask_threshold=mask_threshold,
        merge_threshold=merge_threshold,
        max_instances=max_instances,
    )
    if not _use_ext(embeddings, impl, "hle_greedy_seed_clustering"):
        return greedy_seed_clustering(candidates, embeddings, positions, sigmas, pixel_mask, **kw)
    dtype, dev = _kernel_dtype(embeddings.dtype), embeddings.device
    labels, seeds, best = torch.ops.seg_methods.hle_seed_clustering(
        torch.as_tensor(candidates, dtype=torch.int64, device=dev).reshape(-1),
        embeddings.detach().to(dtype),
        _as(positions, dtype, dev),
        _as(sigmas, dtype, dev),
        torch.as_tensor(pixel_mask, device=dev).to(torch.bool),
        float(spatial_sigma),
        float(mask_threshold),
        float(merge_threshold),
        int(max_instances),
    )
    return labels, seeds, best.to(embeddings.dtype)


def hle_assign_pixels_to_seeds(
    seed_embeddings: torch.Tensor,
    seed_positions: torch.Tensor,
    seed_sigmas: torch.Tensor,
    embeddings: torch.Tensor,
    positions: torch.Tensor,
    pixel_mask: torch.Tensor,
    *,
    spatial_sigma: float,
    mask_threshold: float,
    impl: str = "auto",
) -> torch.Tensor:
    """Thresholded per-pixel argmax of Phi over given seeds (the fast variant's last step).

    Same arguments and result as ``hle_decoding.assign_pixels_to_seeds``.

    Args:
        seed_embeddings (Tensor): (K, D); seed_positions (K, 2); seed_sigmas (K,).
        embeddings (Tensor): (P, D) (any strides); positions (P, 2); pixel_mask (P,) bool.
        spatial_sigma (float): spatial bandwidth.
        mask_threshold (float): ``Phi > mask_threshold``: the pixel may join the seed.
        impl (str): "auto", "ext" (compiled op, error if unavailable) or "pytorch".

    Returns:
        Tensor: (P,) int64 labels in [-1, K).
    """
    if not _use_ext(embeddings, impl, "hle_assign_pixels_to_seeds"):
        return assign_pixels_to_seeds(
            seed_embeddings,
            seed_positions,
            seed_sigmas,
            embeddings,
            positions,
            pixel_mask,
            spatial_sigma=spatial_sigma,
            mask_threshold=mask_threshold,
        )
    dtype, dev = _kernel_dtype(embeddings.dtype), embeddings.device
    labels, _ = torch.ops.seg_methods.hle_assign_pixels(
        _as(seed_embeddings, dtype, dev),
        _as(seed_positions, dtype, dev),
        _as(seed_sigmas, dtype, dev),
        embeddings.detach().to(dtype),
        _as(positions, dtype, dev),
        torch.as_tensor(pixel_mask, device=dev).to(torch.bool),
        float(spatial_sigma),
        float(mask_threshold),
    )
    return labels
