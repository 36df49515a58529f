"""ClustSeg's pixel decoder: axial blocks at the two coarsest levels plus a top-down FPN path.

ClustSeg (Liang et al., ICML 2023) Sec. 3.3: "as in kMaX-DeepLab / CMT-DeepLab / Mask2Former, we use
six axial blocks, one at the L-th level and five at the (L-1)-th level". The backbone features are
projected to ``conv_dim`` channels; the coarsest one (1/32) goes through the first axial block(s),
is upsampled and added to the projected 1/16 feature, which goes through the other five; the 1/8
and 1/4 levels are fused top-down with a lateral 1x1 and an output 3x3 convolution (our choice:
the paper does not detail the finer levels). The 1/4 map gives the per-pixel mask embeddings; the
1/32, 1/16 and 1/8 maps feed the recurrent cross-attention decoders (two each).

``AxialBlock`` is the shared Axial-DeepLab block of :mod:`seg_methods.layers.axial`.

Shape shorthand:
    N: batch, C: conv_dim, H_s, W_s: size of the stride-s level
"""

from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from torch import nn
from torch.nn import functional as F

from ...layers.axial import AxialBlock
from ...layers.multi_scale import c2_conv
from ..build import PIXEL_DECODER_REGISTRY


@PIXEL_DECODER_REGISTRY.register()
class ClustSegAxialPixelDecoder(nn.Module):
    """Axial-attention pixel decoder (ClustSeg Sec. 3.3).

    ``forward_features(features)`` returns ``(mask_features (N, mask_dim, H/4, W/4),
    coarsest map (N, C, H/32, W/32), [maps at 1/32, 1/16, 1/8])``, the interface of the
    Mask2Former pixel decoder.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        conv_dim: int,
        mask_dim: int,
        norm: str,
        axial_blocks: List[int],
        axial_nheads: int,
        axial_span: int,
        axial_norm: str,
        num_outputs: int = 3,
    ):
        """
        Args:
            input_shape: backbone features used (name -> channels/stride), at least 2 levels.
            conv_dim: C, channels of every level.
            mask_dim: channels of the per-pixel mask embeddings.
            norm: norm of the projection / FPN convs ("GN", "BN", "" ...).
            axial_blocks: number of axial blocks at the coarsest levels, coarse first ([1, 5]).
            axial_nheads: heads of the axial attention.
            axial_span: span of the axial attention (global along an axis shorter than it).
            axial_norm: norm of the axial blocks ("BN", "SyncBN" or "").
            num_outputs: multi-scale maps returned for the decoders (3: 1/32, 1/16, 1/8).
        """
        super().__init__()
        shapes = sorted(input_shape.items(), key=lambda kv: kv[1].stride, reverse=True)
        self.in_features = [k for k, _ in shapes]  # low -> high resolution
        if len(axial_blocks) > len(shapes):
            raise ValueError(
                f"{len(axial_blocks)} axial levels requested but only {len(shapes)} input features"
            )
        if num_outputs > len(shapes):
            raise ValueError(f"num_outputs={num_outputs} > number of input features {len(shapes)}")
        self.input_proj = nn.ModuleList(
            c2_conv(spec.channels, conv_dim, 1, norm=norm) for _, spec in shapes
        )
        # axial stages at the coarsest levels (index 0 = 1/32)
        self.axial_stages = nn.ModuleList(
            nn.Sequential(
                *[
                    AxialBlock(
                        conv_dim,
                        conv_dim,
                        num_heads=axial_nheads,
                        span=axial_span,
                        norm=axial_norm,
                        activation="gelu",
                    )
                    for _ in range(n)
                ]
            )
            for n in axial_blocks
        )
        # 3x3 output convs of the finer levels (after the top-down sum)
        self.output_convs = nn.ModuleList(
            c2_conv(conv_dim, conv_dim, 3, norm=norm, activation=F.relu)
            for _ in range(len(shapes) - len(axial_blocks))
        )
        self.mask_features = c2_conv(conv_dim, mask_dim, 1)
        self.num_outputs = num_outputs
        self.conv_dim = conv_dim
        self.mask_dim = mask_dim

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        m = cfg.MODEL.AXIAL_PIXEL_DECODER
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in m.IN_FEATURES},
            "conv_dim": m.CONVS_DIM,
            "mask_dim": m.MASK_DIM,
            "norm": m.NORM,
            "axial_blocks": list(m.AXIAL_BLOCKS),
            "axial_nheads": m.AXIAL_NHEADS,
            "axial_span": m.AXIAL_SPAN,
            "axial_norm": m.AXIAL_NORM,
        }

    def forward_features(self, features: Dict[str, torch.Tensor]):
        """
        Args:
            features: backbone outputs, name -> (N, C_in, H_s, W_s).

        Returns:
            mask_features (N, mask_dim, H/4, W/4), the coarsest map (N, C, H/32, W/32), and a
            list of ``num_outputs`` maps (N, C, H_s, W_s) from low to high resolution.
        """
        outs = []
        prev = None
        for idx, name in enumerate(self.in_features):  # low -> high resolution
            x = self.input_proj[idx](features[name])
            if prev is not None:
                x = x + F.interpolate(prev, size=x.shape[-2:], mode="bilinear", align_corners=False)
            if idx < len(self.axial_stages):
                x = self.axial_stages[idx](x)
            else:
                x = self.output_convs[idx - len(self.axial_stages)](x)
            outs.append(x)
            prev = x
        return self.mask_features(outs[-1]), outs[0], outs[: self.num_outputs]
