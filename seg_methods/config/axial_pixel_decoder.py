"""Axial-attention pixel decoder keys: ``cfg.MODEL.AXIAL_PIXEL_DECODER.*`` only.

Read by the registered pixel decoder ``ClustSegAxialPixelDecoder``
(``seg_methods/modeling/pixel_decoder/clustseg_axial.py``) whichever meta-architecture uses it.
Python defaults are ClustSeg's COCO R50 setting (Liang et al., ICML 2023, Sec. 3.3): one axial
block at 1/32 and five at 1/16, then a top-down FPN path to 1/4; 256 channels.
"""

from detectron2.config import CfgNode as CN


def add_axial_pixel_decoder_config(cfg):
    """Add ``cfg.MODEL.AXIAL_PIXEL_DECODER`` (idempotent).

    Args:
        cfg (CfgNode): a detectron2 config, modified in place.
    """
    if "AXIAL_PIXEL_DECODER" in cfg.MODEL:
        return
    m = cfg.MODEL.AXIAL_PIXEL_DECODER = CN()
    m.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    # channels of every level; the transformer decoder's input channels
    m.CONVS_DIM = 256
    # channels of the per-pixel mask embeddings; the transformer decoder's mask embeddings use it
    m.MASK_DIM = 256
    m.NORM = "GN"  # norm of the lateral / output convs (our choice, as Mask2Former's FPN)
    # Axial blocks at the coarsest level (L, 1/32) and the next one (L-1, 1/16): 1 and 5.
    m.AXIAL_BLOCKS = [1, 5]
    m.AXIAL_NHEADS = 8
    m.AXIAL_SPAN = 65  # global along both axes up to 65 pixels (1/16 of a 1024 crop = 64)
    m.AXIAL_NORM = "BN"  # "BN", "SyncBN" (multi-GPU) or ""
