"""CRM keys: ``cfg.MODEL.CRM.*`` only.

Python defaults are the official setting of Shen et al., "High Quality Segmentation for Ultra
High-resolution Images" (CVPR 2022; dvlab-research/Entity ``High-Quality-Segmention``:
``models/network/crm.py``, ``aspp.py``, ``train.py``, ``test.py``, ``util/hyper_para.py``). The
encoder's backbone is ``MODEL.BACKBONE`` (our configs: ``build_timm_backbone`` with
``MODEL.TIMM``: resnet50, IN_CHANS 4, OUTPUT_STRIDE 8, OUT_INDICES [0, 1, 3]); it must take the
4-channel input [image, coarse mask]. See projects/CRM/README.md.
"""

from detectron2.config import CfgNode as CN

__all__ = ["add_crm_config"]


def add_crm_config(cfg):
    """Add ``cfg.MODEL.CRM`` (idempotent)."""
    if "CRM" in cfg.MODEL:
        return
    cfg.MODEL.CRM = CN()
    # Backbone outputs fused into the latent map, finest first; the latent map has the first
    # one's resolution (official: stem (stride 2), layer1 (4), dilated layer3 (8)).
    cfg.MODEL.CRM.IN_FEATURES = ["s2", "s4", "s8"]
    # Fusion (official ASPP_no4level): a 1x1 conv branch per level, then a 3x3 conv to
    # FUSION_CHANNELS latent channels; NORM is a detectron2 norm name; dropout after each branch
    # and after the fusion (official 0.5).
    cfg.MODEL.CRM.BRANCH_CHANNELS = [64, 64, 128]
    cfg.MODEL.CRM.FUSION_CHANNELS = 256
    cfg.MODEL.CRM.NORM = "BN"
    cfg.MODEL.CRM.DROPOUT = 0.5
    # Implicit decoder: MLP hidden widths; absolute query coordinate in the MLP input (official;
    # the continuous alignment, CAM); cell size in the input (official); local ensemble of the
    # 4 nearest latent codes weighted by opposite areas (official).
    cfg.MODEL.CRM.MLP_HIDDEN_DIMS = [32, 32, 32, 32]
    cfg.MODEL.CRM.ABS_COORD = True
    cfg.MODEL.CRM.CELL_DECODE = True
    cfg.MODEL.CRM.LOCAL_ENSEMBLE = True
    # Loss weights (official util/hyper_para.py): L1, L2 (MSE), Sobel-gradient L1, BCE (0).
    cfg.MODEL.CRM.L1_WEIGHT = 1.0
    cfg.MODEL.CRM.L2_WEIGHT = 1.0
    cfg.MODEL.CRM.GRAD_WEIGHT = 5.0
    cfg.MODEL.CRM.CE_WEIGHT = 0.0
    cfg.MODEL.CRM.SOBEL_EPS = 1e-4
    # Inference: cascade scales (paper Table 5 / official test.py), each scale's output fed to
    # the next as (prob - 0.5) * 2.
    cfg.MODEL.CRM.TEST_SCALES = [0.125, 0.25, 0.5, 1.0]
    # Queries per decoder call at inference (official test.py: 50176 * 16 on a GPU); the latent
    # map is computed once per scale and reused across chunks. <= 0: all queries at once.
    cfg.MODEL.CRM.QUERY_CHUNK = 65536
    # At inference, latent maps (stride 2) with more rows than this are fused in strips of this
    # many rows (equal up to float rounding), so that the 256-channel fused map of a large input
    # never exists whole (4.4 GB at 4096 x 4096). 0: always fuse the whole map (official).
    cfg.MODEL.CRM.FUSION_TILE_ROWS = 512
    # Reflect padding of the test input, cropped from the output (official test set: 32).
    cfg.MODEL.CRM.TEST_PAD = 32
    # Official: a scale whose coarse mask is (almost) empty, sum(seg + 1) < 2, outputs 0.
    cfg.MODEL.CRM.SUPPRESS_EMPTY = True
    # Refine any seg_methods model's output: a config file of that model (any of our configs,
    # absolute or relative to the working directory or the repository root) and its weights.
    # When BASE_CONFIG is set, the model is built frozen inside CRM; an input without
    # "coarse_mask" is then refined class by class from the model's "sem_seg". BASE_WEIGHTS
    # given: the base model is loaded from it and is not part of CRM's checkpoints (MODEL.WEIGHTS
    # is CRM's own weights); empty: the base model is a submodule whose weights are saved and
    # loaded with CRM's (base_model.*), random until then (with a warning).
    cfg.MODEL.CRM.BASE_CONFIG = ""
    cfg.MODEL.CRM.BASE_WEIGHTS = ""
    # Coarse mask of class c given to CRM: "argmax" (CascadePSP's scene-parsing protocol: the
    # binary mask of the base prediction's argmax == c) or "probability" (the base model's
    # probability of c).
    cfg.MODEL.CRM.SEMANTIC_INPUT = "argmax"
