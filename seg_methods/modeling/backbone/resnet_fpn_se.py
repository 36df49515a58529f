"""ResNet-FPN with squeeze-and-excitation on the top ResNet feature (Unifying T&I, Sec. 3.1).

"To encourage global consistency, we carry out a squeeze-and-excitation operation [11] on the
top-level ResNet feature before producing the first FPN feature." The backbone is detectron2's
``build_resnet_fpn_backbone`` unchanged; this builder appends torchvision's
``SqueezeExcitation`` (global average pool, 1x1 conv C -> C/r, ReLU, 1x1 conv C/r -> C, sigmoid,
channel-wise rescale) to the last ResNet stage that feeds the FPN. It is added as a child of that
stage (``bottom_up.res5.se``), so every detectron2 / ImageNet ResNet-FPN parameter keeps its name
and checkpoints load (the SE weights are then the only missing keys).

Registered as ``build_resnet_fpn_se_backbone``; reads
``MODEL.DENSE_AFFINITY_PANOPTIC.SE_REDUCTION``.
"""

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone
from torch import nn
from torchvision.ops import SqueezeExcitation

__all__ = ["add_top_squeeze_excitation", "build_resnet_fpn_se_backbone"]


def add_top_squeeze_excitation(fpn: Backbone, reduction: int) -> nn.Module:
    """Append squeeze-and-excitation to the top bottom-up stage an FPN reads.

    Args:
        fpn (Backbone): detectron2 ``FPN`` whose ``bottom_up`` is a detectron2 ``ResNet``.
        reduction (int): channel reduction ratio r (squeeze channels = max(1, C // r)).

    Returns:
        nn.Module: the added ``SqueezeExcitation`` module.
    """
    if reduction < 1:
        raise ValueError(
            f"MODEL.DENSE_AFFINITY_PANOPTIC.SE_REDUCTION must be >= 1, got {reduction}"
        )
    bottom_up = fpn.bottom_up
    top = fpn.in_features[-1]  # e.g. "res5": the highest-stride input of the FPN
    stage = getattr(bottom_up, top, None)
    if not isinstance(stage, nn.Sequential):
        raise ValueError(
            f"build_resnet_fpn_se_backbone: the FPN's top input '{top}' is not a stage "
            f"(nn.Sequential) of its bottom-up network {type(bottom_up).__name__}"
        )
    channels = bottom_up.output_shape()[top].channels
    se = SqueezeExcitation(channels, max(1, channels // reduction))
    # ResNet.forward runs its stages in order; the stage is an nn.Sequential, so a module
    # appended to it runs on the stage's output, before the FPN's lateral convolution.
    stage.add_module("se", se)
    return se


@BACKBONE_REGISTRY.register()
def build_resnet_fpn_se_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """detectron2's ResNet-FPN with squeeze-and-excitation on the top ResNet feature.

    Args:
        cfg (CfgNode): the config (``MODEL.RESNETS``, ``MODEL.FPN``,
            ``MODEL.DENSE_AFFINITY_PANOPTIC.SE_REDUCTION``).
        input_shape (ShapeSpec): input image shape.

    Returns:
        Backbone: the FPN (outputs p2..p6 with the default config).
    """
    fpn = build_resnet_fpn_backbone(cfg, input_shape)
    add_top_squeeze_excitation(fpn, cfg.MODEL.DENSE_AFFINITY_PANOPTIC.SE_REDUCTION)
    return fpn
