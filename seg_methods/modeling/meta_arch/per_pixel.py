"""Shared base of every per-pixel semantic meta-architecture (DeepLabV3+, RegProxy, ProtoSeg, HSSN).

:class:`PerPixelSemanticModel` is detectron2's ``SemanticSegmentor`` (backbone +
``SEM_SEG_HEADS_REGISTRY`` head, same parameter names, so detectron2's semantic checkpoints
load) with one ``forward`` written here and hooks a method overrides instead:

* :meth:`targets`: the training ground truth; default: every input's "sem_seg" (H, W) map
  padded with the void label ``SEM_SEG_HEAD.IGNORE_VALUE``.
* :meth:`forward_head`: backbone + head -> outputs dict; default: ``{"sem_seg": logits}`` from
  the head's ``layers(features)``, the logits method of detectron2's ``SemSegFPNHead`` and
  ``DeepLabV3PlusHead`` (so these heads plug in unchanged).
* :meth:`segmentation_logits`: outputs -> per-pixel class logits at a requested size; default:
  bilinear upsampling of ``outputs["sem_seg"]``.
* :meth:`losses`: default: per-pixel cross-entropy with void excluded
  (:func:`per_pixel_cross_entropy`) times ``SEM_SEG_HEAD.LOSS_WEIGHT``, optionally on the hardest
  pixels only (``SEM_SEG_HEAD.LOSS_TYPE``).
* :meth:`inference`: default: the shared test-time strategy
  (:class:`~seg_methods.modeling.test_time.SemSegTestTime`: whole image or sliding windows,
  optional multi-scale + flip) run on :meth:`dense_logits`, giving "sem_seg" (C, height, width)
  at the requested output size, as detectron2's ``sem_seg_postprocess``.
* :meth:`probabilities`: logits -> probabilities for test-time averaging; default: softmax.

The template computes the loss itself (instead of calling the head in training mode) so that
void pixels are excluded and an all-void batch has a defined loss (0) rather than the NaN of a
mean over no pixels; the head's own loss module is not used.

Shape shorthand:
    B: batch, C: classes, H, W: padded input size, h, w: head output size
"""

from typing import Dict, List, Optional, Tuple

import detectron2.projects.deeplab  # noqa: F401  registers DeepLabV3PlusHead, DeepLabV3Head
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, SemanticSegmentor, build_backbone
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.meta_arch.semantic_seg import build_sem_seg_head
from detectron2.structures import ImageList
from torch import nn

from ..test_time import SemSegTestTime
from .common import require_inputs

__all__ = [
    "FEATURE_HEADS",
    "LOSS_TYPES",
    "PerPixelSemanticModel",
    "build_feature_head",
    "per_pixel_cross_entropy",
]

LOSS_TYPES = ("cross_entropy", "hard_pixel_mining")
# SEM_SEG_HEAD names that can be built as decoders without a class predictor (feature heads for
# methods whose classifier is their own: ProtoSeg's prototypes, HLE's embedding space).
FEATURE_HEADS = ("DeepLabV3PlusHead", "HRNetV2Head")


def build_feature_head(cfg, input_shape, method: str, allowed: Tuple[str, ...] = FEATURE_HEADS):
    """Build ``MODEL.SEM_SEG_HEAD`` as a decoder without its class predictor.

    detectron2's DeepLabV3+ head (and our HRNetV2 head) skip the predictor when ``NUM_CLASSES`` is
    None; the method then classifies the decoder's features itself.

    Args:
        cfg (CfgNode): the config (not modified).
        input_shape (dict[str, ShapeSpec]): the backbone's output shapes.
        method (str): the method's name, for the error message.
        allowed (tuple[str]): head names the method accepts.

    Returns:
        tuple[nn.Module, int]: the head and the channels of its ``layers(features)`` output.
    """
    head_cfg = cfg.MODEL.SEM_SEG_HEAD
    if head_cfg.NAME not in allowed:
        raise ValueError(
            f"{method} takes its pixel features from one of {allowed} built without a class "
            f"predictor; MODEL.SEM_SEG_HEAD.NAME is {head_cfg.NAME!r}"
        )
    features_cfg = cfg.clone()
    features_cfg.defrost()
    features_cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = None  # decoder only
    head = build_sem_seg_head(features_cfg, input_shape)
    if head_cfg.NAME == "HRNetV2Head" or len(head_cfg.IN_FEATURES) > 1:
        channels = head_cfg.CONVS_DIM  # HRNetV2 fusion conv / DeepLabV3+ decoder
    else:  # DeepLabV3 (ASPP only)
        channels = head_cfg.ASPP_CHANNELS
    return head, channels


