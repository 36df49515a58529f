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
decoder layer. Called with (cfg, in_channels: int, mask_classification: bool, mask_dim=int): the
pixel decoder's output channels and mask-embedding channels.
"""


def build_pixel_decoder(cfg, name, input_shape):
    """Build the pixel decoder registered as ``name``."""
    return PIXEL_DECODER_REGISTRY.get(name)(cfg, input_shape)


def build_transformer_decoder(cfg, name, in_channels, mask_classification=True, **kwargs):
    """Build the transformer decoder registered as ``name``.

    ``kwargs`` go to its ``from_config``: facts of the pixel decoder it is paired with, e.g.
    ``mask_dim`` (channels of the per-pixel mask embeddings), which are read from the pixel
    decoder's own config node, not restated in the transformer decoder's.
    """
    return TRANSFORMER_DECODER_REGISTRY.get(name)(cfg, in_channels, mask_classification, **kwargs)


MASK_CLS_HEAD_REGISTRY = Registry("MASK_CLS_HEAD")
MASK_CLS_HEAD_REGISTRY.__doc__ = """
Whole heads of mask-classification meta-architectures: backbone features -> prediction dict
{"pred_logits": (B, Q, K + 1), "pred_masks": (B, Q, h, w), "aux_outputs": [...], ...}, for heads
that are not a pixel decoder + transformer decoder pair (e.g. CMT-DeepLab's dual-path decoder).
Called with (cfg, input_shape: Dict[str, ShapeSpec]); classes use ``@configurable`` with a
``from_config(cls, cfg, input_shape)``.
"""


def build_mask_cls_head(cfg, name, input_shape, config_key="the head name"):
    """Build the mask-classification head registered as ``name`` in MASK_CLS_HEAD_REGISTRY.

    Args:
        cfg (CfgNode): the config.
        name (str): registered name (e.g. ``cfg.MODEL.CMT_DEEPLAB.HEAD_NAME``).
        input_shape (dict[str, ShapeSpec]): backbone output shapes.
        config_key (str): the config key ``name`` was read from, for the error message.

    Raises:
        KeyError: ``name`` is not registered (the message names ``config_key``).
    """
    if name not in MASK_CLS_HEAD_REGISTRY:
        registered = sorted(k for k, _ in MASK_CLS_HEAD_REGISTRY)
        raise KeyError(f"{config_key} = {name!r} is not in MASK_CLS_HEAD_REGISTRY {registered}")
    return MASK_CLS_HEAD_REGISTRY.get(name)(cfg, input_shape)
