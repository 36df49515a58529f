"""Pixel decoders (registered in PIXEL_DECODER_REGISTRY)."""
from .msdeformattn import Mask2FormerMSDeformAttnPixelDecoder  # noqa: F401
from .clustseg_axial import ClustSegAxialPixelDecoder  # noqa: F401
