"""CMT-DeepLab meta-architecture (Yu et al., "CMT-DeepLab: Clustering Mask Transformers for
Panoptic Segmentation", CVPR 2022).

backbone (Axial-ResNet-50/104 or any detectron2 backbone with res2..res5) -> dual-path axial
transformer blocks with Clustering Mask Transformer layers (Eq. 6-12) -> upsampling path to stride
4 -> masks as a softmax over the N cluster centres (Eq. 4 + residual Eq. 6), classes per centre.
Trained with the MaX-DeepLab losses and CMT-DeepLab's pixel-wise instance discrimination (Eq. 14)
and mask approximation (Eq. 13) losses (:class:`CMTDeepLabCriterion`); panoptic inference by
mask-wise merging (:func:`mask_wise_merge`), or MaX-DeepLab's per-pixel argmax.

With ``MODEL.CMT_DEEPLAB.RFN`` the whole model is stacked twice (Recursive Feature Network,
Sec. 3.4): the first copy's stride-4 decoder features are added (through a zero-initialised 1x1
convolution, ours) to the stem output of the second copy's backbone, and the final prediction is
made by the second copy's heads from the average of both copies' stride-4 features.

Shape shorthand:
    B: batch, N: cluster centres, C: classes, H, W: padded input size, h4, w4: H / 4, W / 4
"""

from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList
from torch import nn
from torch.nn import functional as F

from ..build import build_mask_cls_head
from ..criterion.cmt_deeplab import CMTDeepLabCriterion
from ..postprocessing import (
    instance_inference,
    mask_wise_merge,
    output_sizes_from_inputs,
    per_pixel_merge,
)
from ..transformer_decoder import cmt_deeplab_decoder  # noqa: F401  (registers the head)
from .mask_classification import MaskClassificationModel

__all__ = ["CMTDeepLab"]


