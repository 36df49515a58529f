"""Swin Transformer backbone keys (``add_swin_config``): ``cfg.MODEL.SWIN.*`` only.

Python defaults are Swin-T as used by the Mask2Former Swin configs (ImageNet-1k, 224 pre-training,
window 7, drop path 0.3). Swin-S/B/L change EMBED_DIM, DEPTHS, NUM_HEADS, WINDOW_SIZE,
PRETRAIN_IMG_SIZE (and their drop-path rate) in YAML.
"""

from detectron2.config import CfgNode as CN


def add_swin_config(cfg):
    """Add ``cfg.MODEL.SWIN`` (idempotent).

    Args:
        cfg (CfgNode): a detectron2 config, modified in place.
    """
    if "SWIN" in cfg.MODEL:
        return
    cfg.MODEL.SWIN = CN()
    # Image size of the ImageNet pre-training; only sizes the absolute position embedding (APE).
    cfg.MODEL.SWIN.PRETRAIN_IMG_SIZE = 224
    cfg.MODEL.SWIN.PATCH_SIZE = 4
    cfg.MODEL.SWIN.EMBED_DIM = 96
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]
    cfg.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]
    cfg.MODEL.SWIN.WINDOW_SIZE = 7
    cfg.MODEL.SWIN.MLP_RATIO = 4.0
    cfg.MODEL.SWIN.QKV_BIAS = True
    # None: scale attention logits by head_dim ** -0.5.
    cfg.MODEL.SWIN.QK_SCALE = None
    cfg.MODEL.SWIN.DROP_RATE = 0.0
    cfg.MODEL.SWIN.ATTN_DROP_RATE = 0.0
    # Stochastic depth of the last block; rates grow linearly from 0 over all blocks.
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.3
    cfg.MODEL.SWIN.APE = False
    cfg.MODEL.SWIN.PATCH_NORM = True
    cfg.MODEL.SWIN.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Activation checkpointing of every block during training (saves memory, costs time).
    cfg.MODEL.SWIN.USE_CHECKPOINT = False
