"""Plumbing of multi-scale heads, written once: c2-initialised convolutions, per-level input
projections and level embeddings (Deformable DETR / Mask2Former), used by the pixel decoders
(Mask2Former's deformable-attention one, ClustSeg's axial one) and the query decoders (Mask2Former,
ClustSeg).

Modules built here keep the parameter names their callers had (a projection is a detectron2
``Conv2d``: ``weight``, ``bias`` or ``norm.*``), so public checkpoints load unchanged.

Shape shorthand:
    B: batch, C_in: input channels of a level, C: output channels, L: levels,
    H_l, W_l: size of level l
"""

from typing import Callable, List, Optional, Sequence, Tuple, Union

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.layers import Conv2d, get_norm
from torch import nn

__all__ = ["c2_conv", "level_input_projections", "project_levels"]


def c2_conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 1,
    *,
    norm: Union[str, Callable, None] = "",
    activation: Optional[Callable] = None,
) -> Conv2d:
    """A detectron2 ``Conv2d`` with "same" padding, initialised with ``c2_xavier_fill`` (the FPN
    and Mask2Former convention), with a bias only when it has no norm.

    Args:
        in_channels (int): C_in.
        out_channels (int): C.
        kernel_size (int): odd kernel size (padding ``kernel_size // 2``).
        norm (str or callable): detectron2 ``get_norm`` argument ("" or None = no norm).
        activation (callable or None): applied after the norm.

    Returns:
        Conv2d: (B, C_in, H, W) -> (B, C, H, W); parameters ``weight`` and ``bias`` or
        ``norm.*``.
    """
    norm_layer = get_norm(norm, out_channels) if norm else None
    conv = Conv2d(
        in_channels,
        out_channels,
        kernel_size=kernel_size,
        padding=kernel_size // 2,
        bias=norm_layer is None,
        norm=norm_layer,
        activation=activation,
    )
    weight_init.c2_xavier_fill(conv)
    return conv


def level_input_projections(
    in_channels: int, out_channels: int, num_levels: int, *, enforce: bool = False
) -> nn.ModuleList:
    """One 1x1 input projection per level (:func:`c2_conv`, with bias), or an identity (an empty
    ``nn.Sequential``, no parameters) when the channels already match and ``enforce`` is off.

    Args:
        in_channels (int): C_in of every level.
        out_channels (int): C.
        num_levels (int): L.
        enforce (bool): project even when C_in == C (Mask2Former's ENFORCE_INPUT_PROJ).

    Returns:
        nn.ModuleList: L modules; parameter names ``{l}.weight``, ``{l}.bias``.
    """
    projections = nn.ModuleList()
    for _ in range(num_levels):
        if in_channels != out_channels or enforce:
            projections.append(c2_conv(in_channels, out_channels, 1))
        else:
            projections.append(nn.Sequential())
    return projections


def project_levels(
    features: Sequence[torch.Tensor],
    input_proj: Sequence[nn.Module],
    pe_layer: nn.Module,
    level_embed: Optional[torch.Tensor] = None,
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Project every level and encode its positions.

    For level l: ``src_l = input_proj[l](x_l) + level_embed[l]`` (the level embedding, broadcast
    over the pixels, only when given) and ``pos_l = pe_layer(x_l)``. Deformable DETR and
    Mask2Former's pixel decoder add their level embedding to the positions instead; they pass no
    ``level_embed`` here and add it where they flatten the levels.

    Args:
        features (sequence[Tensor]): L maps (B, C_in, H_l, W_l).
        input_proj (sequence[nn.Module]): L modules (B, C_in, H_l, W_l) -> (B, C, H_l, W_l).
        pe_layer (nn.Module): positional encoding, (B, *, H_l, W_l) -> (B, C, H_l, W_l).
        level_embed (Tensor or None): (L, C).

    Returns:
        tuple[list[Tensor], list[Tensor]]: ``src`` and ``pos``, L tensors (B, C, H_l, W_l) each.
    """
    if len(features) != len(input_proj):
        raise ValueError(f"{len(features)} feature levels for {len(input_proj)} input projections")
    srcs, poss = [], []
    for lvl, x in enumerate(features):
        s = input_proj[lvl](x)
        if level_embed is not None:
            s = s + level_embed[lvl][None, :, None, None]
        srcs.append(s)
        poss.append(pe_layer(x))
    return srcs, poss
