"""Backbones; importing a module registers it in detectron2's BACKBONE_REGISTRY."""

from .swin import D2SwinTransformer  # noqa: F401  registers "D2SwinTransformer"
from .axial_resnet import AxialResNet  # noqa: F401  registers "AxialResNet"
