"""Mask2Former meta-architecture (Cheng et al., "Masked-attention Mask Transformer for Universal
Image Segmentation", CVPR 2022).

backbone -> multi-scale deformable-attention pixel decoder -> masked-attention transformer decoder
-> (class, mask) per query, trained with the shared set criterion and decoded by the shared
semantic / instance / panoptic inference (see :class:`MaskClassificationModel`).

The head is kept as ``sem_seg_head.pixel_decoder`` / ``sem_seg_head.predictor`` so that the public
Mask2Former checkpoints load with unchanged parameter names.
"""
from typing import Dict

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from torch import nn

from ..criterion import build_set_criterion
from .common import build_decoder_pair
from .mask_classification import MaskClassificationModel


class Mask2FormerHead(nn.Module):
    """Pixel decoder + transformer decoder (the official ``MaskFormerHead`` structure)."""

    def __init__(self, pixel_decoder: nn.Module, predictor: nn.Module, num_classes: int):
        super().__init__()
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor
        self.num_classes = num_classes

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        m = cfg.MODEL.MASK2FORMER
        pixel_decoder, predictor = build_decoder_pair(
            cfg, m.PIXEL_DECODER_NAME, m.TRANSFORMER_DECODER_NAME, input_shape
        )
        return cls(pixel_decoder, predictor, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)

    def forward(self, features):
        mask_features, _, multi_scale_features = self.pixel_decoder.forward_features(features)
        return self.predictor(multi_scale_features, mask_features)


@META_ARCH_REGISTRY.register()
class Mask2Former(MaskClassificationModel):
    """Mask2Former; see :class:`MaskClassificationModel` for inputs and outputs."""

    @configurable
    def __init__(self, **kwargs):
        super().__init__(**kwargs)

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        head = Mask2FormerHead.from_config(cfg, backbone.output_shape())
        num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        # auxiliary outputs: the learnable-query prediction and layers 1..DEC_LAYERS-1
        criterion = build_set_criterion(cfg, num_classes, cfg.MODEL.MASK2FORMER.DEC_LAYERS)
        size_divisibility = cfg.MODEL.MASK2FORMER.SIZE_DIVISIBILITY
        return cls.base_kwargs(cfg, backbone, head, criterion, size_divisibility)
