"""Models: backbones, pixel/transformer decoders, criteria and meta-architectures.

Imports below exist to register components in their registries.
"""
from . import backbone  # noqa: F401
from . import pixel_decoder  # noqa: F401
from . import transformer_decoder  # noqa: F401
from . import meta_arch  # noqa: F401
from .build import (  # noqa: F401
    MASK_CLS_HEAD_REGISTRY,
    PIXEL_DECODER_REGISTRY,
    TRANSFORMER_DECODER_REGISTRY,
    build_mask_cls_head,
    build_pixel_decoder,
    build_transformer_decoder,
)
