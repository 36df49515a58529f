"""Unifying Training and Inference keys: ``cfg.MODEL.DENSE_AFFINITY_PANOPTIC.*`` only.

Li, Qi, Torr, "Unifying Training and Inference for Panoptic Segmentation" (CVPR 2020). No public
code exists. Defaults are the paper's full Cityscapes model (Table 1, row D2: object masks, dense
instance affinity, panoptic matching loss, argmax inference; dynamic potential variant B,
Table F; loss weights detection 0.25, semantic 1.0, panoptic 1.0, Sec. 4).

The other parts of the network are detectron2's own config nodes: the backbone
(``MODEL.BACKBONE.NAME: "build_resnet_fpn_se_backbone"``, ``MODEL.RESNETS``, ``MODEL.FPN``), the
semantic submodule (``MODEL.SEM_SEG_HEAD``: detectron2's ``SemSegFPNHead``, group norm, stride
4), and the detection submodule (``MODEL.RPN``, ``MODEL.ROI_HEADS``, ``MODEL.ROI_BOX_HEAD``,
``MODEL.ROI_MASK_HEAD``; ``MODEL.MASK_ON`` switches the mask head, the "msk." column of Table 1;
``MODEL.ROI_HEADS.SCORE_THRESH_TEST`` is the detection cut-off: 0.5 on Cityscapes, 0.75 on COCO).
See projects/UnifyingTrainingInference/README.md.
"""

from detectron2.config import CfgNode as CN

__all__ = ["add_dense_affinity_panoptic_config"]


def add_dense_affinity_panoptic_config(cfg):
    """Add ``cfg.MODEL.DENSE_AFFINITY_PANOPTIC`` (idempotent)."""
    if "DENSE_AFFINITY_PANOPTIC" in cfg.MODEL:
        return
    node = cfg.MODEL.DENSE_AFFINITY_PANOPTIC = CN()
    # Squeeze-and-excitation on the top ResNet feature before the first FPN feature (Sec. 3.1):
    # channel reduction ratio (16, as in SE-Net; the paper does not give it).
    node.SE_REDUCTION = 16
    # Dynamic potential head (Sec. 3.4.1, Fig. 4): "A" (UPSNet: V (+ M), no score), "B"
    # (s * V * M, Eq. 2 with product) or "C" (s * (V + M), Eq. 2 with sum). Without masks B and
    # C are both Eq. 1 (s * V). B on Cityscapes, C on COCO (Table F).
    node.POTENTIAL = "B"
    # Dense instance affinity head (Sec. 3.4.2, Eq. 3-4), the "aff." column of Table 1.
    node.AFFINITY = True
    # C, channels of the affinity features Q (128 in all the paper's experiments).
    node.AFFINITY_DIM = 128
    # Activation after each of the 1x1 convolutions phi0, phi1 of Eq. 4 (the paper does not name
    # it): "relu" or "none".
    node.AFFINITY_ACTIVATION = "relu"
    # Multiply the affinity term of Eq. 4 by 1 / (h * w) (the number of pixels of the stride-4
    # map). False is the paper's Eq. 4; True is our option (resolution-independent magnitude).
    node.AFFINITY_NORMALIZE = False
    # Std of the normal initialisation of phi0 / phi1 weights (biases 0): small, so that P starts
    # close to Psi (our choice; not in the paper).
    node.AFFINITY_INIT_STD = 0.0001
    # Implementation of the dense affinity op (seg_methods.layers.dense_affinity): "auto", "ext"
    # (compiled op) or "pytorch".
    node.AFFINITY_IMPL = "auto"
    # Panoptic matching loss (Sec. 3.5, Eq. 5), the "e2e." column of Table 1.
    node.PANOPTIC_LOSS = True
    # t of Eq. 5: minimum box IoU (same class) for a ground-truth segment to match a detection.
    node.MATCH_IOU_THRESHOLD = 0.5
    # Loss weights (Sec. 4, Cityscapes): detection (RPN + ROI heads), semantic, panoptic.
    node.DETECTION_WEIGHT = 0.25
    node.SEMANTIC_WEIGHT = 1.0
    node.PANOPTIC_WEIGHT = 1.0
    # Semantic loss: "cross_entropy" (App. A.1) or "lovasz" (Lovász-Softmax, used on Cityscapes
    # with 8 crops per GPU, App. B).
    node.SEMANTIC_LOSS = "cross_entropy"
    # Inference (Table 1): "argmax" over P (amx., no heuristics) or "heuristic" (heu.: the
    # Panoptic-FPN merge of instance masks and semantic segmentation; needs MODEL.MASK_ON).
    node.INFERENCE = "argmax"
    # The heuristic merge (detectron2's Panoptic-FPN values).
    node.HEURISTIC = CN()
    node.HEURISTIC.OVERLAP_THRESHOLD = 0.5
    node.HEURISTIC.STUFF_AREA_LIMIT = 4096
    node.HEURISTIC.INSTANCES_SCORE_THRESHOLD = 0.5
