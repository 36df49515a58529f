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
    # which losses / outputs the model uses (one architecture, four tasks).
    m.TASK = "panoptic"
    m.SIZE_DIVISIBILITY = 32

    # ---------------- pixel decoder (Sec. 3.3) ----------------
    m.PIXEL_DECODER_NAME = "ClustSegAxialPixelDecoder"
    m.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    m.CONVS_DIM = 256
    m.MASK_DIM = 256
    m.NORM = "GN"  # norm of the lateral / output convs (our choice, as Mask2Former's FPN)
    # Axial blocks at the coarsest level (L, 1/32) and the next one (L-1, 1/16): 1 and 5.
    m.AXIAL_BLOCKS = [1, 5]
    m.AXIAL_NHEADS = 8
    m.AXIAL_SPAN = 65  # global along both axes up to 65 pixels (1/16 of a 1024 crop = 64)
    m.AXIAL_NORM = "BN"  # "BN", "SyncBN" (multi-GPU) or ""

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
    # Deep supervision of the E-steps (Sec. 3.3 / Table 7a): "all" E-steps, only the "last" one of
    # each layer, or "none" (only the decoder-layer outputs).
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
    # number of superpixels drawn per training batch (50 to 2500 in the paper)
    m.SUPERPIXEL.TRAIN_NUM_RANGE = [50, 2500]
    # default number at test time; an input dict's "num_superpixels" overrides it per call
    m.SUPERPIXEL.TEST_NUM = 200
    # losses (App. A.4): 10 x smooth L1 + 1 x SLIC loss (Yang et al. 2020)
    m.SUPERPIXEL.SMOOTH_L1_WEIGHT = 10.0
    m.SUPERPIXEL.SLIC_WEIGHT = 1.0
    # m of the SLIC loss's position term m / S * ||p - p'||_2 (SSFCN's default 0.003)
    m.SUPERPIXEL.COMPACTNESS = 0.003
