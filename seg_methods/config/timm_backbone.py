"""Generic timm backbone keys (``add_timm_backbone_config``): ``cfg.MODEL.TIMM.*`` only.

Used by ``MODEL.BACKBONE.NAME: "build_timm_backbone"``
(:mod:`seg_methods.modeling.backbone.timm_backbone`). Python defaults build a randomly initialised
timm ResNet-50 with detectron2-style outputs res2..res5 (strides 4..32).
"""

from detectron2.config import CfgNode as CN

__all__ = ["add_timm_backbone_config"]


def add_timm_backbone_config(cfg):
    """Add ``cfg.MODEL.TIMM`` (idempotent).

    Args:
        cfg (CfgNode): a detectron2 config, modified in place.
    """
    if "TIMM" in cfg.MODEL:
        return
    cfg.MODEL.TIMM = CN()
    # Any name accepted by timm.create_model (see timm.list_models()).
    cfg.MODEL.TIMM.NAME = "resnet50"
    # True downloads timm's pretrained weights (needs network access, usually the Hugging Face
    # Hub). Offline, keep False and load converted weights through MODEL.WEIGHTS instead.
    cfg.MODEL.TIMM.PRETRAINED = False
    # Input image channels (timm adapts the stem; pretrained stems are summed / repeated by timm).
    cfg.MODEL.TIMM.IN_CHANS = 3
    # 0: the model's default output stride; else passed to timm (e.g. 8 or 16 for dilated
    # ResNets). Not every timm model supports it.
    cfg.MODEL.TIMM.OUTPUT_STRIDE = 0
    # Indices into the timm model's feature_info (e.g. ResNet: 0 = stem (stride 2), 1..4 =
    # layer1..layer4 (strides 4..32); HRNet with feature_location='': 0 = stem, 1..4 = branches).
    cfg.MODEL.TIMM.OUT_INDICES = [1, 2, 3, 4]
    # Names of the returned features, one per OUT_INDICES entry (same order).
    cfg.MODEL.TIMM.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # "": keep timm's BatchNorm; "FrozenBN": freeze every BatchNorm (timm's
    # freeze_batch_norm_2d, which keeps BatchNormAct activations); "SyncBN": convert to
    # SyncBatchNorm.
    cfg.MODEL.TIMM.NORM = ""
    # Extra keyword arguments of timm.create_model as "key=value" strings, each value parsed with
    # ast.literal_eval, e.g. ["feature_location=''"] for HRNet's raw branch outputs or
    # ["drop_path_rate=0.1"].
    cfg.MODEL.TIMM.EXTRA_ARGS = []
    # "": keep the model's nn.Upsample layers; else set every nn.Upsample of the timm model to
    # this mode: "nearest", "bilinear" or "bilinear_align_corners" (bilinear, align_corners=True;
    # HRNet for segmentation, e.g. ProtoSeg's official HRNet-W48, fuses its branches this way,
    # while timm's classification HRNet uses nearest).
    cfg.MODEL.TIMM.UPSAMPLE_MODE = ""
