"""RegProxy: semantic segmentation by early region proxy, in the per-pixel template.

Zhang et al., "Semantic Segmentation by Early Region Proxy" (CVPR 2022); official code
YiF-Zhang/RegionProxy (``models/proxy_head.py``, ``models/vit.py``), read for understanding.

The ViT's patch tokens are the region proxies. Each token's class logits come from ONE linear
layer on the last layer's tokens (Sec. 3.2, "region classification"). Each output pixel at 1/4
resolution (rh x rw = 4 x 4 pixels per 16-pixel token; 1/8 for the hybrids R26+ViT-S/32 and
R50+ViT-L/32, whose 32-pixel tokens keep the official ``region_res=(4, 4)``) is associated
with the 3 x 3 neighbouring tokens of its own token by a softmax over 9 affinity logits
predicted from a MIDDLE layer's tokens (for the hybrids: the token embedding, i.e. the projected
ResNet stem features + position embedding) by the proxy head (a depthwise-separable 3x3 conv
then a 1x1 conv to 9 x rh x rw channels per token; Sec. 3.3, "local region-pixel
association"); neighbours outside the token grid are excluded before the softmax. The pixel's
class logits are the association-weighted sum of the 9 tokens' LOGITS (Eq. 3), painted by
:func:`seg_methods.layers.token_association.token_association` (the compiled op, or its
unfold-based PyTorch reference). Training: plain per-pixel cross-entropy on the logits resized
bilinearly (align_corners=False) to the input (the template's default loss, void excluded); no
auxiliary loss. Testing: the template's whole-image or sliding-window strategy
(``TEST.PER_PIXEL``).

Parameter layout follows the official head so that its checkpoints map one-to-one
(``decode_head.affinity_head.0.depthwise_conv`` -> ``sem_seg_head.affinity_head.depthwise``,
``.pointwise_conv`` -> ``.pointwise``, ``affinity_head.1.conv`` -> ``.predictor``,
``decode_head.mlp.0.0`` -> ``sem_seg_head.classifier``); the 1x1 predictor keeps the official
channel order ``n * rh * rw + py * rw + px`` (neighbour-major, 3x3 raster order as F.unfold).

Shape shorthand:
    B: batch, D: token width, C: classes, h, w: token grid, (rh, rw): pixels per token
"""

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY
from torch import nn

from ...layers.token_association import token_association
from .per_pixel import PerPixelSemanticModel

__all__ = ["RegionProxyHead", "RegProxy", "ASSOCIATION_IMPLS"]

ASSOCIATION_IMPLS = ("auto", "op", "pytorch")


