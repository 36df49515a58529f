"""Hierarchical Lovász Embeddings keys: ``cfg.MODEL.HLE.*`` only.

Kerola et al., "Hierarchical Lovász Embeddings for Proposal-free Panoptic Segmentation" (CVPR
2021). No public code exists; the defaults are the paper's Cityscapes setting where it gives one
(d = 12, gamma = 10, Thomson initialisation, VQ-VAE-style class-mean loss, Lovász losses) and our
choices where it does not (initial variances, coordinate scale, decoding thresholds: the paper
tuned its decoder with Optuna and does not list the values). See
projects/HierarchicalLovaszEmbeddings/README.md.

The backbone and the feature decoder are ``MODEL.BACKBONE`` and ``MODEL.SEM_SEG_HEAD`` (detectron2's
``DeepLabV3PlusHead``, built without its class predictor).
"""

from detectron2.config import CfgNode as CN

__all__ = ["add_hle_config"]


def add_hle_config(cfg):
    """Add ``cfg.MODEL.HLE`` (idempotent)."""
    if "HLE" in cfg.MODEL:
        return
    cfg.MODEL.HLE = CN()
    # d: embedding dimension (12 on Cityscapes, 128 on COCO / Vistas; Sec. 4.2).
    cfg.MODEL.HLE.EMBED_DIM = 12
    # Initial instance variance sigma_i (Eq. 7, predicted per pixel through a softplus) and
    # semantic variance sigma_k (Eq. 9, one learned parameter per class). Not in the paper.
    cfg.MODEL.HLE.INSTANCE_SIGMA_INIT = 0.5
    cfg.MODEL.HLE.SEMANTIC_SIGMA_INIT = 0.25
    # Learned spatial bandwidth sigma_spatial of Eq. 8 (one parameter), in units of COORD_SCALE
    # pixels: positions rho are (row, column) / COORD_SCALE of the padded network input.
    cfg.MODEL.HLE.SPATIAL_SIGMA_INIT = 0.5
    cfg.MODEL.HLE.COORD_SCALE = 1024.0
    # Loss weights of Eq. 16 (all 1 in the paper) and gamma of Eq. 14.
    cfg.MODEL.HLE.SEG_WEIGHT = 1.0
    cfg.MODEL.HLE.SEG_MEAN_WEIGHT = 1.0
    cfg.MODEL.HLE.INS_WEIGHT = 1.0
    cfg.MODEL.HLE.INS_VAR_WEIGHT = 10.0
    cfg.MODEL.HLE.SEED_WEIGHT = 1.0
    # Classes averaged by the Lovász-Softmax of Eq. 12: "present" or "all".
    cfg.MODEL.HLE.SEG_LOVASZ_CLASSES = "present"
    # Class means mu_k used by the semantic kernel in training (Eq. 10): "persistent" (the learned
    # class means mu_hat_k for every class, as used at test time) or "image" (the ground-truth mean
    # of the image's embeddings for the classes present in it, mu_hat_k for the others).
    cfg.MODEL.HLE.SEMANTIC_MEANS = "persistent"
    # Thomson initialisation of the class means (Eq. 17): gradient-descent steps, learning rate
    # and random seed of the starting point.
    cfg.MODEL.HLE.THOMSON_INIT = True
    cfg.MODEL.HLE.THOMSON_ITERS = 500
    cfg.MODEL.HLE.THOMSON_LR = 0.05
    cfg.MODEL.HLE.THOMSON_SEED = 0

    # ---- Table 6 ablation switches (defaults = the proposed model, rightmost column).
    # Instance loss: "lovasz" (Eq. 11), "bce" (binary cross-entropy on phi, the cross-entropy
    # column) or "associative" (Eq. 1-2 on instances).
    cfg.MODEL.HLE.INSTANCE_LOSS = "lovasz"
    # Semantic loss: "lovasz" (Eq. 12), "cross_entropy" (on log psi, or on the separate branch's
    # logits) or "associative" (Eq. 1-2 on classes, with larger margins: the hierarchical AE).
    cfg.MODEL.HLE.SEMANTIC_LOSS = "lovasz"
    # "embedding": classes from the embedding (Eq. 9); "separate": a separate softmax classifier
    # branch on the decoder features ("Sep. seg. branch"), the embedding encodes instances only.
    cfg.MODEL.HLE.SEMANTIC_BRANCH = "embedding"
    # "Split emb. space": the first d/2 channels encode classes, the last d/2 instances.
    cfg.MODEL.HLE.SPLIT_EMBEDDING = False
    # "VQ-VAE style": the class-mean regression of Eq. 15 (False: means learned by backprop only).
    cfg.MODEL.HLE.VQ_LOSS = True
    # Margins (delta_pull, delta_push) of the associative-embedding losses (Eq. 1-2; L1 distance),
    # for instances and for classes. Not given in the paper.
    cfg.MODEL.HLE.AE_INSTANCE_DELTAS = [0.5, 1.5]
    cfg.MODEL.HLE.AE_SEMANTIC_DELTAS = [1.0, 3.0]

    # ---- Panoptic decoding (Sec. 3.5). The paper tuned these with Optuna and does not list them.
    cfg.MODEL.HLE.DECODE = CN()
    cfg.MODEL.HLE.DECODE.SEED_THRESHOLD = 0.5  # candidate seeds after 3x3 max-pool NMS
    cfg.MODEL.HLE.DECODE.NMS_KERNEL = 3
    cfg.MODEL.HLE.DECODE.MASK_THRESHOLD = 0.5  # Phi(seed, pixel) > this: pixel in the mask
    cfg.MODEL.HLE.DECODE.MERGE_THRESHOLD = 0.5  # Phi(seed, other seed) > this: seeds merged
    cfg.MODEL.HLE.DECODE.STUFF_THRESHOLD = 0.5  # psi_k > this on pixels of stuff class k
    cfg.MODEL.HLE.DECODE.THING_MIN_AREA = 0  # pixels, at the network input resolution
    cfg.MODEL.HLE.DECODE.STUFF_MIN_AREA = 0
    cfg.MODEL.HLE.DECODE.MAX_INSTANCES = 200
    # > 1: the fast variant (seeds found on an embedding average-pooled by this factor, then
    # every full-resolution pixel assigned to its best seed); 1: exact.
    cfg.MODEL.HLE.DECODE.DOWNSAMPLE = 1
    # Inner loops of the decoding: "auto" = the compiled op (layers/hle_decode.py, same labels as
    # the reference) when seg_methods._C has it, else pure PyTorch; "ext" requires it; "pytorch".
    cfg.MODEL.HLE.DECODE.IMPL = "auto"
    # Inference also returns "embedding" (D, H, W) unit embeddings (demo/demo.py --paint-embedding).
    cfg.MODEL.HLE.OUTPUT_EMBEDDING = False