def per_pixel_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_value: int,
    hard_pixel_fraction: float = 1.0,
) -> torch.Tensor:
    """Cross-entropy averaged over the valid (non-void) pixels.

    With ``hard_pixel_fraction < 1`` only the ``max(1, int(fraction * num_valid))`` valid pixels
    with the largest loss are averaged (DeepLab's hard pixel mining). Unlike detectron2's
    ``DeepLabCE``, void pixels are not counted in that number, so a mostly-void image does not
    average zeros in.

    Args:
        logits (Tensor): (B, C, H, W) class logits.
        targets (Tensor): (B, H, W) int64 labels in [0, C) or ``ignore_value`` (void).
        ignore_value (int): void label.
        hard_pixel_fraction (float): in (0, 1]; 1 averages over every valid pixel.

    Returns:
        Tensor: scalar loss; 0 (still attached to ``logits``' graph) when no pixel is valid.
    """
    if logits.shape[0] != targets.shape[0] or logits.shape[-2:] != targets.shape[-2:]:
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must agree on "
            "(B, H, W)"
        )
    valid = targets != ignore_value
    num_classes = logits.shape[1]
    bad = valid & ((targets < 0) | (targets >= num_classes))
    if bad.any():
        raise ValueError(
            f"'sem_seg' holds labels {sorted(set(targets[bad].unique().tolist()))} outside "
            f"[0, {num_classes}) that are not the void label {ignore_value}; check "
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES and MODEL.SEM_SEG_HEAD.IGNORE_VALUE against the dataset"
        )
    num_valid = int(valid.sum())
    if num_valid == 0:
        return logits.sum() * 0.0
    # (B, H, W) per-pixel losses; void pixels are 0 and are dropped by the mask.
    pixel_losses = F.cross_entropy(logits, targets, ignore_index=ignore_value, reduction="none")
    pixel_losses = pixel_losses[valid]  # (num_valid,)
    if hard_pixel_fraction < 1.0:
        k = max(1, int(hard_pixel_fraction * num_valid))
        pixel_losses = pixel_losses.topk(k).values
    return pixel_losses.mean()


def _check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.LOSS_TYPE must be one of {LOSS_TYPES}, got {loss_type!r}"
        )


