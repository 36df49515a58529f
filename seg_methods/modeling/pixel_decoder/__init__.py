"""Pixel decoders (registered in PIXEL_DECODER_REGISTRY)."""
from .msdeformattn import Mask2FormerMSDeformAttnPixelDecoder  # noqa: F401
from .clustseg_axial import ClustSegAxialPixelDecoder  # noqa: F401
from .hrnetv2_head import HRNetV2Head  # noqa: F401  SEM_SEG_HEADS_REGISTRY "HRNetV2Head"
