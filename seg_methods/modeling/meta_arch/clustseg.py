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

from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from torch import nn

from ..build import build_pixel_decoder, build_transformer_decoder
from ..criterion import build_set_criterion
from ..criterion.superpixel import superpixel_losses
from ..postprocessing import mask_cls_postprocess
from ..postprocessing import output_sizes_from_inputs
from ..postprocessing.superpixel import superpixel_inference
from ..transformer_decoder.clustseg_layers import check_num_superpixels
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
        pixel_decoder = build_pixel_decoder(cfg, m.PIXEL_DECODER_NAME, input_shape)
        predictor = build_transformer_decoder(cfg, m.TRANSFORMER_DECODER_NAME, m.CONVS_DIM, True)
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
    """

    @configurable
    def __init__(
        self,
        *,
        task: str,
        superpixel_train_range: List[int],
        superpixel_test_num: int,
        superpixel_loss_weights: Dict[str, float],
        superpixel_compactness: float,
        **kwargs,
    ):
        """
        Args:
            task (str): "panoptic", "instance", "semantic" or "superpixel".
            superpixel_train_range (list[int]): [min, max] superpixels per training batch.
            superpixel_test_num (int): default number of superpixels at test time.
            superpixel_loss_weights (dict): loss name -> weight (superpixel task).
            superpixel_compactness (float): m of the SLIC loss.
            **kwargs: :class:`MaskClassificationModel` arguments.
        """
        super().__init__(**kwargs)
        self.task = task
        self.superpixel_train_range = [int(v) for v in superpixel_train_range]
        self.superpixel_test_num = int(superpixel_test_num)
        self.superpixel_loss_weights = dict(superpixel_loss_weights)
        self.superpixel_compactness = superpixel_compactness

    @classmethod
    def from_config(cls, cfg):
        m = cfg.MODEL.CLUSTSEG
        backbone = build_backbone(cfg)
        head = ClustSegHead.from_config(cfg, backbone.output_shape())
        num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        criterion = build_set_criterion(cfg, num_classes, head.predictor.num_aux_outputs)
        sp = m.SUPERPIXEL
        weights = {
            "loss_slic_ce": sp.SLIC_WEIGHT,
            "loss_slic_pos": sp.SLIC_WEIGHT,
            "loss_smooth_l1": sp.SMOOTH_L1_WEIGHT,
        }
        if len(sp.TRAIN_NUM_RANGE) != 2 or sp.TRAIN_NUM_RANGE[0] > sp.TRAIN_NUM_RANGE[1]:
            raise ValueError(
                f"SUPERPIXEL.TRAIN_NUM_RANGE must be [min, max], got " f"{sp.TRAIN_NUM_RANGE}"
            )
        return {
            **cls.base_kwargs(cfg, backbone, head, criterion, m.SIZE_DIVISIBILITY),
            "task": m.TASK,
            "superpixel_train_range": list(sp.TRAIN_NUM_RANGE),
            "superpixel_test_num": sp.TEST_NUM,
            "superpixel_loss_weights": weights,
            "superpixel_compactness": sp.COMPACTNESS,
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

    def superpixel_loss(self, outputs: Dict, batched_inputs: List[Dict], images) -> Dict:
        if "regions" not in batched_inputs[0]:
            raise ValueError(
                "Training ClustSeg on superpixels needs 'regions' in every input; set "
                "INPUT.DATASET_MAPPER_NAME='superpixel'"
            )
        h, w = images.tensor.shape[-2:]
        regions = torch.full((len(batched_inputs), h, w), -1, dtype=torch.long, device=self.device)
        for i, x in enumerate(batched_inputs):
            r = x["regions"].to(self.device)
            regions[i, : r.shape[0], : r.shape[1]] = r
        preds = [outputs] + list(outputs.get("aux_outputs", []))
        losses = {}
        for i, p in enumerate(preds):
            suffix = "" if i == 0 else f"_{i - 1}"
            raw = superpixel_losses(
                p["pred_masks"], regions, images.tensor, compactness=self.superpixel_compactness
            )
            for k, v in raw.items():
                losses[k + suffix] = v * self.superpixel_loss_weights[k]
        return losses

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: dataset-mapper dicts ("image" and, in training, "instances" or, for
                superpixels, "regions"; optional "num_superpixels", "height", "width").

        Returns:
            training: dict of weighted losses; inference: per image the outputs of the task
            ("sem_seg" / "panoptic_seg" / "instances", or "superpixels" (height, width) int64).
        """
        images = self.preprocess_images(batched_inputs)
        padded = tuple(images.tensor.shape[-2:])
        features = self.backbone(images.tensor)
        k: Optional[int] = None
        targets = None
        if self.task == "superpixel":
            k = self.num_superpixels(batched_inputs, padded)
        elif self.training:
            if "instances" not in batched_inputs[0]:
                raise ValueError(
                    "Training a mask-classification model needs 'instances' (gt_classes, "
                    "gt_masks) in every input; check cfg.INPUT.DATASET_MAPPER_NAME"
                )
            targets = self.prepare_targets(batched_inputs, padded, self.device)
        outputs = self.sem_seg_head(features, targets=targets, num_superpixels=k)
        if self.training:
            if self.task == "superpixel":
                return self.superpixel_loss(outputs, batched_inputs, images)
            return self.criterion.apply_weights(self.criterion(outputs, targets))
        output_sizes = output_sizes_from_inputs(batched_inputs, images.image_sizes)
        if self.task == "superpixel":
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
        return mask_cls_postprocess(
            outputs["pred_logits"],
            outputs["pred_masks"],
            padded_size=padded,
            image_sizes=images.image_sizes,
            output_sizes=output_sizes,
            **self.postprocess_kwargs,
        )
