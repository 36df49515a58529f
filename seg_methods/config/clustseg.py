"""ClustSeg keys: ``cfg.MODEL.CLUSTSEG.*`` only.

Python defaults are the paper's COCO panoptic R50 setting (Liang et al., "ClustSeg: Clustering for
Universal Segmentation", ICML 2023, Sec. 3.3 and App. A.1): an axial pixel decoder (1 block at
1/32, 5 at 1/16), six recurrent cross-attention decoders (two per level, coarse to fine) with
T = 3 EM iterations, 128 queries (75 scene-adaptive "thing" seeds + one scene-agnostic seed per
stuff class, from the memory bank). Loss weights, the matcher and the inference thresholds are the
shared mask-classification keys ``cfg.MODEL.MASK_CLS.*``. Values the paper does not give are
marked "(our choice)".
"""

from detectron2.config import CfgNode as CN


def add_clustseg_config(cfg):
    """Add ``cfg.MODEL.CLUSTSEG`` (idempotent)."""
    if "CLUSTSEG" in cfg.MODEL:
        return
    m = cfg.MODEL.CLUSTSEG = CN()
    # "panoptic", "instance", "semantic" or "superpixel": which query sets dreamy-start builds and
    # which losses / outputs the model uses (one architecture, four tasks). The superpixel task is
    # the one source of "the model outputs superpixel maps": TEST.SUPERPIXEL_ON is derived from it
    # (see superpixel_on below).
    m.TASK = "panoptic"
    m.SIZE_DIVISIBILITY = 32

    # ---------------- pixel decoder (Sec. 3.3) ----------------
    # Its structure is in its own node, cfg.MODEL.AXIAL_PIXEL_DECODER
    # (config/axial_pixel_decoder.py); its CONVS_DIM and MASK_DIM are also the decoder's input and
    # mask-embedding channels.
    m.PIXEL_DECODER_NAME = "ClustSegAxialPixelDecoder"

    # ---------------- recurrent cross-attention decoder (Eq. 10-11) ----------------
    m.TRANSFORMER_DECODER_NAME = "ClustSegRecurrentDecoder"
    m.HIDDEN_DIM = 256
    m.NHEADS = 8
    m.DIM_FEEDFORWARD = 2048
    m.DROPOUT = 0.0
    m.PRE_NORM = False
    # Six decoders, two at each of the pixel-decoder levels L, L-1, L-2 (coarse to fine).
    m.DEC_LAYERS = 6
    m.DEC_LAYERS_PER_LEVEL = 2
    # "recurrent" (Eq. 10-11), "kmeans" (kMaX hard assignment, Table 4c) or "vanilla" (Eq. 5,
    # softmax over pixels).
    m.CROSS_ATTENTION = "recurrent"
    m.NUM_ITERATIONS = 3  # T
    # M-step: "mean" = weighted mean of the values (EM / soft k-means centre update; our default)
    # or "sum" = M V as printed in Eq. 10 / Algorithm 2 (grows with the number of pixels).
    m.M_STEP = "mean"
    # Scale the affinities by (D / heads)^-0.5 as in a transformer decoder (our choice; the
    # paper's Eq. 10 has no scale).
    m.SCALED_AFFINITY = True
    # Which E-steps of every decoder layer are intermediate predictions (Sec. 3.3 / Table 7a):
    # "all", only the "last" one of each layer, or "none" (only the decoder-layer outputs).
    # Whether intermediate predictions are supervised at all is one shared switch,
    # MODEL.MASK_CLS.DEEP_SUPERVISION (with it off, no E-step prediction is made).
    m.ESTEP_SUPERVISION = "all"

    # ---------------- dreamy-start (Eq. 7-9) ----------------
    # instance/thing queries: "scene_adaptive" (Eq. 8) or "free" (learned parameters)
    m.THING_QUERY_INIT = "scene_adaptive"
    # semantic/stuff queries: "scene_agnostic" (memory bank, Eq. 7), "scene_adaptive" or "free"
    m.STUFF_QUERY_INIT = "scene_agnostic"
    # 75 thing seeds + one per stuff class (53 on COCO) = 128 (App. A.1); 100 for instance.
    m.NUM_THING_QUERIES = 75
    # How Eq. 8 draws K seeds from the position-embedded feature map (the paper is silent):
    # "grid" = K evenly spread cells of a grid (no parameters) or "topk" = the K pixels with the
    # highest learned objectness (a linear score, which gates the seed so it gets a gradient).
    m.INSTANCE_SEED_SAMPLER = "grid"
    # FIFO memory bank of Eq. 7 (sizes are our choice): entries per class, and pixels of one
    # class pushed per image.
    m.MEMORY_SIZE = 256
    m.MEMORY_SAMPLES_PER_IMAGE = 32

    # ---------------- superpixels (Sec. 4.4, App. A.4) ----------------
    m.SUPERPIXEL = CN()
    # number of superpixels drawn per training batch (50 to 2500 in the paper); checked when the
    # model is built (both ends in [50, 2500], min <= max)
    m.SUPERPIXEL.TRAIN_NUM_RANGE = [50, 2500]
    # default number at test time (in [50, 2500], checked at build time); an input dict's
    # "num_superpixels" overrides it per call
    m.SUPERPIXEL.TEST_NUM = 200
    # losses (App. A.4): 10 x smooth L1 + 1 x SLIC loss (Yang et al. 2020)
    m.SUPERPIXEL.SMOOTH_L1_WEIGHT = 10.0
    m.SUPERPIXEL.SLIC_WEIGHT = 1.0
    # m of the SLIC loss's position term m / S * ||p - p'||_2 (SSFCN's default 0.003)
    m.SUPERPIXEL.COMPACTNESS = 0.003


def superpixel_on(cfg) -> bool:
    """Whether the configured model outputs superpixel maps (what ``TEST.SUPERPIXEL_ON`` means).

    The fact is ``MODEL.CLUSTSEG.TASK == "superpixel"`` with ``MODEL.META_ARCHITECTURE`` ClustSeg.
    ``TEST.SUPERPIXEL_ON`` defaults to None (derived); a config may restate it, and a ClustSeg
    config whose ``TEST.SUPERPIXEL_ON`` contradicts its task is refused. For other
    meta-architectures an explicit value is taken as given.

    Args:
        cfg (CfgNode): a full seg_methods config.

    Returns:
        bool

    Raises:
        ValueError: ``TEST.SUPERPIXEL_ON`` contradicts ``MODEL.CLUSTSEG.TASK``.
    """
    explicit = cfg.TEST.SUPERPIXEL_ON
    if cfg.MODEL.META_ARCHITECTURE != "ClustSeg":
        return bool(explicit)
    derived = cfg.MODEL.CLUSTSEG.TASK == "superpixel"
    if explicit is not None and bool(explicit) != derived:
        raise ValueError(
            f"TEST.SUPERPIXEL_ON={explicit} contradicts MODEL.CLUSTSEG.TASK="
            f"{cfg.MODEL.CLUSTSEG.TASK!r}: ClustSeg outputs superpixel maps exactly when "
            "MODEL.CLUSTSEG.TASK is 'superpixel'. Set the task and leave TEST.SUPERPIXEL_ON unset "
            "(it is derived from the task)."
        )
    return derived
