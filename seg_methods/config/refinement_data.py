"""Data keys of mask refinement (the ``refinement`` dataset mapper; CRM, CascadePSP lineage).

Only ``cfg.INPUT.REFINEMENT.*``: the model's keys (CRM) live in its own config node; the coarse
masks made online for training come from the ``coarse_mask`` target generator, whose parameters
are documented in ``seg_methods/data/target_generators/coarse_mask.py``.
"""

from detectron2.config import CfgNode as CN


def add_refinement_data_config(cfg):
    """Add ``cfg.INPUT.REFINEMENT`` (idempotent)."""
    if "REFINEMENT" in cfg.INPUT:
        return
    cfg.INPUT.REFINEMENT = CN()
    # Training crops are CROP_SIZE x CROP_SIZE (224 in CRM / CascadePSP's online training set);
    # smaller images are padded at the bottom/right (image 0, masks 0).
    cfg.INPUT.REFINEMENT.CROP_SIZE = 224
    # Before cropping, images whose longer side exceeds this are shrunk to it (0: never). CRM
    # trains at low resolution; set it to train on high-resolution records.
    cfg.INPUT.REFINEMENT.MAX_SIZE_TRAIN = 0
    # torchvision ColorJitter(brightness 0.2, contrast 0.05, saturation 0.05) and
    # RandomGrayscale(p = 0.1), as the official online training set.
    cfg.INPUT.REFINEMENT.COLOR_JITTER = True
