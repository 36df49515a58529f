"""ProtoSeg keys: ``cfg.MODEL.PROTOSEG.*`` only.

Python defaults are the official Cityscapes HRNet-W48 setting of Zhou et al., "Rethinking
Semantic Segmentation: A Prototype View" (CVPR 2022; code tfzhou/ProtoSeg,
``configs/cityscapes/H_48_D_4_proto.json`` and ``lib/models/nets/hrnet.py``): M = 10 prototypes
per class, 720-d embeddings, Sinkhorn-Knopp with 3 iterations and epsilon 0.05, momentum 0.999,
PPC / PPD weights 0.01 / 0.001. Where the official code and the paper differ, the default is the
official code and the paper's version is an option (see projects/ProtoSeg/README.md).

The backbone and the feature head are ``MODEL.BACKBONE`` and ``MODEL.SEM_SEG_HEAD`` (a
``DeepLabV3PlusHead`` or an ``HRNetV2Head`` on a timm HRNet, built without its class predictor);
the cross-entropy weight is ``MODEL.SEM_SEG_HEAD.LOSS_WEIGHT``.
"""

from detectron2.config import CfgNode as CN

__all__ = ["add_protoseg_config"]


def add_protoseg_config(cfg):
    """Add ``cfg.MODEL.PROTOSEG`` (idempotent)."""
    if "PROTOSEG" in cfg.MODEL:
        return
    cfg.MODEL.PROTOSEG = CN()
    # M: non-learnable prototypes per class.
    cfg.MODEL.PROTOSEG.NUM_PROTOTYPES = 10
    # D: pixel-embedding / prototype dimension (720 = HRNet-W48's 48 + 96 + 192 + 384).
    cfg.MODEL.PROTOSEG.EMBED_DIM = 720
    # Projection head on the feature head's output: "convmlp" (official: 1x1 conv, ReLU, 1x1 conv)
    # or "linear" (one 1x1 conv).
    cfg.MODEL.PROTOSEG.PROJECTION = "convmlp"
    # Official: a LayerNorm over the embedding between two L2 normalisations; False: L2 only
    # (the paper).
    cfg.MODEL.PROTOSEG.FEATURE_NORM = True
    # Official: a LayerNorm over classes applied to the max-over-prototypes cosines; False: the
    # raw cosines are the class logits (the paper).
    cfg.MODEL.PROTOSEG.LOGITS_NORM = True
    # Sinkhorn-Knopp online clustering of each class's pixels onto its prototypes.
    cfg.MODEL.PROTOSEG.SINKHORN_ITERATIONS = 3
    cfg.MODEL.PROTOSEG.SINKHORN_EPSILON = 0.05
    # Assignment used for the prototype update: "gumbel" (official: a hard Gumbel-softmax sample
    # of the Sinkhorn matrix, temperature GUMBEL_TAU) or "argmax" (the paper). The PPC/PPD
    # targets are always the argmax (as in both).
    cfg.MODEL.PROTOSEG.UPDATE_ASSIGNMENT = "gumbel"
    cfg.MODEL.PROTOSEG.GUMBEL_TAU = 0.5
    # Momentum of the prototype moving average (gamma).
    cfg.MODEL.PROTOSEG.MOMENTUM = 0.999
    # False: prototypes stay at their random initialisation (ablation).
    cfg.MODEL.PROTOSEG.UPDATE_PROTOTYPES = True
    # Loss weights of the pixel-prototype contrastive (PPC) and distance (PPD) terms.
    cfg.MODEL.PROTOSEG.PPC_WEIGHT = 0.01
    cfg.MODEL.PROTOSEG.PPD_WEIGHT = 0.001
    # Temperature of the PPC softmax over the C * M cosines; 1.0: the official raw cosines.
    cfg.MODEL.PROTOSEG.PPC_TEMPERATURE = 1.0
    # Axis of the L2 normalisation right after the projection head: "channels" (ours, the paper)
    # or "width" (the official ProjectionHead normalises its (B, D, h, w) output along the last
    # axis, the image width; needed to reproduce the logits of official checkpoints, see
    # tools/convert_protoseg_weights.py).
    cfg.MODEL.PROTOSEG.PROJECTION_L2_AXIS = "channels"
    # Per-class weights of the cross-entropy (C values, weighted mean as nn.CrossEntropyLoss);
    # []: plain cross-entropy. The official Cityscapes recipe uses loss.params.ce_weight.
    cfg.MODEL.PROTOSEG.CE_CLASS_WEIGHTS = []
    # True: inference also returns "prototype_index" (height, width) int64, each pixel's nearest
    # prototype c * M + m (one extra whole-image pass; used by demo/demo.py --paint-prototypes).
    cfg.MODEL.PROTOSEG.OUTPUT_PROTOTYPE_INDEX = False
