"""Multi-scale deformable-attention pixel decoder keys: ``cfg.MODEL.MSDEFORM_PIXEL_DECODER.*`` only.

Read by the registered pixel decoder ``Mask2FormerMSDeformAttnPixelDecoder``
(``seg_methods/modeling/pixel_decoder/msdeformattn.py``) whichever meta-architecture uses it
(Mask2Former; Panoptic SegFormer reuses the same encoder), so a second user sets this node, not
another method's. Python defaults are Mask2Former's COCO R50 setting (Cheng et al., CVPR 2022,
Sec. 3.2 / 4.1): 6 deformable-attention encoder layers over the 1/8, 1/16 and 1/32 features with
8 heads, 4 points, FFN 1024, then an FPN lateral to the 1/4 feature; 256 channels, GroupNorm.
"""

from detectron2.config import CfgNode as CN


def add_msdeform_pixel_decoder_config(cfg):
    """Add ``cfg.MODEL.MSDEFORM_PIXEL_DECODER`` (idempotent).

    Args:
        cfg (CfgNode): a detectron2 config, modified in place.
    """
    if "MSDEFORM_PIXEL_DECODER" in cfg.MODEL:
        return
    m = cfg.MODEL.MSDEFORM_PIXEL_DECODER = CN()
    # backbone features used (the FPN path covers the ones not fed to the encoder)
    m.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    # features fed to the deformable-attention encoder
    m.TRANSFORMER_IN_FEATURES = ["res3", "res4", "res5"]
    # channels of the encoder and FPN convs; the transformer decoder's input channels
    m.CONVS_DIM = 256
    # channels of the per-pixel mask embeddings; the transformer decoder's mask embeddings use it
    # (0: no mask-feature conv, for a user that reads only the encoder levels: Panoptic SegFormer)
    m.MASK_DIM = 256
    m.NORM = "GN"  # norm of the FPN convs
    m.COMMON_STRIDE = 4  # stride of the mask features
    # encoder
    m.TRANSFORMER_ENC_LAYERS = 6
    m.NHEADS = 8
    m.DROPOUT = 0.0
    m.ENC_DIM_FEEDFORWARD = 1024
    m.ENC_N_POINTS = 4
    # "auto": compiled seg_methods._C op when built, else the pure-PyTorch reference;
    # "op" to require the compiled op; "pytorch" to force the reference.
    m.DEFORM_ATTN_IMPL = "auto"
    # coarser levels added below the coarsest encoder input (3x3 stride-2 conv + GN each; the
    # first reads the raw backbone feature): 0 for Mask2Former, 1 for Panoptic SegFormer's 1/64
    m.NUM_EXTRA_LEVELS = 0
    # offset added to the encoder's 1-based pixel coordinates before the sine encoding normalises
    # them: 0 for Mask2Former, -0.5 for mmdet's SinePositionalEncoding (Panoptic SegFormer)
    m.POS_OFFSET = 0.0
    # Under a bf16 autocast (SPEED.BF16_AUTOCAST): False runs the whole pixel decoder in float32
    # (the official forward_features is decorated with autocast(enabled=False)); True keeps only
    # the deformable encoder in float32 and lets the FPN lateral/output convs and the mask-feature
    # conv follow the autocast (bf16), a speed deviation. No effect without autocast.
    m.FPN_AUTOCAST = False
    # Under a bf16 autocast: True runs the encoder layers' FFNs (two linear layers) in bf16, the
    # deformable attention staying float32 (a speed deviation; official: float32).
    m.ENCODER_FFN_AUTOCAST = False
