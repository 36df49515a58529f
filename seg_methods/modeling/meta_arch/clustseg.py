"""ClustSeg meta-architecture (Liang et al., "ClustSeg: Clustering for Universal Segmentation",
ICML 2023).

backbone -> axial pixel decoder -> dreamy-start centres -> 6 recurrent cross-attention decoders ->
(class, mask) per cluster. One architecture, four tasks (``MODEL.CLUSTSEG.TASK``):

* panoptic / instance / semantic: the shared mask-classification core (Hungarian matcher, set
  criterion with deep supervision of every E-step and decoder layer, Mask2Former-style inference;
  :class:`MaskClassificationModel`);
* superpixel: K grid-seeded clusters (K drawn per training batch from
  ``SUPERPIXEL.TRAIN_NUM_RANGE``; at test time ``SUPERPIXEL.TEST_NUM`` or the input's
  ``"num_superpixels"``), trained with the losses of :mod:`..criterion.superpixel` and output as
  ``{"superpixels": (height, width) int64}``.

Shape shorthand:
    B: batch, K: clusters, H, W: padded input size
"""

from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from torch import nn

from ...config.clustseg import superpixel_on
from ..criterion import build_set_criterion
from ..criterion.superpixel import SuperpixelCriterion
from ..postprocessing import output_sizes_from_inputs
from ..postprocessing.superpixel import superpixel_inference
from ..superpixel_counts import check_num_superpixels, check_superpixel_range
from .common import build_decoder_pair, require_inputs
from .mask_classification import MaskClassificationModel


class ClustSegHead(nn.Module):
    """Pixel decoder + ClustSeg decoder (``pixel_decoder`` / ``predictor``)."""

    def __init__(self, pixel_decoder: nn.Module, predictor: nn.Module):
        super().__init__()
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        m = cfg.MODEL.CLUSTSEG
        pixel_decoder, predictor = build_decoder_pair(
            cfg, m.PIXEL_DECODER_NAME, m.TRANSFORMER_DECODER_NAME, input_shape
        )
        return cls(pixel_decoder, predictor)

    def forward(self, features, targets=None, num_superpixels=None):
        mask_features, _, multi_scale_features = self.pixel_decoder.forward_features(features)
        out = self.predictor(
            multi_scale_features,
            mask_features,
            targets=targets,
            num_superpixels=num_superpixels,
        )
        out["mask_features"] = mask_features
        return out


