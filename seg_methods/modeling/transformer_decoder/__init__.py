"""Query-based transformer decoders (registered in TRANSFORMER_DECODER_REGISTRY)."""
from .mask2former_decoder import Mask2FormerMaskedAttentionDecoder  # noqa: F401
