"""Shared base of every mask-classification meta-architecture (Mask2Former, ClustSeg, ...).

A subclass provides a backbone and a head returning ``{"pred_logits": (B, Q, K+1),
"pred_masks": (B, Q, h, w), "aux_outputs": [...]}``; this base does the rest once: input
normalisation and padding, ground-truth preparation, the set criterion (Hungarian matching, class
CE, point-sampled BCE + dice, deep supervision) and semantic / instance / panoptic inference.

``forward`` exists only here. A method changes behaviour through four hooks, never by
overriding ``forward``: :meth:`targets` (training ground truth), :meth:`forward_head`
(backbone + head), :meth:`losses` and :meth:`inference`.

Shape shorthand:
    B: batch, Q: queries, K: classes, N: ground-truth segments of an image,
    H, W: padded input size, h, w: mask-prediction size
"""

from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.modeling.backbone import Backbone
from detectron2.structures import ImageList
from torch import nn

from ..postprocessing import (
    mask_cls_inference_kwargs,
    mask_cls_postprocess,
    output_sizes_from_inputs,
)
from .common import require_inputs


class MaskClassificationModel(nn.Module):
    """Backbone + query head trained with the shared set criterion.

    Args:
        backbone: detectron2 backbone.
        sem_seg_head: module mapping backbone features to the prediction dict.
        criterion: the shared :class:`SetCriterion` (or any module with the same interface and a
            ``weight_dict``).
        size_divisibility: pad inputs to a multiple of this (-1: backbone's own).
        pixel_mean, pixel_std: input normalisation (per channel, in cfg.INPUT.FORMAT order).
        postprocess_kwargs: keyword arguments of :func:`mask_cls_postprocess` (task flags,
            thresholds, thing ids, top-k).
    """

    def __init__(
        self,
        *,
        backbone: Backbone,
        sem_seg_head: nn.Module,
        criterion: nn.Module,
        size_divisibility: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        postprocess_kwargs: Dict,
    ):
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.criterion = criterion
        self.size_divisibility = (
            backbone.size_divisibility if size_divisibility < 0 else size_divisibility
        )
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.postprocess_kwargs = dict(postprocess_kwargs)

    @staticmethod
    def base_kwargs(cfg, backbone, sem_seg_head, criterion, size_divisibility: int) -> Dict:
        """The constructor arguments every subclass's ``from_config`` shares."""
        return {
            "backbone": backbone,
            "sem_seg_head": sem_seg_head,
            "criterion": criterion,
            "size_divisibility": size_divisibility,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "postprocess_kwargs": mask_cls_inference_kwargs(cfg),
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def preprocess_images(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalise and pad the images of a batch to a common, divisible size."""
        images = [
            (x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs
        ]
        return ImageList.from_tensors(images, self.size_divisibility)

    @staticmethod
    def prepare_targets(batched_inputs: List[Dict], padded_size: Tuple[int, int], device):
        """Ground truth in the criterion's format, masks zero-padded to the padded input size.

        Returns:
            list of B dicts {"labels": (N,) int64, "masks": (N, H, W) same dtype as gt_masks}.
        """
        h_pad, w_pad = padded_size
        targets = []
        for x in batched_inputs:
            inst = x["instances"].to(device)
            gt_masks = inst.gt_masks
            if hasattr(gt_masks, "tensor"):  # BitMasks
                gt_masks = gt_masks.tensor
            padded = gt_masks.new_zeros((gt_masks.shape[0], h_pad, w_pad))
            padded[:, : gt_masks.shape[1], : gt_masks.shape[2]] = gt_masks
            targets.append({"labels": inst.gt_classes, "masks": padded})
        return targets

    # ------------------------------------------------------------------ hooks
    # ``forward`` is written once, here; a method customises it through these four hooks only.
    def targets(self, batched_inputs: List[Dict], images: ImageList):
        """Hook: ground truth of a training batch, in the criterion's format.

        Default: ``instances`` (gt_classes, gt_masks) of every input, masks zero-padded to the
        padded input size (:meth:`prepare_targets`).
        """
        require_inputs(
            batched_inputs,
            "instances",
            f"Training {type(self).__name__}",
            "check cfg.INPUT.DATASET_MAPPER_NAME (a mapper producing gt_classes and gt_masks)",
        )
        return self.prepare_targets(batched_inputs, images.tensor.shape[-2:], self.device)

    def forward_head(self, images: ImageList, batched_inputs: List[Dict], targets=None) -> Dict:
        """Hook: backbone + head -> prediction dict. ``targets`` is None at inference."""
        return self.sem_seg_head(self.backbone(images.tensor))

    def losses(self, outputs: Dict, targets, batched_inputs: List[Dict], images: ImageList):
        """Hook: weighted losses; default: the criterion's losses times its ``weight_dict``."""
        return self.criterion.apply_weights(self.criterion(outputs, targets))

    def inference(self, outputs: Dict, images: ImageList, batched_inputs: List[Dict]):
        """Hook: per-image outputs; default: the shared mask-classification inference."""
        return mask_cls_postprocess(
            outputs["pred_logits"],
            outputs["pred_masks"],
            padded_size=images.tensor.shape[-2:],
            image_sizes=images.image_sizes,
            output_sizes=output_sizes_from_inputs(batched_inputs, images.image_sizes),
            **self.postprocess_kwargs,
        )

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: list of dataset-mapper dicts with "image" (3, H, W) and, in training,
                the ground truth :meth:`targets` reads ("instances" by default); "height"/"width"
                give the output size.

        Returns:
            training: dict of weighted losses; inference: one dict per image with "sem_seg"
            (K, height, width), "panoptic_seg" (seg (height, width), segments_info) and/or
            "instances", according to the task flags (or what :meth:`inference` returns).
        """
        images = self.preprocess_images(batched_inputs)
        targets = self.targets(batched_inputs, images) if self.training else None
        outputs = self.forward_head(images, batched_inputs, targets)
        if self.training:
            return self.losses(outputs, targets, batched_inputs, images)
        return self.inference(outputs, images, batched_inputs)
