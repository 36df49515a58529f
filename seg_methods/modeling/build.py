"""Every registry seg_methods declares, with its ``build_*`` function.

Meta-architectures and backbones use detectron2's own registries (META_ARCH_REGISTRY,
BACKBONE_REGISTRY). The registries below are for component families detectron2 does not have.
"""
from detectron2.utils.registry import Registry

PIXEL_DECODER_REGISTRY = Registry("PIXEL_DECODER")
PIXEL_DECODER_REGISTRY.__doc__ = """
Pixel decoders: multi-scale backbone features -> (per-pixel mask features, multi-scale features
for a transformer decoder). Called with (cfg, input_shape: Dict[str, ShapeSpec]).
"""

TRANSFORMER_DECODER_REGISTRY = Registry("TRANSFORMER_DECODER")
TRANSFORMER_DECODER_REGISTRY.__doc__ = """
Query-based transformer decoders predicting (class logits, mask logits) per query, for every
decoder layer. Called with (cfg, in_channels: int, mask_classification: bool).
"""


def build_pixel_decoder(cfg, name, input_shape):
    """Build the pixel decoder registered as ``name``."""
    return PIXEL_DECODER_REGISTRY.get(name)(cfg, input_shape)


def build_transformer_decoder(cfg, name, in_channels, mask_classification=True):
    """Build the transformer decoder registered as ``name``."""
    return TRANSFORMER_DECODER_REGISTRY.get(name)(cfg, in_channels, mask_classification)
