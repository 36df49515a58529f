"""Axial-ResNet backbone (Axial-DeepLab, Wang et al. ECCV 2020) as used by CMT-DeepLab.

CMT-DeepLab Sec. 3.4 removes the transformer blocks of MaX-DeepLab-S, which "reverts the backbone
back to Axial-ResNet-50" with blocks [3, 4, 6, 3] (stages 2-5), and scales stage-4 to 24 blocks
for Axial-ResNet-104; activations are GeLU. Stages whose output stride is at least
``axial_beyond_stride`` are made of :class:`seg_methods.layers.AxialBlock` (the bottleneck with its
3x3 convolution replaced by height and width axial attention); earlier stages use conv
bottlenecks (:class:`seg_methods.layers.axial.ConvBottleneck`, the same residual plumbing).
The stem (three 3x3 convolutions, the first with stride 2, then 3x3 max-pooling) is
our choice in the style of the Inception stem of MaX-DeepLab.

The backbone optionally takes an extra stride-4 input added after the stem: the connection of the
Recursive Feature Network (CMT-DeepLab Sec. 3.4).

Shape shorthand:
    N: batch size, H, W: input size; res<k> has stride 2^k
"""

from typing import Dict, List, Optional, Sequence

from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from ...layers.axial import AxialBlock, ConvBottleneck, get_activation_module

__all__ = ["AxialResNet", "AXIAL_RESNET_DEPTHS"]

# blocks per stage (res2, res3, res4, res5)
AXIAL_RESNET_DEPTHS = {50: (3, 4, 6, 3), 104: (3, 4, 24, 3)}


@BACKBONE_REGISTRY.register()
class AxialResNet(Backbone):
    """Axial-ResNet-50 / -104 (configured by ``cfg.MODEL.AXIAL_RESNET``)."""

    @configurable
    def __init__(
        self,
        *,
        depth: int = 50,
        in_channels: int = 3,
        stem_channels: int = 128,
        axial_beyond_stride: int = 16,
        num_heads: int = 8,
        axial_bottleneck_ratio: int = 2,
        span: int = 129,
        norm: str = "BN",
        activation: str = "gelu",
        drop_path_rate: float = 0.2,
        out_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
        widths: Sequence[int] = (256, 512, 1024, 2048),
    ):
        """
        Args:
            depth (int): 50 or 104 (see :data:`AXIAL_RESNET_DEPTHS`).
            in_channels (int): input image channels.
            stem_channels (int): output channels of the stride-4 stem.
            axial_beyond_stride (int): stages with output stride >= this use axial blocks.
            num_heads (int): heads of every axial attention.
            axial_bottleneck_ratio (int): attention width of an axial block = its output
                channels // this.
            span (int): axial attention span.
            norm (str): "BN", "SyncBN" (or "" for none).
            activation (str): "gelu" or "relu".
            drop_path_rate (float): stochastic depth of the last block; it grows linearly from 0
                over all blocks.
            out_features (sequence[str]): subset of res2..res5 to return.
            widths (sequence[int]): output channels of res2..res5.
        """
        super().__init__()
        if depth not in AXIAL_RESNET_DEPTHS:
            raise ValueError(
                f"MODEL.AXIAL_RESNET.DEPTH must be one of {sorted(AXIAL_RESNET_DEPTHS)}, got {depth}"
            )
        half = stem_channels // 2
        self.stem = nn.Sequential(
            Conv2d(in_channels, half, 3, 2, 1, bias=not norm, norm=get_norm(norm, half)),
            get_activation_module(activation),
            Conv2d(half, half, 3, 1, 1, bias=not norm, norm=get_norm(norm, half)),
            get_activation_module(activation),
            Conv2d(half, stem_channels, 3, 1, 1, bias=not norm, norm=get_norm(norm, stem_channels)),
            get_activation_module(activation),
            nn.MaxPool2d(3, 2, 1),
        )
        blocks_per_stage = AXIAL_RESNET_DEPTHS[depth]
        total = sum(blocks_per_stage)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.stage_names: List[str] = []
        self._out_feature_channels: Dict[str, int] = {}
        self._out_feature_strides: Dict[str, int] = {}
        channels, k = stem_channels, 0
        for s, (num_blocks, width) in enumerate(zip(blocks_per_stage, widths)):
            name, stride = f"res{s + 2}", 2 ** (s + 2)
            blocks = []
            for i in range(num_blocks):
                common = dict(
                    stride=2 if (i == 0 and s > 0) else 1,
                    norm=norm,
                    activation=activation,
                    drop_path=rates[k],
                )
                if stride >= axial_beyond_stride:
                    block = AxialBlock(
                        channels,
                        width,
                        bottleneck_channels=width // axial_bottleneck_ratio,
                        num_heads=num_heads,
                        span=span,
                        **common,
                    )
                else:
                    block = ConvBottleneck(channels, width, **common)
                blocks.append(block)
                channels, k = width, k + 1
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            self._out_feature_channels[name] = width
            self._out_feature_strides[name] = stride
        self.stem_channels = stem_channels
        self._out_features = list(out_features)
        unknown = set(self._out_features) - set(self.stage_names)
        if unknown:
            raise ValueError(
                f"MODEL.AXIAL_RESNET.OUT_FEATURES: unknown {sorted(unknown)}, expected a subset of "
                f"{self.stage_names}"
            )

    @classmethod
    def from_config(cls, cfg, input_shape: Optional[ShapeSpec] = None):
        b = cfg.MODEL.AXIAL_RESNET
        return {
            "depth": b.DEPTH,
            "in_channels": input_shape.channels if input_shape is not None else 3,
            "stem_channels": b.STEM_CHANNELS,
            "axial_beyond_stride": b.AXIAL_BEYOND_STRIDE,
            "num_heads": b.NUM_HEADS,
            "axial_bottleneck_ratio": b.AXIAL_BOTTLENECK_RATIO,
            "span": b.SPAN,
            "norm": b.NORM,
            "activation": b.ACTIVATION,
            "drop_path_rate": b.DROP_PATH_RATE,
            "out_features": b.OUT_FEATURES,
            "widths": b.WIDTHS,
        }

    @property
    def size_divisibility(self) -> int:
        return 32

    def forward(self, x: Tensor, stride4_extra: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """
        Args:
            x (Tensor): (N, C_in, H, W) images.
            stride4_extra (Tensor or None): (N, stem_channels, ceil(H/4), ceil(W/4)) features
                added to the stem output (RFN connection).

        Returns:
            dict[str, Tensor]: "res<k>": (N, C_k, H / 2^k, W / 2^k) for the requested features.
        """
        y = self.stem(x)
        if stride4_extra is not None:
            y = y + F.interpolate(stride4_extra, size=y.shape[-2:], mode="bilinear")
        outputs = {}
        for name in self.stage_names:
            y = getattr(self, name)(y)
            if name in self._out_features:
                outputs[name] = y
        return outputs
