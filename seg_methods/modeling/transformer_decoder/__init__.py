"""Query-based transformer decoders.

Mask2Former's and ClustSeg's decoders are registered in TRANSFORMER_DECODER_REGISTRY (multi-scale
features + mask features -> predictions); CMT-DeepLab's decoder consumes the backbone features
directly and is registered in MASK_CLS_HEAD_REGISTRY (see ``modeling/build.py``).
"""
from .mask2former_decoder import Mask2FormerMaskedAttentionDecoder  # noqa: F401
from .clustseg_decoder import ClustSegRecurrentDecoder  # noqa: F401
from .cmt_deeplab_decoder import CMTDeepLabDecoder  # noqa: F401
from .panoptic_segformer_decoder import PanopticSegFormerDecoder  # noqa: F401
