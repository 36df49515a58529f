"""Configuration: ``get_cfg`` returns detectron2's defaults extended with every seg_methods key."""
from detectron2.config import get_cfg as _d2_get_cfg

from .common import add_common_config


def add_seg_methods_config(cfg):
    """Add the shared keys and every method's ``cfg.MODEL.<METHOD>`` node to ``cfg``."""
    # Imported here so each method's config module stays independent of the others.
    from .axial_pixel_decoder import add_axial_pixel_decoder_config
    from .axial_resnet import add_axial_resnet_config
    from .clustseg import add_clustseg_config
    from .cmt_deeplab import add_cmt_deeplab_config
    from .crm import add_crm_config
    from .dense_affinity_panoptic import add_dense_affinity_panoptic_config
    from .hle import add_hle_config
    from .hssn import add_hssn_config
    from .mask2former import add_mask2former_config
    from .msdeform_pixel_decoder import add_msdeform_pixel_decoder_config
    from .panoptic_segformer import add_panoptic_segformer_config
    from .per_pixel import add_per_pixel_config
    from .pisr import add_pisr_config
    from .protoseg import add_protoseg_config
    from .refinement_data import add_refinement_data_config
    from .regproxy import add_regproxy_config
    from .speed import add_speed_config
    from .swin import add_swin_config
    from .timm_backbone import add_timm_backbone_config

    add_common_config(cfg)
    add_swin_config(cfg)
    add_timm_backbone_config(cfg)  # generic timm backbone (MODEL.TIMM)
    add_axial_resnet_config(cfg)
    add_msdeform_pixel_decoder_config(cfg)
    add_axial_pixel_decoder_config(cfg)
    add_mask2former_config(cfg)
    add_cmt_deeplab_config(cfg)
    add_clustseg_config(cfg)
    add_per_pixel_config(cfg)  # per-pixel semantic template (MODEL/TEST.PER_PIXEL)
    add_hssn_config(cfg)
    add_protoseg_config(cfg)
    add_crm_config(cfg)  # CRM (MODEL.CRM)
    add_refinement_data_config(cfg)  # INPUT.REFINEMENT (refinement mapper)
    add_regproxy_config(cfg)  # RegProxy (MODEL.REGPROXY)
    add_hle_config(cfg)  # Hierarchical Lovász Embeddings (MODEL.HLE)
    add_dense_affinity_panoptic_config(cfg)  # Unifying Training & Inference (issue 9)
    add_panoptic_segformer_config(cfg)  # Panoptic SegFormer (MODEL.PANOPTIC_SEGFORMER, issue 11)
    add_speed_config(cfg)  # training-speed switches (SPEED.*, issue 8)
    add_pisr_config(cfg)  # PISR (MODEL.PISR + Panoptic-DeepLab keys, issue 11)
    return cfg


def get_cfg():
    """detectron2's default config with all seg_methods keys added."""
    return add_seg_methods_config(_d2_get_cfg())


__all__ = ["add_common_config", "add_seg_methods_config", "get_cfg"]
