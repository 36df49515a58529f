"""RegProxy keys: ``cfg.MODEL.REGPROXY.*`` only.

Zhang et al., "Semantic Segmentation by Early Region Proxy" (CVPR 2022; official code
YiF-Zhang/RegionProxy, ``models/proxy_head.py``). The ViT backbone is ``MODEL.TIMM`` with
``MODEL.BACKBONE.NAME: "build_timm_vit_backbone"``; its OUT_INDICES / OUT_FEATURES name the layer
the pixel-token association comes from (ASSOC_FEATURE, the official ``out_indices[0]``: block 4
for ADE20K ViT-Ti/S/B, block 2 for Cityscapes, 9 / 5 for ViT-L; -1, the token embedding, for the
hybrids) and the last layer, whose tokens are classified (CLS_FEATURE). The number of classes, the
void label and the loss weight are ``MODEL.SEM_SEG_HEAD``'s.
"""

from detectron2.config import CfgNode as CN

__all__ = ["add_regproxy_config"]


def add_regproxy_config(cfg):
    """Add ``cfg.MODEL.REGPROXY`` (idempotent)."""
    if "REGPROXY" in cfg.MODEL:
        return
    r = cfg.MODEL.REGPROXY = CN()
    # Backbone output (MODEL.TIMM.OUT_FEATURES) the association head reads: a middle layer.
    r.ASSOC_FEATURE = "mid"
    # Backbone output whose tokens the linear classifier reads: the last layer (final norm).
    r.CLS_FEATURE = "last"
    # Channels of the association head's depthwise-separable 3x3 conv (official: the ViT width,
    # e.g. 384 for ViT-S); 0 = the width of ASSOC_FEATURE.
    r.CHANNELS = 0
    # (rh, rw): output pixels per token along each axis. Patch 16 at 1/4 resolution: (4, 4);
    # the official hybrids (patch 32) keep (4, 4), i.e. paint at 1/8.
    r.REGION_RES = [4, 4]
    # Norm of the depthwise-separable conv (official: SyncBN): "BN", "SyncBN", "GN", "" ...
    r.NORM = "SyncBN"
    # "auto": the compiled op when it is built for the device, else the PyTorch reference;
    # "pytorch": always the reference (unfold form of the official head).
    r.ASSOCIATION_IMPL = "auto"