@META_ARCH_REGISTRY.register()
class CMTDeepLab(MaskClassificationModel):
    """CMT-DeepLab; inputs and outputs as :class:`MaskClassificationModel`."""

    @configurable
    def __init__(
        self,
        *,
        rfn_backbone: nn.Module = None,
        rfn_head: nn.Module = None,
        panoptic_merge: str = "mask_wise",
        class_threshold: float = 0.7,
        overlap_threshold: float = 0.8,
        **kwargs,
    ):
        """
        Args:
            rfn_backbone, rfn_head (nn.Module or None): the second copy of the model (RFN).
            panoptic_merge (str): "mask_wise" or "per_pixel".
            class_threshold (float): minimum class confidence of a panoptic segment.
            overlap_threshold (float): mask-wise merging overlap threshold.
            **kwargs: see :class:`MaskClassificationModel` (``sem_seg_head`` is the head named by
                ``MODEL.CMT_DEEPLAB.HEAD_NAME`` in MASK_CLS_HEAD_REGISTRY, by default
                :class:`CMTDeepLabDecoder`, whose ``forward_features`` / ``predict`` interface it
                must have; ``criterion`` the :class:`CMTDeepLabCriterion`).
        """
        super().__init__(**kwargs)
        if panoptic_merge not in ("mask_wise", "per_pixel"):
            raise ValueError(
                f"PANOPTIC_MERGE must be 'mask_wise' or 'per_pixel', got {panoptic_merge!r}"
            )
        self.rfn_backbone = rfn_backbone
        self.rfn_head = rfn_head
        if rfn_backbone is not None:
            stem_channels = getattr(rfn_backbone, "stem_channels", None)
            if stem_channels is None:
                raise ValueError("RFN needs a backbone with a stride-4 input (AxialResNet)")
            self.rfn_connect = nn.Conv2d(self.sem_seg_head.out_channels, stem_channels, 1)
            nn.init.zeros_(self.rfn_connect.weight)
            nn.init.zeros_(self.rfn_connect.bias)
        self.panoptic_merge = panoptic_merge
        self.class_threshold = class_threshold
        self.overlap_threshold = overlap_threshold

    @classmethod
    def from_config(cls, cfg):
        m = cfg.MODEL.CMT_DEEPLAB
        backbone = build_backbone(cfg)

        def build_head():
            return build_mask_cls_head(
                cfg, m.HEAD_NAME, backbone.output_shape(), "MODEL.CMT_DEEPLAB.HEAD_NAME"
            )

        head = build_head()
        rfn_backbone = rfn_head = None
        if m.RFN:
            rfn_backbone = build_backbone(cfg)
            rfn_head = build_head()
        # every CMT layer is supervised, those of both copies with RFN
        num_layers = sum(m.DEC_BLOCKS) * (2 if m.RFN else 1)
        criterion = CMTDeepLabCriterion(
            num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            pq_weight=m.PQ_WEIGHT,
            pq_alpha=m.PQ_ALPHA,
            mask_id_weight=m.MASK_ID_WEIGHT,
            sem_weight=m.SEM_WEIGHT,
            insdis_weight=m.INSDIS_WEIGHT,
            loc_weight=m.LOC_WEIGHT if m.LOCATION_SENSITIVE else 0.0,
            insdis_temperature=m.INSDIS_TEMPERATURE,
            insdis_num_samples=m.INSDIS_NUM_SAMPLES,
            insdis_sample_temperature=m.INSDIS_SAMPLE_TEMPERATURE,
            deep_supervision=cfg.MODEL.MASK_CLS.DEEP_SUPERVISION,
            num_aux_outputs=num_layers,
            aux_matching=m.AUX_MATCHING,
        )
        return {
            **cls.base_kwargs(cfg, backbone, head, criterion, m.SIZE_DIVISIBILITY),
            "rfn_backbone": rfn_backbone,
            "rfn_head": rfn_head,
            "panoptic_merge": m.PANOPTIC_MERGE,
            "class_threshold": m.CLASS_THRESHOLD,
            "overlap_threshold": m.OVERLAP_THRESHOLD,
        }

    def forward_head(self, images: ImageList, batched_inputs: List[Dict], targets=None) -> Dict:
        """Backbone + CMT decoder (twice with RFN); see :meth:`CMTDeepLabDecoder.predict`."""
        x = images.tensor
        pixels, centers, logits, _, layers = self.sem_seg_head.forward_features(self.backbone(x))
        if self.rfn_backbone is None:
            return self.sem_seg_head.predict(pixels, centers, logits, layers)
        feats = self.rfn_backbone(x, stride4_extra=self.rfn_connect(pixels))
        pixels2, centers, logits, _, layers2 = self.rfn_head.forward_features(feats)
        averaged = 0.5 * (pixels + pixels2)  # Sec. 3.4: average the stride-4 features
        out = self.rfn_head.predict(averaged, centers, logits, layers2)
        # the first copy's layers are supervised too
        out["aux_outputs"] = layers + out["aux_outputs"]
        return out

    @torch.no_grad()
    def inference(self, outputs: Dict, images: ImageList, batched_inputs: List[Dict]):
        """Semantic / panoptic / instance outputs from softmax-over-centres masks.

        Masks are upsampled (bilinear logits) to the padded input, cropped to the image, resized
        to the requested output size, then normalised over the N centres. Semantic scores are
        ``sum_n p_n(c) * m_n``; panoptic segments come from :func:`mask_wise_merge` (or
        :func:`per_pixel_merge`); instances from the shared :func:`instance_inference` applied to
        ``log(m / (1 - m))`` so that its sigmoid gives back the softmax masks.
        """
        kw = self.postprocess_kwargs
        mask_logits = F.interpolate(
            outputs["pred_masks"], size=images.tensor.shape[-2:], mode="bilinear",
            align_corners=False,
        )  # fmt: skip
        results = []
        sizes = output_sizes_from_inputs(batched_inputs, images.image_sizes)
        for cls_logits, logits, image_size, (height, width) in zip(
            outputs["pred_logits"], mask_logits, images.image_sizes, sizes
        ):
            logits = sem_seg_postprocess(logits, image_size, height, width)  # (N, h, w)
            mask_probs = logits.softmax(0)
            class_probs = cls_logits.softmax(-1)  # (N, C + 1)
            result = {}
            if kw.get("semantic_on", True):
                result["sem_seg"] = torch.einsum("nc,nhw->chw", class_probs[:, :-1], mask_probs)
            if kw.get("panoptic_on", False):
                if self.panoptic_merge == "mask_wise":
                    result["panoptic_seg"] = mask_wise_merge(
                        class_probs,
                        mask_probs,
                        thing_ids=kw.get("thing_ids", ()),
                        class_threshold=self.class_threshold,
                        overlap_threshold=self.overlap_threshold,
                    )
                else:
                    result["panoptic_seg"] = per_pixel_merge(
                        class_probs,
                        mask_probs,
                        thing_ids=kw.get("thing_ids", ()),
                        class_threshold=self.class_threshold,
                    )
            if kw.get("instance_on", False):
                p = mask_probs.clamp(1e-6, 1 - 1e-6)
                result["instances"] = instance_inference(
                    cls_logits,
                    torch.log(p) - torch.log1p(-p),
                    test_topk_per_image=kw.get("test_topk_per_image", 100),
                    thing_ids=kw.get("thing_ids") if kw.get("panoptic_on") else None,
                )
            results.append(result)
        return results
