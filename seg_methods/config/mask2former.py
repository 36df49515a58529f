"""Mask2Former keys: ``cfg.MODEL.MASK2FORMER.*`` only.

Python defaults are the paper's COCO panoptic R50 setting (Mask2Former, Cheng et al. 2022,
Sec. 4 and its public configs); YAML leaves only carry deltas. Loss weights, the matcher and the
inference thresholds are the shared mask-classification keys ``cfg.MODEL.MASK_CLS.*``; the number
of classes is detectron2's ``cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES``.
"""
from detectron2.config import CfgNode as CN


def add_mask2former_config(cfg):
    """Add ``cfg.MODEL.MASK2FORMER`` (idempotent)."""
    if "MASK2FORMER" in cfg.MODEL:
        return
    m = cfg.MODEL.MASK2FORMER = CN()
    # transformer decoder (Sec. 3.2)
    m.TRANSFORMER_DECODER_NAME = "Mask2FormerMaskedAttentionDecoder"
    m.HIDDEN_DIM = 256
    m.NUM_OBJECT_QUERIES = 100
    m.NHEADS = 8
    m.DIM_FEEDFORWARD = 2048
    # Number of masked-attention layers (9 = 3 rounds over 3 scales). Predictions are made by the
    # learnable queries and after every layer, so DEC_LAYERS + 1 outputs are supervised.
    # (The official YAMLs write 10 here because they count the learnable-query output.)
    m.DEC_LAYERS = 9
    m.PRE_NORM = False
    m.ENFORCE_INPUT_PROJ = False
    m.MASK_ATTENTION_THRESHOLD = 0.5
    # Eval only: predict the intermediate masks (which only set the next layer's attention mask)
    # directly at the size of the level attended next, from mask features resized there, instead
    # of at 1/4 and resizing the masks (the official code). Both resizes are linear, so the masks
    # are the same up to float rounding; eval outputs then carry no auxiliary masks. Measured by
    # benchmarks/mask2former_inference.py.
    m.EVAL_LEVEL_SIZE_ATTENTION_MASKS = False
    m.SIZE_DIVISIBILITY = 32
    # pixel decoder (Sec. 3.2 / 4.1): its structure is in its own node,
    # cfg.MODEL.MSDEFORM_PIXEL_DECODER (config/msdeform_pixel_decoder.py); its CONVS_DIM and MASK_DIM
    # are also the transformer decoder's input and mask-embedding channels.
    m.PIXEL_DECODER_NAME = "Mask2FormerMSDeformAttnPixelDecoder"
