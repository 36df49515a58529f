"""Config of PISR (``add_pisr_config``): ``cfg.MODEL.PISR`` and detectron2's Panoptic-DeepLab keys.

``META_ARCHITECTURE: "PISR"`` builds the base model named by ``MODEL.PISR.BASE`` (one of
:data:`PISR_BASES`: detectron2's Panoptic-FPN and Panoptic-DeepLab, our Mask2Former), extended
with the PISR module of :mod:`seg_methods.layers.pisr`; ``MODEL.PISR.ENABLED: False`` builds the
same base model without it (the "base" row of a base vs base + PISR comparison). The base
model's own keys (``MODEL.MASK2FORMER``, ``MODEL.PANOPTIC_FPN``/``ROI_HEADS``/``RPN``,
``MODEL.PANOPTIC_DEEPLAB``/``INS_EMBED_HEAD``) are read unchanged.

detectron2's Panoptic-DeepLab keys (``detectron2.projects.panoptic_deeplab.add_panoptic_deeplab_config``,
called here, not copied) are added only where a key does not exist yet, as ``add_per_pixel_config``
does for the DeepLab keys, so that shared keys are never overwritten.
"""

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg as _d2_get_cfg
from detectron2.projects.panoptic_deeplab import add_panoptic_deeplab_config

from .per_pixel import _add_missing

__all__ = ["add_pisr_config", "PISR_BASES", "PISR_BASE_PANOPTIC_FPN", "PISR_BASE_PANOPTIC_DEEPLAB"]

PISR_BASE_PANOPTIC_FPN = "PanopticFPN"
PISR_BASE_PANOPTIC_DEEPLAB = "PanopticDeepLab"
PISR_BASE_MASK2FORMER = "Mask2Former"
# base models with instance features (what PISR needs), by their detectron2 / seg_methods name
PISR_BASES = (PISR_BASE_PANOPTIC_FPN, PISR_BASE_PANOPTIC_DEEPLAB, PISR_BASE_MASK2FORMER)


def add_pisr_config(cfg):
    """Add ``MODEL.PISR`` and the Panoptic-DeepLab keys (idempotent)."""
    if "PISR" in cfg.MODEL:
        return
    base = _d2_get_cfg()
    with_pdl = base.clone()
    add_panoptic_deeplab_config(with_pdl)
    _add_missing(cfg, with_pdl, base)

    cfg.MODEL.PISR = CN()
    # The one on/off switch: False builds the plain base model (same parameters minus PISR's).
    cfg.MODEL.PISR.ENABLED = True
    # Base model: one of PISR_BASES. A base without instance features (a semantic model such as
    # "PerPixelSemantic" or detectron2's "SemanticSegmentor") is refused with an error naming
    # this key.
    cfg.MODEL.PISR.BASE = PISR_BASE_MASK2FORMER
    # Table 5: "pisr" (full), "pisr_no_reweight", "ocr", "concat", "product".
    cfg.MODEL.PISR.VARIANT = "pisr"
    # Number of instance encodings kept (top-K by the base model's instance scores; the top-K
    # analysis of the paper). The summary we have does not give the chosen K; 10 is ours.
    cfg.MODEL.PISR.TOP_K = 10
    # D: channels of the panoptic encodings and of the attention (OCR's key channels).
    cfg.MODEL.PISR.CHANNELS = 256
    # Initialise PISR's output 1x1 conv ("fuse") to zero: switching PISR on starts from the base
    # model's features (our choice; the paper does not say). False: PyTorch's default init.
    cfg.MODEL.PISR.ZERO_INIT_FUSE = True
    # Panoptic-DeepLab: soft instance maps of the "concat"/"product" variants,
    # exp(-|p + offset(p) - c_j|^2 / (2 sigma^2)), sigma in input pixels.
    cfg.MODEL.PISR.INSTANCE_MAP_SIGMA = 8.0
