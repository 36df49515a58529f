"""Axial-ResNet backbone keys (``add_axial_resnet_config``): ``cfg.MODEL.AXIAL_RESNET.*`` only.

Read by the registered backbone ``AxialResNet`` (``seg_methods/modeling/backbone/axial_resnet.py``)
whichever meta-architecture uses it. Python defaults are Axial-ResNet-50 as CMT-DeepLab uses it
(Yu et al., CVPR 2022, Sec. 3.4: the backbone of MaX-DeepLab-S without its transformer blocks,
GeLU activations); values the paper does not give are marked "(ours)".
"""

from detectron2.config import CfgNode as CN


def add_axial_resnet_config(cfg):
    """Add ``cfg.MODEL.AXIAL_RESNET`` (idempotent).

    Args:
        cfg (CfgNode): a detectron2 config, modified in place.
    """
    if "AXIAL_RESNET" in cfg.MODEL:
        return
    b = cfg.MODEL.AXIAL_RESNET = CN()
    b.DEPTH = 50  # 50: blocks [3, 4, 6, 3]; 104: [3, 4, 24, 3] (stage-4 scaled up, Sec. 3.4)
    b.STEM_CHANNELS = 128  # (ours) three 3x3 convs 64-64-128 then max-pool, stride 4
    # Stages whose output stride is >= this use axial blocks, the others conv bottlenecks
    # (ours: MaX-DeepLab's convention of axial attention from stride 16 on).
    b.AXIAL_BEYOND_STRIDE = 16
    b.NUM_HEADS = 8
    # Attention width of an axial block = output channels // this (ours: 2, the wide axial
    # blocks of MaX-DeepLab; it reproduces the ~40M parameters that Axial-R104's 18 extra
    # stage-4 blocks add in CMT-DeepLab's Table 1). Conv bottlenecks keep the ResNet ratio 4.
    b.AXIAL_BOTTLENECK_RATIO = 2
    b.SPAN = 129  # global along each axis for 1281 inputs at stride 16 (81) and 32 (41)
    b.NORM = "BN"
    b.ACTIVATION = "gelu"  # CMT-DeepLab Sec. 3.4: GeLU replaces ReLU
    b.DROP_PATH_RATE = 0.2  # CMT-DeepLab Sec. 4, linearly increasing over the blocks (ours)
    b.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    b.WIDTHS = [256, 512, 1024, 2048]  # output channels of res2..res5 (ResNet-50 widths)
