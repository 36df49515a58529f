"""HSSN keys: ``cfg.MODEL.HSSN.*`` only.

Deep Hierarchical Semantic Segmentation (Li et al., CVPR 2022). Python defaults are the paper's
DeepLabV3+ setting as the public ports run it (qhanghu/HSSN_pytorch, mmsegmentation
``projects/hssn``; the paper has no official code): focal tree-min loss (Eq. 6, gamma 2) with the
ports' weight 5, the tree-triplet loss (Eq. 7) on a 256-d L2-normalised projection of the
backbone's last feature, at most 200 triplets per class, weight ramped 0 -> 0.5 by a cosine over
80k iterations, and the ports' extra per-level softmax cross-entropy. The class tree itself is
dataset metadata (``class_hierarchy``, see datasets/README.md), not a config key.
"""

from detectron2.config import CfgNode as CN

__all__ = [
    "add_hssn_config",
    "HSSN_BASES",
    "HSSN_PER_PIXEL",
    "HSSN_MASK2FORMER",
    "HSSN_INFERENCE_RULES",
    "HSSN_EMBED_DECODER",
]

HSSN_PER_PIXEL = "per_pixel"
HSSN_MASK2FORMER = "mask2former"
HSSN_BASES = (HSSN_PER_PIXEL, HSSN_MASK2FORMER)
HSSN_INFERENCE_RULES = ("path_min", "path_sum")
# MODEL.HSSN.EMBED_IN_FEATURE value that projects the head's decoder output instead of a
# backbone feature.
HSSN_EMBED_DECODER = "decoder"


def add_hssn_config(cfg):
    """Add ``cfg.MODEL.HSSN`` (idempotent)."""
    if "HSSN" in cfg.MODEL:
        return
    m = cfg.MODEL.HSSN = CN()
    # Segmentation network HSSN is put on (META_ARCHITECTURE "HSSN" for both). "per_pixel":
    # DeepLabV3+ (PerPixelSemanticModel with detectron2's DeepLabV3PlusHead as a decoder, its
    # classifier replaced by one sigmoid score per tree node). "mask2former": Mask2Former (the
    # MODEL.MASK2FORMER / MASK_CLS keys), each query scoring every tree node with a sigmoid
    # (Table 2's third row is MaskFormer; see projects/HSSN/README.md). With "mask2former" the
    # tree-min loss weight is MASK_CLS.CLASS_WEIGHT (TREE_MIN_WEIGHT is the per-pixel one),
    # the no-object weight MASK_CLS.NO_OBJECT_WEIGHT, and EMBED_IN_FEATURE "decoder" means the
    # pixel decoder's mask features.
    m.BASE = HSSN_PER_PIXEL

    # ---------------- tree-min loss (Def. 3.2.3-3.2.4, Eq. 4-6) ----------------
    # Focal tree-min (Eq. 6) or plain tree-min (Eq. 5: the BCE of Eq. 4 on the tree-constrained
    # scores). Table 6: FTM > TM > BCE.
    m.FOCAL = True
    m.FOCAL_GAMMA = 2.0
    # Weight of the tree-min loss; the ports multiply it by 5.
    m.TREE_MIN_WEIGHT = 5.0

    # ---------------- extra per-level cross-entropy (ports only) ----------------
    # The ports add, for every level, a softmax cross-entropy over that level's node logits
    # (Cityscapes: 19 leaves and 7 super-classes). Not in the paper; 0 turns it off.
    m.LEVEL_CE_WEIGHT = 1.0

    # ---------------- tree-triplet loss (Eq. 7) ----------------
    # Final weight of the triplet loss, reached by a cosine ramp from 0 over TRIPLET_RAMP_ITERS
    # iterations (ports: 0.5 over 80k); 0 turns the loss and the projection head off.
    m.TRIPLET_WEIGHT = 0.5
    m.TRIPLET_RAMP_ITERS = 80000
    # Margin of Eq. 7: MARGIN_EPS + MARGIN_TREE_FACTOR * (psi(a, -) - psi(a, +)) / (2 D), psi the
    # tree distance (edges, through an implicit root above the top level) and D the depth
    # (number of levels). The paper prints factor 0.5; the ports hard-code the margin 0.6, which
    # is factor 1 on Cityscapes' 2-level tree (0.1 + (4 - 2) / 4).
    m.MARGIN_EPS = 0.1
    m.MARGIN_TREE_FACTOR = 1.0
    # Positives of an anchor of class c: pixels of the other classes under c's level-1 parent
    # (False, the ports; a class alone under its parent gets no triplet) or of every class under
    # it, c included (True; pair it with MARGIN_TREE_FACTOR 0.5, see tree_triplet_loss).
    m.TRIPLET_INCLUDE_ANCHOR_CLASS = False
    # Triplets drawn per anchor class and batch (ports: 200).
    m.MAX_TRIPLETS_PER_CLASS = 200
    # Projection: 1x1 conv, norm (SEM_SEG_HEAD.NORM), ReLU, 1x1 conv to EMBED_DIM, L2-normalised.
    m.EMBED_DIM = 256
    # Its input: a backbone feature (ports: the last one, "res5") or "decoder" (the head's
    # decoder output, 1/4 resolution; more pixels on small inputs).
    m.EMBED_IN_FEATURE = "res5"

    # ---------------- inference ----------------
    # Leaf score that respects the tree: "path_min" (default): the minimum of the logits over the
    # leaf and all its ancestors, i.e. the tree-min positive score the loss trains; "path_sum":
    # the sum of those logits (the ports' additive rule). Both argmax over leaves, so the
    # predicted path is always a path of the tree.
    m.INFERENCE = "path_min"