@META_ARCH_REGISTRY.register()
class PerPixelSemanticModel(SemanticSegmentor):
    """Backbone + per-pixel head, trained with per-pixel cross-entropy, tested by the shared
    whole-image / sliding-window / multi-scale + flip strategy.

    Args:
        backbone (Backbone): detectron2 backbone.
        sem_seg_head (nn.Module): a ``SEM_SEG_HEADS_REGISTRY`` head; the default
            :meth:`forward_head` needs its ``layers(features) -> (B, C, h, w)`` logits method.
        pixel_mean, pixel_std (Sequence[float]): input normalisation (cfg.INPUT.FORMAT order).
        num_classes (int): C.
        ignore_value (int): void label of "sem_seg".
        size_divisibility (int): pad inputs to a multiple of this.
        loss_weight (float): weight of "loss_sem_seg".
        loss_type (str): "cross_entropy" or "hard_pixel_mining".
        hard_pixel_fraction (float): fraction of valid pixels kept by "hard_pixel_mining".
        test_time (SemSegTestTime): the test-time strategy.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        sem_seg_head: nn.Module,
        pixel_mean: Tuple[float, ...],
        pixel_std: Tuple[float, ...],
        num_classes: int,
        ignore_value: int,
        size_divisibility: int,
        loss_weight: float = 1.0,
        loss_type: str = "cross_entropy",
        hard_pixel_fraction: float = 0.2,
        test_time: Optional[SemSegTestTime] = None,
    ):
        super().__init__(
            backbone=backbone, sem_seg_head=sem_seg_head, pixel_mean=pixel_mean, pixel_std=pixel_std
        )
        _check_loss_type(loss_type)
        if not 0.0 < hard_pixel_fraction <= 1.0:
            raise ValueError(
                "MODEL.PER_PIXEL.HARD_PIXEL_FRACTION must be in (0, 1], got "
                f"{hard_pixel_fraction}"
            )
        if type(self).forward_head is PerPixelSemanticModel.forward_head and not callable(
            getattr(sem_seg_head, "layers", None)
        ):
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.NAME: {type(sem_seg_head).__name__} has no "
                "'layers(features) -> logits' method, which PerPixelSemanticModel.forward_head "
                "calls (detectron2's SemSegFPNHead and DeepLabV3PlusHead have one); use such a "
                "head or override forward_head"
            )
        self.num_classes = num_classes
        self.ignore_value = ignore_value
        self.size_divisibility = size_divisibility
        self.loss_weight = loss_weight
        self.hard_pixel_fraction = hard_pixel_fraction if loss_type == "hard_pixel_mining" else 1.0
        self.test_time = (
            test_time
            if test_time is not None
            else SemSegTestTime(size_divisibility=size_divisibility)
        )

    @classmethod
    def from_config(cls, cfg):
        _check_loss_type(cfg.MODEL.SEM_SEG_HEAD.LOSS_TYPE)  # before the head rejects it vaguely
        backbone = build_backbone(cfg)
        sem_seg_head = build_sem_seg_head(cfg, backbone.output_shape())
        size_divisibility = cfg.MODEL.PER_PIXEL.SIZE_DIVISIBILITY
        if size_divisibility < 0:
            size_divisibility = backbone.size_divisibility
        return {
            "backbone": backbone,
            "sem_seg_head": sem_seg_head,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "size_divisibility": size_divisibility,
            "loss_weight": cfg.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT,
            "loss_type": cfg.MODEL.SEM_SEG_HEAD.LOSS_TYPE,
            "hard_pixel_fraction": cfg.MODEL.PER_PIXEL.HARD_PIXEL_FRACTION,
            "test_time": SemSegTestTime(cfg, size_divisibility=size_divisibility),
        }

    def preprocess_images(self, batched_inputs: List[Dict]) -> ImageList:
        """Normalise and zero-pad the images of a batch to a common, divisible size."""
        images = [
            (x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs
        ]
        return ImageList.from_tensors(images, self.size_divisibility)

    # ------------------------------------------------------------------ hooks
    # ``forward`` is written once, here; a method customises it through these hooks only.
    def targets(self, batched_inputs: List[Dict], images: ImageList) -> torch.Tensor:
        """Hook: training ground truth; default: "sem_seg" maps, void-padded to (B, H, W) int64."""
        require_inputs(
            batched_inputs,
            "sem_seg",
            f"Training {type(self).__name__}",
            "use a dataset with semantic labels and a mapper that outputs it "
            "(cfg.INPUT.DATASET_MAPPER_NAME, e.g. 'mask_former_semantic')",
        )
        b, _, h_pad, w_pad = images.tensor.shape
        out = torch.full((b, h_pad, w_pad), self.ignore_value, dtype=torch.long, device=self.device)
        for i, (x, size) in enumerate(zip(batched_inputs, images.image_sizes)):
            sem = x["sem_seg"]
            if tuple(sem.shape[-2:]) != tuple(size):
                raise ValueError(
                    f"input {i}: 'sem_seg' is {tuple(sem.shape)} but its image is {tuple(size)}"
                )
            out[i, : size[0], : size[1]] = sem.to(self.device)
        return out

    def forward_head(
        self, images: torch.Tensor, targets: Optional[torch.Tensor] = None
    ) -> Dict[str, torch.Tensor]:
        """Hook: backbone + head on a normalised batch (B, 3, H, W) -> outputs dict.

        ``targets`` (B, H, W) is given in training and None at inference (and for every
        sliding window). Default: ``{"sem_seg": sem_seg_head.layers(features)}``, (B, C, h, w).
        """
        return {"sem_seg": self.sem_seg_head.layers(self.backbone(images))}

    def segmentation_logits(
        self, outputs: Dict[str, torch.Tensor], size: Tuple[int, int]
    ) -> torch.Tensor:
        """Hook: outputs -> (B, C, size[0], size[1]) class logits; default: bilinear upsampling
        of ``outputs["sem_seg"]`` (align_corners=False, as detectron2's heads)."""
        logits = outputs["sem_seg"]
        if tuple(logits.shape[-2:]) == tuple(size):
            return logits
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)

    def losses(
        self,
        outputs: Dict[str, torch.Tensor],
        targets: torch.Tensor,
        batched_inputs: List[Dict],
        images: ImageList,
    ) -> Dict[str, torch.Tensor]:
        """Hook: weighted losses; default: ``{"loss_sem_seg"}``, void excluded, on logits
        upsampled to the padded input size."""
        logits = self.segmentation_logits(outputs, targets.shape[-2:])
        loss = per_pixel_cross_entropy(
            logits,
            targets,
            ignore_value=self.ignore_value,
            hard_pixel_fraction=self.hard_pixel_fraction,
        )
        return {"loss_sem_seg": loss * self.loss_weight}

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Hook: (B, C, H, W) logits -> probabilities averaged by TTA; default: softmax."""
        return logits.softmax(dim=1)

    def dense_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The dense model function of the test-time strategies: (B, 3, h, w) -> (B, C, h, w)."""
        return self.segmentation_logits(self.forward_head(images), images.shape[-2:])

    def inference(self, images: ImageList, batched_inputs: List[Dict]) -> List[Dict]:
        """Hook: per-image outputs; default: ``{"sem_seg": (C, height, width)}`` from the shared
        test-time strategy, run on each image alone (unpadded, so results do not depend on the
        other images of the batch)."""
        results = []
        for i, (x, (h, w)) in enumerate(zip(batched_inputs, images.image_sizes)):
            image = images.tensor[i : i + 1, :, :h, :w]
            out_size = (x.get("height", h), x.get("width", w))  # no int(): traceable
            scores = self.test_time(
                self.dense_logits,
                image,
                out_size,
                original_size=out_size,
                to_probs=self.probabilities,
            )
            results.append({"sem_seg": scores[0]})
        return results

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: list of dataset-mapper dicts with "image" (3, H, W) and, in training,
                what :meth:`targets` reads ("sem_seg" (H, W) by default); "height"/"width" give
                the output size.

        Returns:
            training: dict of weighted losses; inference: one dict per image with "sem_seg"
            (C, height, width) (or what :meth:`inference` returns).
        """
        images = self.preprocess_images(batched_inputs)
        if not self.training:
            return self.inference(images, batched_inputs)
        targets = self.targets(batched_inputs, images)
        outputs = self.forward_head(images.tensor, targets)
        return self.losses(outputs, targets, batched_inputs, images)
