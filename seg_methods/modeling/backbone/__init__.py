"""Backbones; importing a module registers it in detectron2's BACKBONE_REGISTRY."""

from .swin import D2SwinTransformer  # noqa: F401  registers "D2SwinTransformer"
from .axial_resnet import AxialResNet  # noqa: F401  registers "AxialResNet"
from .timm_backbone import TimmBackbone  # noqa: F401  registers "build_timm_backbone"
from .timm_vit import TimmViTBackbone  # noqa: F401  registers "build_timm_vit_backbone"
from .resnet_fpn_se import build_resnet_fpn_se_backbone  # noqa: F401  registers it