@SEM_SEG_HEADS_REGISTRY.register()
class RegionProxyHead(nn.Module):
    """Token classifier + proxy (association) head + association painting.

    ``layers(features)`` returns (B, C, h * rh, w * rw) logits; the per-pixel template upsamples
    them, computes the loss and runs the test-time strategy.
    """

    @configurable
    def __init__(
        self,
        *,
        assoc_feature: str,
        cls_feature: str,
        assoc_channels: int,
        cls_channels: int,
        channels: int,
        num_classes: int,
        region_res: Sequence[int],
        norm: str = "SyncBN",
        impl: str = "auto",
    ):
        """
        Args:
            assoc_feature (str): backbone output the association comes from (a middle layer).
            cls_feature (str): backbone output whose tokens are classified (the last layer).
            assoc_channels, cls_channels (int): their widths D.
            channels (int): width of the depthwise-separable conv's output.
            num_classes (int): C.
            region_res ((int, int)): (rh, rw) output pixels per token.
            norm (str): detectron2 norm name of the depthwise-separable conv.
            impl (str): "auto", "op" or "pytorch" (see :func:`token_association`).
        """
        super().__init__()
        if len(region_res) != 2 or min(region_res) < 1:
            raise ValueError(
                f"MODEL.REGPROXY.REGION_RES must be two positive ints, got {region_res}"
            )
        if impl not in ASSOCIATION_IMPLS:
            raise ValueError(
                f"MODEL.REGPROXY.ASSOCIATION_IMPL must be one of {ASSOCIATION_IMPLS}, got {impl!r}"
            )
        self.assoc_feature, self.cls_feature = assoc_feature, cls_feature
        self.region_res = (int(region_res[0]), int(region_res[1]))
        self.impl = impl
        # mmcv DepthwiseSeparableConvModule: depthwise 3x3 + norm + ReLU, pointwise 1x1 + norm +
        # ReLU (bias only without a norm, mmcv's bias="auto").
        has_norm = bool(norm)
        self.depthwise = Conv2d(
            assoc_channels, assoc_channels, 3, padding=1, groups=assoc_channels,
            bias=not has_norm, norm=get_norm(norm, assoc_channels), activation=F.relu,
        )  # fmt: skip
        self.pointwise = Conv2d(
            assoc_channels, channels, 1, bias=not has_norm, norm=get_norm(norm, channels),
            activation=F.relu,
        )  # fmt: skip
        rh, rw = self.region_res
        self.predictor = Conv2d(channels, 9 * rh * rw, 1)
        self.classifier = nn.Linear(cls_channels, num_classes)
        # Official init: mmseg's decode-head init (the 1x1 predictor's bias is asserted 0) and a
        # truncated normal (std 0.02) for the linear classifier.
        for m in (self.depthwise, self.pointwise, self.predictor):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        r = cfg.MODEL.REGPROXY
        for key, name in (("ASSOC_FEATURE", r.ASSOC_FEATURE), ("CLS_FEATURE", r.CLS_FEATURE)):
            if name not in input_shape:
                raise ValueError(
                    f"MODEL.REGPROXY.{key} {name!r} is not a backbone output "
                    f"({sorted(input_shape)}; see MODEL.TIMM.OUT_FEATURES)"
                )
        a, c = input_shape[r.ASSOC_FEATURE], input_shape[r.CLS_FEATURE]
        if a.stride != c.stride:
            raise ValueError(
                f"MODEL.REGPROXY: ASSOC_FEATURE (stride {a.stride}) and CLS_FEATURE (stride "
                f"{c.stride}) must share one token grid"
            )
        return {
            "assoc_feature": r.ASSOC_FEATURE,
            "cls_feature": r.CLS_FEATURE,
            "assoc_channels": a.channels,
            "cls_channels": c.channels,
            "channels": r.CHANNELS or a.channels,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "region_res": list(r.REGION_RES),
            "norm": r.NORM,
            "impl": r.ASSOCIATION_IMPL,
        }

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) middle-layer tokens -> (B, 9 * rh * rw, h, w) association logits."""
        return self.predictor(self.pointwise(self.depthwise(x)))

    def token_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) last-layer tokens -> (B, C, h, w) class logits (one linear layer)."""
        return self.classifier(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def layers(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """
        Args:
            features (dict[str, Tensor]): backbone outputs; ASSOC_FEATURE and CLS_FEATURE are
                (B, D, h, w).

        Returns:
            Tensor: (B, C, h * rh, w * rw) class logits (1/4 resolution for patch 16 and
            4 x 4 pixels per token, 1/8 for patch 32).
        """
        return token_association(
            self.affinity(features[self.assoc_feature]),
            self.token_logits(features[self.cls_feature]),
            self.region_res,
            impl=self.impl,
        )

    def forward(self, features: Dict[str, torch.Tensor], targets: Optional[torch.Tensor] = None):
        """detectron2 head interface (not used by the template, which calls :meth:`layers`)."""
        return self.layers(features), {}


@META_ARCH_REGISTRY.register()
class RegProxy(PerPixelSemanticModel):
    """ViT backbone + :class:`RegionProxyHead` in the per-pixel template (see the module doc).

    Everything but the head is the template's: the loss is plain cross-entropy with void
    excluded, inference the shared whole-image / sliding-window strategy.
    """

    @classmethod
    def from_config(cls, cfg):
        if cfg.MODEL.SEM_SEG_HEAD.NAME != "RegionProxyHead":
            raise ValueError(
                "MODEL.META_ARCHITECTURE 'RegProxy' needs MODEL.SEM_SEG_HEAD.NAME "
                f"'RegionProxyHead', got {cfg.MODEL.SEM_SEG_HEAD.NAME!r}"
            )
        return super().from_config(cfg)
