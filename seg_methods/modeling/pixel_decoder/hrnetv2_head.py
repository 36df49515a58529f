"""HRNetV2 semantic head: all HRNet branches upsampled to the finest one, concatenated, fused.

Registered in detectron2's SEM_SEG_HEADS_REGISTRY as ``HRNetV2Head``. This is the head of the
HRNetV2 segmentation models (Wang et al., "Deep High-Resolution Representation Learning for Visual
Recognition", TPAMI 2020) as used by ProtoSeg's official ``HRNet_W48_Proto`` (tfzhou/ProtoSeg
``lib/models/nets/hrnet.py``): branches bilinearly upsampled (``align_corners=True``) to the size
of the first one (1/4), concatenated (HRNet-W48: 48 + 96 + 192 + 384 = 720 channels), then a 3x3
conv (with bias) + norm + ReLU + Dropout2d(0.1). With ``num_classes`` set, a 1x1 conv (no bias)
predicts class logits (the plain HRNetV2 baseline); with ``num_classes=None`` ``layers`` returns
the fused features (what ProtoSeg uses).

State-dict layout: ``fuse.weight``, ``fuse.bias``, ``fuse.norm.*`` (the 3x3 conv and its norm),
``predictor.weight`` (only with classes).
"""

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

__all__ = ["HRNetV2Head"]


@SEM_SEG_HEADS_REGISTRY.register()
class HRNetV2Head(nn.Module):
    """Concatenate upsampled HRNet branches, fuse with a 3x3 conv block, optionally classify."""

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        in_features: Sequence[str],
        convs_dim: int,
        norm: str = "BN",
        dropout: float = 0.1,
        align_corners: bool = True,
        num_classes: Optional[int] = None,
        ignore_value: int = 255,
        loss_weight: float = 1.0,
    ):
        """
        Args:
            input_shape (dict[str, ShapeSpec]): backbone output shapes.
            in_features (list[str]): branch names, finest first; all are resized to the first.
            convs_dim (int): output channels of the fusing 3x3 conv (official: the concatenated
                channels, 720 for HRNet-W48).
            norm (str): detectron2 norm of the fusing conv ("BN", "SyncBN", ...; official
                SyncBN).
            dropout (float): Dropout2d probability after the fusing block (official 0.1).
            align_corners (bool): of the bilinear upsampling of the branches (official True).
            num_classes (int or None): None: no predictor, ``layers`` returns features.
            ignore_value (int): void label (only for this head's own loss in ``forward``).
            loss_weight (float): weight of this head's own loss in ``forward``.
        """
        super().__init__()
        missing = [f for f in in_features if f not in input_shape]
        if not in_features or missing:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.IN_FEATURES {list(in_features)}: {missing} not in the "
                f"backbone outputs {sorted(input_shape)}"
            )
        self.in_features = list(in_features)
        self.in_channels = sum(input_shape[f].channels for f in self.in_features)
        self.common_stride = input_shape[self.in_features[0]].stride
        self.align_corners = align_corners
        self.out_channels = convs_dim
        use_bias = True  # official: nn.Conv2d(..., bias=True) before its BN
        self.fuse = Conv2d(
            self.in_channels,
            convs_dim,
            kernel_size=3,
            padding=1,
            bias=use_bias,
            norm=get_norm(norm, convs_dim),
            activation=F.relu,
        )
        self.dropout = nn.Dropout2d(dropout)
        self.num_classes = num_classes
        self.ignore_value = ignore_value
        self.loss_weight = loss_weight
        self.predictor = (
            None
            if num_classes is None
            else Conv2d(convs_dim, num_classes, kernel_size=1, bias=False)
        )

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        h = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": input_shape,
            "in_features": list(h.IN_FEATURES),
            "convs_dim": h.CONVS_DIM,
            "norm": h.NORM,
            "num_classes": h.NUM_CLASSES,
            "ignore_value": h.IGNORE_VALUE,
            "loss_weight": h.LOSS_WEIGHT,
        }

    def layers(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """
        Args:
            features (dict[str, Tensor]): branch name -> (B, C_i, h_i, w_i).

        Returns:
            Tensor: (B, convs_dim, h_0, w_0) fused features, or (B, num_classes, h_0, w_0)
            logits when the head has a predictor.
        """
        first = features[self.in_features[0]]
        size = first.shape[-2:]
        feats: List[torch.Tensor] = [first]
        for name in self.in_features[1:]:
            feats.append(
                F.interpolate(
                    features[name], size=size, mode="bilinear", align_corners=self.align_corners
                )
            )
        x = self.dropout(self.fuse(torch.cat(feats, dim=1)))
        if self.predictor is not None:
            x = self.predictor(x)
        return x

    def forward(self, features: Dict[str, torch.Tensor], targets: Optional[torch.Tensor] = None):
        """detectron2 SemanticSegmentor interface (needs a predictor).

        Returns:
            training: (None, {"loss_sem_seg"}); inference: ((B, C, H, W) logits upsampled by the
            common stride, {}).
        """
        if self.predictor is None:
            raise ValueError("HRNetV2Head.forward needs MODEL.SEM_SEG_HEAD.NUM_CLASSES")
        x = F.interpolate(
            self.layers(features),
            scale_factor=self.common_stride,
            mode="bilinear",
            align_corners=False,
        )
        if self.training:
            loss = F.cross_entropy(x, targets, reduction="mean", ignore_index=self.ignore_value)
            return None, {"loss_sem_seg": loss * self.loss_weight}
        return x, {}
