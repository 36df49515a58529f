"""Query-based transformer decoders (registered in TRANSFORMER_DECODER_REGISTRY)."""
from .mask2former_decoder import Mask2FormerMaskedAttentionDecoder  # noqa: F401
from .clustseg_decoder import ClustSegRecurrentDecoder  # noqa: F401
from .cmt_deeplab_decoder import CMTDeepLabDecoder  # noqa: F401
