"""CMT-DeepLab keys: ``cfg.MODEL.CMT_DEEPLAB.*`` only.

Python defaults are the paper's COCO panoptic Axial-R50 model (Yu et al., "CMT-DeepLab:
Clustering Mask Transformers for Panoptic Segmentation", CVPR 2022, Sec. 3.4 and 4), with the
MaX-DeepLab loss settings it says it keeps (Wang et al., CVPR 2021). Values the paper does not
give are marked "(ours)". The number of classes is detectron2's ``MODEL.SEM_SEG_HEAD.NUM_CLASSES``.
"""

from detectron2.config import CfgNode as CN


def add_cmt_deeplab_config(cfg):
    """Add ``cfg.MODEL.CMT_DEEPLAB`` (idempotent)."""
    if "CMT_DEEPLAB" in cfg.MODEL:
        return
    m = cfg.MODEL.CMT_DEEPLAB = CN()

    # The Axial-ResNet backbone (MODEL.BACKBONE.NAME "AxialResNet") reads its own node,
    # cfg.MODEL.AXIAL_RESNET (seg_methods/config/axial_resnet.py).

    # ---- head: name in MASK_CLS_HEAD_REGISTRY (seg_methods/modeling/build.py) ----
    m.HEAD_NAME = "CMTDeepLabDecoder"

    # ---- cluster centres / dual-path transformer decoder (Sec. 3.3, 3.4) ----
    m.NUM_OBJECT_QUERIES = 128  # N, MaX-DeepLab's 128 mask slots
    m.HIDDEN_DIM = 256  # D, channels of the cluster centres
    m.NHEADS = 8
    m.DIM_FEEDFORWARD = 2048
    # Backbone features the dual-path blocks run on, coarse to fine, and blocks per feature
    # (Sec. 3.4: three at stage-5, three at stage-4).
    m.DEC_IN_FEATURES = ["res5", "res4"]
    m.DEC_BLOCKS = [3, 3]
    # Pixel-path axial attention of the dual-path blocks.
    m.AXIAL_HEADS = 8
    m.AXIAL_SPAN = 129
    m.AXIAL_BOTTLENECK_RATIO = 4  # attention width = stage channels // ratio
    # Upsampling path after the dual-path blocks (stride 8, 4), fused with these features.
    m.DECODER_IN_FEATURES = ["res3", "res2"]
    m.DECODER_DIM = 256  # (ours) channels of the stride-8 / stride-4 decoder
    m.MASK_DIM = 128  # (ours; MaX-DeepLab uses 128) pixel embedding of the final masks
    m.NORM = "BN"
    m.ACTIVATION = "gelu"
    m.DROP_PATH_RATE = 0.2
    # Clustering Mask Transformer switches (Table 2 ablations).
    m.CLUSTERING_UPDATE = True  # Eq. 6-8; False: plain cross-attention (Eq. 3)
    m.LOCATION_SENSITIVE = True  # Eq. 9-12: reference masks + coord-conv
    m.NUM_REF_POINTS = 8  # M
    m.CLUSTER_IMPL = "auto"  # soft_cluster implementation: "auto", "ext" or "pytorch"
    m.SIZE_DIVISIBILITY = 32
    # Recursive Feature Network (Sec. 3.4): the whole model stacked twice, stride-4 features
    # of the two copies averaged.
    m.RFN = False

    # ---- losses (Sec. 3.4 and MaX-DeepLab) ----
    # Deep supervision (every CMT layer's prediction is supervised) is the shared key
    # MODEL.MASK_CLS.DEEP_SUPERVISION.
    # Matching used by the auxiliary (per-layer) predictions: "final" reuses the final
    # prediction's Hungarian matching and its PQ-loss weights for every layer (MaX-DeepLab's
    # reference implementation, kMaX-DeepLab's default); "per_layer" matches every layer anew.
    m.AUX_MATCHING = "final"
    m.PQ_WEIGHT = 3.0
    m.PQ_ALPHA = 0.75
    m.MASK_ID_WEIGHT = 0.3
    m.SEM_WEIGHT = 1.0
    m.INSDIS_WEIGHT = 1.0
    m.INSDIS_TEMPERATURE = 0.3  # tau of Eq. 14 (deeplab2's setting)
    m.INSDIS_NUM_SAMPLES = 4096  # |A|
    # Sampling logits are SAMPLE_TEMPERATURE * log(1 / mask area) (ours: 1.0, i.e. every mask
    # gets the same expected number of sampled pixels).
    m.INSDIS_SAMPLE_TEMPERATURE = 1.0
    m.LOC_WEIGHT = 1.0  # Eq. 13

    # ---- inference ----
    # "mask_wise" (MaskFormer-style merge, Table 2d) or "per_pixel" (MaX-DeepLab's argmax).
    m.PANOPTIC_MERGE = "mask_wise"
    m.CLASS_THRESHOLD = 0.7  # MaX-DeepLab keeps masks whose class confidence is above 0.7
    m.OVERLAP_THRESHOLD = 0.8  # MaskFormer's mask-wise merging threshold
