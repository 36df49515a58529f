"""Config of the per-pixel semantic template (``add_per_pixel_config``).

Read by :class:`~seg_methods.modeling.meta_arch.per_pixel.PerPixelSemanticModel` and the shared
test-time strategy (:class:`~seg_methods.modeling.test_time.SemSegTestTime`):

* ``MODEL.PER_PIXEL``: input padding and the hard-pixel fraction of the template's loss;
* ``TEST.PER_PIXEL``: whole-image versus sliding-window inference and what multi-scale + flip
  testing averages. The scales and the flip themselves are detectron2's ``TEST.AUG.ENABLED``,
  ``TEST.AUG.MIN_SIZES``, ``TEST.AUG.MAX_SIZE`` and ``TEST.AUG.FLIP`` (same meaning: shortest
  edge of the original image), so no second set of scale keys exists.

The heads the template builds from ``SEM_SEG_HEAD_REGISTRY`` read detectron2's own keys. For
detectron2's DeepLab heads and backbone (``detectron2.projects.deeplab``) those are added here by
``add_deeplab_config`` itself (not a copy), but only where a key does not exist yet, so that
shared keys set by ``add_common_config`` (``SOLVER.POLY_LR_*``,
``INPUT.CROP.SINGLE_CATEGORY_MAX_AREA``) are never overwritten.
"""

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg as _d2_get_cfg
from detectron2.projects.deeplab import add_deeplab_config

__all__ = ["add_per_pixel_config"]


def _add_missing(dst: CN, src: CN, base: CN) -> None:
    """Copy into ``dst`` the keys of ``src`` that ``base`` lacks and ``dst`` lacks too."""
    for key, value in src.items():
        if isinstance(value, CN):
            if key not in dst:
                dst[key] = CN()
            _add_missing(dst[key], value, base.get(key, CN()))
        elif key not in base and key not in dst:
            dst[key] = value


def add_per_pixel_config(cfg):
    """Add ``MODEL.PER_PIXEL``, ``TEST.PER_PIXEL`` and the DeepLab keys (idempotent)."""
    if "PER_PIXEL" in cfg.MODEL:
        return

    # detectron2.projects.deeplab's keys (SEM_SEG_HEAD.{LOSS_TYPE, PROJECT_*, ASPP_*,
    # USE_DEPTHWISE_SEPARABLE_CONV}, RESNETS.{RES4_DILATION, RES5_MULTI_GRID, STEM_TYPE}).
    base = _d2_get_cfg()
    with_deeplab = base.clone()
    add_deeplab_config(with_deeplab)
    _add_missing(cfg, with_deeplab, base)

    cfg.MODEL.PER_PIXEL = CN()
    # Pad inputs to a multiple of this (-1: the backbone's own size_divisibility).
    cfg.MODEL.PER_PIXEL.SIZE_DIVISIBILITY = -1
    # SEM_SEG_HEAD.LOSS_TYPE == "hard_pixel_mining": the cross-entropy is averaged over this
    # fraction of the valid (non-void) pixels with the largest loss (DeepLab's top-k pixels;
    # detectron2's DeepLab heads hard-code 0.2).
    cfg.MODEL.PER_PIXEL.HARD_PIXEL_FRACTION = 0.2

    cfg.TEST.PER_PIXEL = CN()
    # "whole": the image padded to the size divisibility, one pass; "slide": sliding windows.
    cfg.TEST.PER_PIXEL.MODE = "whole"
    # Sliding windows (height, width): size (divisible by the size divisibility) and step
    # (at most the size). Windows are padded to CROP_SIZE; overlapping logits are averaged.
    cfg.TEST.PER_PIXEL.CROP_SIZE = [512, 512]
    cfg.TEST.PER_PIXEL.STRIDE = [341, 341]
    # With TEST.AUG.ENABLED: average the views' softmax "probs" (default) or raw "logits".
    cfg.TEST.PER_PIXEL.AVERAGE = "probs"
