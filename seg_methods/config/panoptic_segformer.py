"""Panoptic SegFormer keys: ``cfg.MODEL.PANOPTIC_SEGFORMER.*`` only.

Python defaults are the paper's COCO R50 setting (Li et al., "Panoptic SegFormer: Delving Deeper
into Panoptic Segmentation with Transformers", CVPR 2022, Sec. 3-4, and the official
``configs/panformer/base.py``). The encoder is the shared multi-scale deformable encoder, built
from its own node ``cfg.MODEL.MSDEFORM_PIXEL_DECODER`` (the YAML bases set its Panoptic SegFormer
values: res3-res5 plus one extra 1/64 level, dropout 0.1, no mask-feature conv). The numbers of
thing and stuff classes come from the training dataset's metadata, never from this node.
"""

from detectron2.config import CfgNode as CN


def add_panoptic_segformer_config(cfg):
    """Add ``cfg.MODEL.PANOPTIC_SEGFORMER`` (idempotent).

    Args:
        cfg (CfgNode): a detectron2 config, modified in place.
    """
    if "PANOPTIC_SEGFORMER" in cfg.MODEL:
        return
    m = cfg.MODEL.PANOPTIC_SEGFORMER = CN()
    m.PIXEL_DECODER_NAME = "Mask2FormerMSDeformAttnPixelDecoder"  # the shared encoder
    m.TRANSFORMER_DECODER_NAME = "PanopticSegFormerDecoder"
    m.SIZE_DIVISIBILITY = 32
    # location decoder (Sec. 3.3): Deformable DETR decoder with iterative box refinement
    m.NUM_QUERIES = 300  # thing queries
    m.NHEADS = 8
    m.DIM_FEEDFORWARD = 1024
    m.DROPOUT = 0.1
    m.DEC_LAYERS = 6
    m.DEC_N_POINTS = 4
    m.WITH_BOX_REFINE = True
    # mask decoder (Sec. 3.4): masks from the attention maps of the 1/8, 1/16, 1/32 levels
    m.THING_MASK_LAYERS = 4  # blocks of the thing mask decoder (no self-attention)
    m.STUFF_MASK_LAYERS = 6  # blocks of the stuff mask decoder (with self-attention)
    m.MASK_NHEADS = 8
    # losses (Sec. 3.5, Eq. 5-6) and the matching costs (official train_cfg)
    m.CLASS_WEIGHT = 2.0  # focal loss, things (location decoder)
    m.BBOX_WEIGHT = 5.0  # L1 on normalised (cx, cy, w, h)
    m.GIOU_WEIGHT = 2.0
    m.MASK_WEIGHT = 2.0  # V-Net dice, things and stuff
    # stuff-query focal loss: the official code multiplies its loss_cls (weight 2) by 2 again
    m.STUFF_CLASS_WEIGHT = 4.0
    m.FOCAL_ALPHA = 0.25
    m.FOCAL_GAMMA = 2.0
    m.COST_CLASS = 2.0
    m.COST_BBOX = 5.0
    m.COST_GIOU = 2.0
    m.COST_DICE = 2.0
    # query filter: repeated Hungarian rounds on the last location-decoder layer; the queries
    # matched in any round (at most FILTER_MAX_POS per thing) feed the mask decoder in training
    m.FILTER_MAX_POS = 3
    # scale thing / stuff losses by their share of the ground-truth segments (official code)
    m.DYNAMIC_LOSS_RATIO = True
    # inference (official get_bboxes): top-k (query, class) pairs, mask-wise merging
    m.TEST_TOPK = 100
    m.MASK_THRESHOLD = 0.5
    m.THING_SCORE_THRESHOLD = 0.25
    m.STUFF_SCORE_THRESHOLD = 0.25
    m.THING_OVERLAP_THRESHOLD = 0.4  # dropped when > 40% of its mask is already painted
    m.STUFF_OVERLAP_THRESHOLD = 0.2
