"""Config keys shared by every method (``add_common_config``).

Method-specific keys live in ``config/<method>.py`` under ``cfg.MODEL.<METHOD>`` only. Keys here
are read by shared code: the data mappers, the solver, the evaluator builder, and the shared
mask-classification core (matcher, set criterion, inference) used by several methods.
Defaults follow the papers' settings (Mask2Former for the mask-classification core).
"""
from detectron2.config import CfgNode as CN


def add_common_config(cfg):
    """Add the shared keys to a detectron2 config (idempotent)."""
    if "MASK_CLS" in cfg.MODEL:
        return

    # ---------------- data ----------------
    # Name of the dataset mapper in seg_methods.data.DATASET_MAPPER_REGISTRY.
    cfg.INPUT.DATASET_MAPPER_NAME = "mask_former_semantic"
    # SSD-style colour augmentation (brightness, contrast, saturation, hue).
    cfg.INPUT.COLOR_AUG_SSD = False
    # Crops where one category covers more than this fraction are re-drawn (semantic crops).
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    # Pad images so both sides are divisible by this (-1: no padding in the mapper).
    cfg.INPUT.SIZE_DIVISIBILITY = -1
    # Large-scale jitter (LSJ) for COCO: output size and scale range.
    cfg.INPUT.IMAGE_SIZE = 1024
    cfg.INPUT.MIN_SCALE = 0.1
    cfg.INPUT.MAX_SCALE = 2.0
    # Target generators (seg_methods.data.target_generators) called in addition to those of the
    # dataset mapper, e.g. ["class_hierarchy"]; a trailing "?" skips records lacking the labels.
    cfg.INPUT.EXTRA_TARGETS = []

    # ---------------- solver ----------------
    cfg.SOLVER.OPTIMIZER = "ADAMW"  # "ADAMW" or "SGD"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # Name-based lr factors, mmcv's paramwise_cfg custom_keys: [[substring, factor], ...]. A
    # parameter whose full name contains a substring gets lr x factor (the longest matching
    # substring wins, as in mmcv), on top of BACKBONE_MULTIPLIER. Deformable-DETR-style recipes
    # (Panoptic SegFormer) use [["sampling_offsets", 0.1], ["reference_points", 0.1]].
    cfg.SOLVER.LR_MULTIPLIERS = []
    # Weight decay for embeddings (query features, positional and level embeddings).
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    # Poly schedule (WarmupPolyLR), used when SOLVER.LR_SCHEDULER_NAME = "WarmupPolyLR".
    cfg.SOLVER.POLY_LR_POWER = 0.9
    cfg.SOLVER.POLY_LR_CONSTANT_ENDING = 0.0
    # mmcv's cosine-restart schedule (WarmupCosineRestartLR): back-to-back periods (iterations),
    # each annealed by a half cosine from its weight x BASE_LR to MIN_LR_RATIO x BASE_LR.
    cfg.SOLVER.COSINE_RESTART_PERIODS = [20000, 40000, 100000]
    cfg.SOLVER.COSINE_RESTART_WEIGHTS = [1.0, 0.5, 0.25]
    cfg.SOLVER.COSINE_RESTART_MIN_LR_RATIO = 0.0
    # "full_model" clips the global norm of all parameters together (Mask2Former's setting);
    # detectron2's "value"/"norm" clip per parameter.
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.01
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0

    # ---------------- test ----------------
    # Which outputs the model produces at inference; the evaluator builder intersects these
    # with what the dataset's metadata can evaluate.
    cfg.TEST.SEMANTIC_ON = True
    cfg.TEST.INSTANCE_ON = False
    cfg.TEST.PANOPTIC_ON = False
    # Superpixel maps (evaluator_type "superpixel"). None = derived from the model (ClustSeg:
    # MODEL.CLUSTSEG.TASK == "superpixel"); see seg_methods.config.clustseg.superpixel_on.
    cfg.TEST.SUPERPIXEL_ON = None
    # Box AP ("bbox") next to mask AP in the COCO instance evaluation; for models that predict
    # boxes (detectors: Unifying T&I reports it in Table 1). See seg_methods.evaluation.build.
    cfg.TEST.BOX_AP = False
    # Number of validation images whose predictions are drawn to OUTPUT_DIR/vis after eval.
    cfg.TEST.NUM_VIS_IMAGES = 0

    # ---------------- shared mask-classification core ----------------
    # Used by every method that predicts (class, mask) pairs: Hungarian matcher, set criterion
    # and semantic/instance/panoptic inference (seg_methods.modeling.{matcher,criterion,
    # postprocessing}). Defaults are Mask2Former's published loss settings.
    cfg.MODEL.MASK_CLS = CN()
    # The one deep-supervision switch of every mask-classification method: supervise the
    # intermediate predictions ("aux_outputs") too (Mask2Former: every decoder layer). Method keys
    # only choose *which* intermediate predictions exist (e.g. MODEL.CLUSTSEG.ESTEP_SUPERVISION);
    # with this off, only the final prediction is supervised.
    cfg.MODEL.MASK_CLS.DEEP_SUPERVISION = True
    cfg.MODEL.MASK_CLS.NO_OBJECT_WEIGHT = 0.1
    cfg.MODEL.MASK_CLS.CLASS_WEIGHT = 2.0
    cfg.MODEL.MASK_CLS.MASK_WEIGHT = 5.0
    cfg.MODEL.MASK_CLS.DICE_WEIGHT = 5.0
    # Point-sampled losses (PointRend-style importance sampling).
    cfg.MODEL.MASK_CLS.TRAIN_NUM_POINTS = 112 * 112
    cfg.MODEL.MASK_CLS.OVERSAMPLE_RATIO = 3.0
    cfg.MODEL.MASK_CLS.IMPORTANCE_SAMPLE_RATIO = 0.75
    # Inference.
    cfg.MODEL.MASK_CLS.OBJECT_MASK_THRESHOLD = 0.8
    cfg.MODEL.MASK_CLS.OVERLAP_THRESHOLD = 0.8
    cfg.MODEL.MASK_CLS.TEST_TOPK_PER_IMAGE = 100
    cfg.MODEL.MASK_CLS.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE = False