@META_ARCH_REGISTRY.register()
class ClustSeg(MaskClassificationModel):
    """ClustSeg; see :class:`MaskClassificationModel` for the mask-classification tasks.

    Superpixel task: inputs need "regions" (H, W) int64 in training (the "superpixel" mapper);
    an input may carry "num_superpixels" (int, 50..2500, the same for every image of a batch).
    The criterion is then :class:`SuperpixelCriterion` and the targets are
    ``{"regions": (B, H, W), "image": (B, 3, H, W)}``.
    """

    @configurable
    def __init__(
        self,
        *,
        task: str,
        superpixel_train_range: List[int],
        superpixel_test_num: int,
        **kwargs,
    ):
        """
        Args:
            task (str): "panoptic", "instance", "semantic" or "superpixel".
            superpixel_train_range (list[int]): [min, max] superpixels per training batch.
            superpixel_test_num (int): default number of superpixels at test time.
            **kwargs: :class:`MaskClassificationModel` arguments (``criterion``: the set criterion,
                or a :class:`SuperpixelCriterion` for the superpixel task).
        """
        super().__init__(**kwargs)
        self.task = task
        self.superpixel_train_range = check_superpixel_range(
            superpixel_train_range, "superpixel_train_range"
        )
        check_num_superpixels(superpixel_test_num, key="superpixel_test_num")
        self.superpixel_test_num = superpixel_test_num

    @classmethod
    def from_config(cls, cfg):
        m = cfg.MODEL.CLUSTSEG
        superpixel_on(cfg)  # refuses a TEST.SUPERPIXEL_ON that contradicts the task
        sp = m.SUPERPIXEL
        # validated here, not at the random iteration that first draws a bad count
        train_range = check_superpixel_range(
            sp.TRAIN_NUM_RANGE, "MODEL.CLUSTSEG.SUPERPIXEL.TRAIN_NUM_RANGE"
        )
        check_num_superpixels(sp.TEST_NUM, key="MODEL.CLUSTSEG.SUPERPIXEL.TEST_NUM")
        backbone = build_backbone(cfg)
        head = ClustSegHead.from_config(cfg, backbone.output_shape())
        num_aux = head.predictor.num_aux_outputs
        if m.TASK == "superpixel":
            criterion = SuperpixelCriterion(
                slic_weight=sp.SLIC_WEIGHT,
                smooth_l1_weight=sp.SMOOTH_L1_WEIGHT,
                compactness=sp.COMPACTNESS,
                num_aux_outputs=num_aux,
                deep_supervision=cfg.MODEL.MASK_CLS.DEEP_SUPERVISION,
            )
        else:
            criterion = build_set_criterion(cfg, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, num_aux)
        return {
            **cls.base_kwargs(cfg, backbone, head, criterion, m.SIZE_DIVISIBILITY),
            "task": m.TASK,
            "superpixel_train_range": train_range,
            "superpixel_test_num": sp.TEST_NUM,
        }

    # ------------------------------------------------------------------ superpixels
    def num_superpixels(self, batched_inputs: List[Dict], padded_size) -> int:
        """K for this call (see the class docstring); raises ValueError when out of range."""
        num_pixels = (-(-padded_size[0] // 4)) * (-(-padded_size[1] // 4))
        requested = {x.get("num_superpixels") for x in batched_inputs} - {None}
        if len(requested) > 1:
            raise ValueError(f"one 'num_superpixels' per batch, got {sorted(requested)}")
        if requested:
            k = requested.pop()
        elif self.training:
            lo, hi = self.superpixel_train_range
            hi = min(hi, num_pixels)
            if hi < lo:
                check_num_superpixels(lo, num_pixels)  # raises: more clusters than pixels
            k = int(torch.randint(lo, hi + 1, ()).item())
        else:
            k = self.superpixel_test_num
        check_num_superpixels(k, num_pixels)
        return k

    # ------------------------------------------------------------------ hooks
    def targets(self, batched_inputs: List[Dict], images):
        """Superpixels: ``{"regions": (B, H, W) region ids (-1 on padding), "image": (B, 3, H, W)
        normalised input}``; other tasks: the base's targets."""
        if self.task != "superpixel":
            return super().targets(batched_inputs, images)
        require_inputs(
            batched_inputs,
            "regions",
            "Training ClustSeg on superpixels",
            "set INPUT.DATASET_MAPPER_NAME='superpixel'",
        )
        h, w = images.tensor.shape[-2:]
        regions = torch.full((len(batched_inputs), h, w), -1, dtype=torch.long, device=self.device)
        for i, x in enumerate(batched_inputs):
            r = x["regions"].to(self.device)
            regions[i, : r.shape[0], : r.shape[1]] = r
        return {"regions": regions, "image": images.tensor}

    def forward_head(self, images, batched_inputs: List[Dict], targets=None) -> Dict:
        """Backbone + ClustSeg head; the head reads mask targets (memory bank) or K."""
        features = self.backbone(images.tensor)
        if self.task == "superpixel":
            k = self.num_superpixels(batched_inputs, tuple(images.tensor.shape[-2:]))
            return self.sem_seg_head(features, num_superpixels=k)
        return self.sem_seg_head(features, targets=targets)

    def inference(self, outputs: Dict, images, batched_inputs: List[Dict]):
        """Superpixels: {"superpixels": (height, width) int64}; other tasks: the base's."""
        if self.task != "superpixel":
            return super().inference(outputs, images, batched_inputs)
        padded = tuple(images.tensor.shape[-2:])
        output_sizes = output_sizes_from_inputs(batched_inputs, images.image_sizes)
        return [
            {
                "superpixels": superpixel_inference(
                    outputs["mask_embed"][i],
                    outputs["mask_features"][i],
                    padded,
                    images.image_sizes[i],
                    output_sizes[i],
                )
            }
            for i in range(len(batched_inputs))
        ]
