"""Unifying Training and Inference for Panoptic Segmentation (Li, Qi, Torr, CVPR 2020).

Four blocks (Fig. 2), trained jointly:

* **Backbone** (Sec. 3.1): detectron2's ResNet-FPN with squeeze-and-excitation on the top ResNet
  feature (``build_resnet_fpn_se_backbone``).
* **Semantic submodule** (Sec. 3.2): detectron2's ``SemSegFPNHead`` (group norm after every 3x3
  convolution, stride d = 4), giving V = softmax of its logits, (K, h, w).
* **Detection submodule** (Sec. 3.3): detectron2's RPN + ``StandardROIHeads``, with or without
  the mask head (``MODEL.MASK_ON``), giving boxes B, scores s, classes c (and masks M).
* **Panoptic submodule** (Sec. 3.4):

  - dynamic potential Psi (Eq. 1-2, :func:`dynamic_potential`), one channel per detection and
    one per stuff class (a full-image box each, score 1)::

        A:  Psi_i(k) = V_i(c_k) [+ M_i(k)]           inside B_k, else 0   (UPSNet, no score)
        B:  Psi_i(k) = s_k V_i(c_k) [* M_i(k)]       inside B_k, else 0   (Eq. 1 / Eq. 2, product)
        C:  Psi_i(k) = s_k (V_i(c_k) [+ M_i(k)])     inside B_k, else 0   (Eq. 1 / Eq. 2, sum)
        stuff class j:  Psi_i(D + j) = V_i(j)

  - dense instance affinity head (Eq. 3-4, :class:`DenseAffinityHead`): affinity features Q
    (C = 128) from a second ``SemSegFPNHead``-shaped extractor, phi0 / phi1 a 1x1 convolution
    and an activation each, and ``P = Psi + phi0(Q) (phi1(Q)^T Psi)`` through the compiled op
    :mod:`seg_methods.layers.dense_affinity` (never forming the (hw x hw) affinity).

* **Losses**: detectron2's RPN and ROI-head losses (weight 0.25 on Cityscapes), cross-entropy
  (or Lovász-Softmax) on V (1.0), and the panoptic matching loss on P (Eq. 5, 1.0;
  :mod:`seg_methods.modeling.criterion.panoptic_matching`). During training the panoptic
  submodule is fed the *predicted* detections (App. A.4): the inference branch of the ROI heads
  is run on the RPN proposals (with gradients to the scores and masks; boxes are detached), the
  ground truth is matched to them, and duplicate detections are removed before Psi is built.
* **Inference**: argmax over the channels of P, with no heuristics; every channel is a segment
  (a detection's thing instance or a stuff class), painted with the shared
  :class:`~seg_methods.modeling.postprocessing.panoptic_segments.PanopticSegments`. With zero
  detections the output is stuff only. For the Table 1 variants C1 / D1 the heuristic merge of
  Panoptic FPN (detectron2's ``combine_semantic_and_instance_outputs``) is used instead.

Table 1 switches: ``MODEL.MASK_ON`` (msk.), ``MODEL.DENSE_AFFINITY_PANOPTIC.AFFINITY`` (aff.),
``.PANOPTIC_LOSS`` (e2e.), ``.INFERENCE`` "heuristic" (heu.) / "argmax" (amx.).

Training inputs (mapper ``panoptic_detection``): "instances" (gt_boxes, gt_classes as thing
ranks, gt_masks) and "sem_seg".

Shape shorthand:
    B: batch, K: semantic classes, T: thing classes, S: stuff classes, D: detections of an
    image, N = D + S channels of Psi / P, C: affinity channels, H, W: padded input size,
    h, w: feature size (H / 4, W / 4)
"""

import contextlib
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.export.torchscript_patch import patch_builtin_len
from detectron2.modeling import (
    META_ARCH_REGISTRY,
    build_backbone,
    build_proposal_generator,
    build_roi_heads,
)
from detectron2.modeling.meta_arch.panoptic_fpn import combine_semantic_and_instance_outputs
from detectron2.modeling.meta_arch.semantic_seg import build_sem_seg_head
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.modeling.roi_heads.mask_head import mask_rcnn_inference
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn

from ...layers.dense_affinity import DenseAffinityApply
from ..criterion.lovasz import lovasz_softmax
from ..criterion.panoptic_matching import (
    PanopticMatchingCriterion,
    match_segments_to_detections,
    panoptic_matching_target,
)
from ..metadata import train_thing_ids
from ..postprocessing.panoptic_segments import PanopticSegments
from .common import require_inputs
from .mask_classification import MaskClassificationModel
from .per_pixel import per_pixel_cross_entropy

__all__ = [
    "ACTIVATIONS",
    "DenseAffinityHead",
    "DenseAffinityPanoptic",
    "INFERENCE_MODES",
    "POTENTIAL_VARIANTS",
    "box_region_masks",
    "dynamic_potential",
    "channel_pixels",
    "paste_masks_soft",
    "panoptic_from_logits",
]

logger = logging.getLogger(__name__)

POTENTIAL_VARIANTS = ("A", "B", "C")
INFERENCE_MODES = ("argmax", "heuristic")
ACTIVATIONS = ("relu", "none")
SEMANTIC_LOSSES = ("cross_entropy", "lovasz")


# --------------------------------------------------------------------------------------------
# dynamic potential (Sec. 3.4.1): pure functions
# --------------------------------------------------------------------------------------------
def _pixel_centres(size: Tuple[int, int], stride: int, like: torch.Tensor):
    """Input-pixel coordinates of the centres of an (h, w) map of ``stride``: (h,), (w,)."""
    h, w = size
    ys = (torch.arange(h, device=like.device, dtype=like.dtype) + 0.5) * stride
    xs = (torch.arange(w, device=like.device, dtype=like.dtype) + 0.5) * stride
    return ys, xs


def box_region_masks(boxes: torch.Tensor, size: Tuple[int, int], stride: int) -> torch.Tensor:
    """Indicator of "pixel i in box B_k" of Eq. 1-2 on a stride-``stride`` map.

    Args:
        boxes (Tensor): (D, 4) XYXY boxes in input pixels.
        size (tuple[int, int]): (h, w) of the map.
        stride (int): input pixels per map pixel.

    Returns:
        Tensor: (D, h, w) of the boxes' dtype, 1 where the map pixel's centre lies in the box
        (borders included).
    """
    ys, xs = _pixel_centres(size, stride, boxes)
    x0, y0, x1, y1 = (boxes[:, i].view(-1, 1) for i in range(4))
    in_x = (xs.view(1, -1) >= x0) & (xs.view(1, -1) <= x1)  # (D, w)
    in_y = (ys.view(1, -1) >= y0) & (ys.view(1, -1) <= y1)  # (D, h)
    return (in_y[:, :, None] & in_x[:, None, :]).to(boxes.dtype)


def paste_masks_soft(
    masks: torch.Tensor, boxes: torch.Tensor, size: Tuple[int, int], stride: int
) -> torch.Tensor:
    """Paste box-relative mask probabilities into a stride-``stride`` map (differentiable).

    "M: image-resolution instance masks where the raw masks have been resized to their actual
    dimensions and pasted to appropriate spatial locations" (Sec. 3.4.1). Bilinear sampling of
    each (M x M) mask at the map pixel centres (``grid_sample``, align_corners=False: the mask
    covers the box exactly), zero outside the box. Unlike detectron2's ``paste_masks_in_image``
    the result stays a float map with gradients to the masks.

    Args:
        masks (Tensor): (D, M, M) or (D, 1, M, M) probabilities.
        boxes (Tensor): (D, 4) XYXY boxes in input pixels (no gradient is taken through them).
        size (tuple[int, int]): (h, w).
        stride (int): input pixels per map pixel.

    Returns:
        Tensor: (D, h, w).
    """
    if masks.dim() == 3:
        masks = masks[:, None]
    d = masks.shape[0]
    h, w = size
    if d == 0:
        return masks.new_zeros((0, h, w))
    boxes = boxes.detach().to(masks.dtype)
    ys, xs = _pixel_centres(size, stride, masks)
    x0, y0, x1, y1 = (boxes[:, i].view(-1, 1) for i in range(4))
    gx = (xs.view(1, -1) - x0) / (x1 - x0).clamp(min=1e-6) * 2 - 1  # (D, w) in [-1, 1] inside
    gy = (ys.view(1, -1) - y0) / (y1 - y0).clamp(min=1e-6) * 2 - 1  # (D, h)
    grid = torch.stack(
        [gx[:, None, :].expand(d, h, w), gy[:, :, None].expand(d, h, w)], dim=-1
    )  # (D, h, w, 2)
    pasted = F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return pasted[:, 0] * box_region_masks(boxes, size, stride)


def dynamic_potential(
    sem_probs: torch.Tensor,
    boxes: torch.Tensor,
    classes: torch.Tensor,
    scores: torch.Tensor,
    stuff_ids: Sequence[int],
    *,
    variant: str = "B",
    masks: Optional[torch.Tensor] = None,
    stride: int = 4,
) -> torch.Tensor:
    """Dynamic potential Psi of one image (Sec. 3.4.1, Eq. 1-2), D + S channels.

    Args:
        sem_probs (Tensor): (K, h, w) semantic probabilities V.
        boxes (Tensor): (D, 4) XYXY detection boxes in input pixels.
        classes (Tensor): (D,) int64 contiguous semantic class of each detection (c_k).
        scores (Tensor): (D,) detection scores s_k.
        stuff_ids (sequence[int]): contiguous ids of the S stuff classes (one full-image box
            each, score 1), in channel order.
        variant (str): "A", "B" or "C" (module docstring; Fig. 4).
        masks (Tensor or None): (D, h, w) pasted mask probabilities M (:func:`paste_masks_soft`),
            or None without a mask head.
        stride (int): input pixels per map pixel.

    Returns:
        Tensor: (D + S, h, w) Psi: the detections in order, then the stuff classes.
    """
    if variant not in POTENTIAL_VARIANTS:
        raise ValueError(
            f"MODEL.DENSE_AFFINITY_PANOPTIC.POTENTIAL must be one of {POTENTIAL_VARIANTS}, got "
            f"{variant!r}"
        )
    size = tuple(sem_probs.shape[-2:])
    stuff_index = torch.as_tensor(list(stuff_ids), dtype=torch.int64, device=sem_probs.device)
    stuff = sem_probs.index_select(0, stuff_index)  # (S, h, w)
    if boxes.shape[0] == 0:
        return stuff
    v = sem_probs.index_select(0, classes.to(torch.int64))  # (D, h, w) V_i(c_k)
    s = scores.to(sem_probs.dtype).view(-1, 1, 1)
    if variant == "A":  # UPSNet [26]: no detection score
        base = v if masks is None else v + masks
    elif variant == "B":  # Eq. 2 with the product (Eq. 1 without masks)
        base = s * v if masks is None else s * v * masks
    else:  # "C": Eq. 2 with the sum
        base = s * v if masks is None else s * (v + masks)
    inside = box_region_masks(boxes.detach().to(sem_probs.dtype), size, stride)  # (D, h, w)
    return torch.cat([base * inside, stuff], dim=0)


def panoptic_from_logits(
    logits: torch.Tensor,
    channel_classes: Sequence[int],
    thing_ids: Sequence[int],
    num_detections: int,
) -> Tuple[torch.Tensor, List[Dict]]:
    """Argmax inference over P (Sec. 3.4.2: "an argmax operation on P along the channel
    direction readily produces the panoptic segmentation"), no heuristics.

    Every channel with pixels becomes one segment: a thing instance per detection channel, the
    stuff segment of its class per stuff channel. Pixels where every channel is exactly 0 (no
    box covers them and there is no stuff class; or no channel at all) are void.

    Args:
        logits (Tensor): (N, H, W) P at the output resolution.
        channel_classes (sequence[int]): N contiguous class ids, one per channel.
        thing_ids (sequence[int]): contiguous thing ids.
        num_detections (int): D (the first D channels are detections).

    Returns:
        tuple: panoptic_seg (H, W) int32 (0 = void) and segments_info (detectron2 format; thing
        segments carry "instance_id", the detection index).
    """
    n, h, w = logits.shape
    segments = PanopticSegments((h, w), logits.device, thing_ids=thing_ids)
    if n == 0:
        return segments.result()
    won = channel_pixels(logits, torch.arange(n, device=logits.device))
    for k in range(n):
        segment_id = segments.add(won[k], int(channel_classes[k]))
        if segment_id and k < num_detections:  # a thing channel always opens a new segment
            segments.segments_info[-1]["instance_id"] = k
    return segments.result()


def channel_pixels(logits: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """Pixels won by the given channels in the argmax over P (void pixels, where every channel
    is 0, excluded).

    Args:
        logits (Tensor): (N, H, W) P.
        channels (Tensor): (M,) int64 channel indices.

    Returns:
        Tensor: (M, H, W) bool.
    """
    h, w = logits.shape[-2:]
    if logits.shape[0] == 0:
        return torch.zeros((channels.shape[0], h, w), dtype=torch.bool, device=logits.device)
    winner = logits.argmax(dim=0)  # (H, W)
    covered = (logits != 0).any(dim=0)
    return (winner[None] == channels.view(-1, 1, 1)) & covered


# --------------------------------------------------------------------------------------------
# dense instance affinity head (Sec. 3.4.2)
# --------------------------------------------------------------------------------------------
class DenseAffinityHead(nn.Module):
    """Affinity feature extractor + phi0 / phi1 + the low-rank affinity apply (Eq. 3-4).

    Args:
        feature_extractor (nn.Module): a head with ``layers(features) -> (B, C, h, w)`` (a
            ``SemSegFPNHead`` built with C outputs: "the affinity feature extractor adopts the
            same architecture as our semantic segmentation submodule").
        channels (int): C.
        activation (str): "relu" or "none", after each 1x1 convolution.
        init_std (float): std of the normal initialisation of the phi weights (biases 0).
        normalize (bool): scale the affinity term by 1 / (h w) (not in the paper).
        impl (str): :class:`~seg_methods.layers.dense_affinity.DenseAffinityApply` impl.
    """

    def __init__(
        self,
        feature_extractor: nn.Module,
        channels: int,
        *,
        activation: str = "relu",
        init_std: float = 0.0001,
        normalize: bool = False,
        impl: str = "auto",
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                "MODEL.DENSE_AFFINITY_PANOPTIC.AFFINITY_ACTIVATION must be one of "
                f"{ACTIVATIONS}, got {activation!r}"
            )
        self.feature_extractor = feature_extractor
        self.phi0 = nn.Conv2d(channels, channels, 1)
        self.phi1 = nn.Conv2d(channels, channels, 1)
        for conv in (self.phi0, self.phi1):
            nn.init.normal_(conv.weight, std=init_std)
            nn.init.zeros_(conv.bias)
        self.activation = activation
        self.normalize = normalize
        self.apply_op = DenseAffinityApply(impl=impl)

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) if self.activation == "relu" else x

    def forward(self, features: Dict[str, torch.Tensor], psi: List[torch.Tensor]):
        """
        Args:
            features (dict[str, Tensor]): backbone features.
            psi (list[Tensor]): per image (N_i, h, w) Psi.

        Returns:
            list[Tensor]: per image (N_i, h, w) P of Eq. 4.
        """
        q = self.feature_extractor.layers(features)  # (B, C, h, w) Q
        phi0, phi1 = self._act(self.phi0(q)), self._act(self.phi1(q))
        out = []
        for i, p in enumerate(psi):
            f0, f1 = phi0[i], phi1[i]
            if self.normalize:  # scale folded into phi0: the op's scale must be a Python float
                f0 = f0 / float(f0.shape[-2] * f0.shape[-1])
            out.append(self.apply_op(p, f0, f1))  # Psi + phi0 (phi1^T Psi), Eq. 4
        return out


# --------------------------------------------------------------------------------------------
# meta-architecture
# --------------------------------------------------------------------------------------------
@META_ARCH_REGISTRY.register()
class DenseAffinityPanoptic(MaskClassificationModel):
    """Backbone + semantic + detection + panoptic submodules (module docstring).

    Uses the template's ``forward`` and overrides its four hooks: :meth:`targets`,
    :meth:`forward_head`, :meth:`losses`, :meth:`inference`. Parameter names follow detectron2's
    Panoptic FPN (``backbone``, ``sem_seg_head``, ``proposal_generator``, ``roi_heads``), so the
    backbone, RPN and ROI-head weights of its checkpoints load by name (not verified here; its
    semantic predictor has another class layout, and ``affinity_head`` and the SE block are
    new).

    Args (besides the template's ``backbone``, ``sem_seg_head``, ``criterion``,
    ``size_divisibility``, ``pixel_mean``, ``pixel_std``):
        proposal_generator (nn.Module): detectron2 RPN.
        roi_heads (nn.Module): detectron2 ``StandardROIHeads`` (mask head optional).
        affinity_head (DenseAffinityHead or None): None for the models without "aff.".
        thing_ids (tuple[int]): contiguous ids of the T thing classes (thing rank r is
            ``thing_ids[r]``).
        num_classes (int): K.
        ignore_value (int): void label of "sem_seg".
        mask_on (bool): the ROI heads predict masks.
        potential (str): "A", "B" or "C".
        panoptic_loss (bool): train with the panoptic matching loss ("e2e.").
        match_threshold (float): t of Eq. 5.
        detection_weight, semantic_weight (float): loss weights.
        semantic_loss (str): "cross_entropy" or "lovasz".
        inference_mode (str): "argmax" or "heuristic".
        heuristic (dict): overlap_threshold, stuff_area_thresh, instances_score_thresh of the
            Panoptic-FPN merge.
        panoptic_on, instance_on, semantic_on (bool): outputs returned at inference.
    """

    @configurable
    def __init__(
        self,
        *,
        proposal_generator: nn.Module,
        roi_heads: nn.Module,
        affinity_head: Optional[DenseAffinityHead],
        thing_ids: Tuple[int, ...],
        num_classes: int,
        ignore_value: int,
        mask_on: bool,
        potential: str = "B",
        panoptic_loss: bool = True,
        match_threshold: float = 0.5,
        detection_weight: float = 0.25,
        semantic_weight: float = 1.0,
        semantic_loss: str = "cross_entropy",
        inference_mode: str = "argmax",
        heuristic: Optional[Dict] = None,
        panoptic_on: bool = True,
        instance_on: bool = True,
        semantic_on: bool = True,
        **kwargs,
    ):
        super().__init__(postprocess_kwargs={}, **kwargs)
        key = "MODEL.DENSE_AFFINITY_PANOPTIC"
        if potential not in POTENTIAL_VARIANTS:
            raise ValueError(
                f"{key}.POTENTIAL must be one of {POTENTIAL_VARIANTS}, got {potential!r}"
            )
        if inference_mode not in INFERENCE_MODES:
            raise ValueError(
                f"{key}.INFERENCE must be one of {INFERENCE_MODES}, got {inference_mode!r}"
            )
        if semantic_loss not in SEMANTIC_LOSSES:
            raise ValueError(
                f"{key}.SEMANTIC_LOSS must be one of {SEMANTIC_LOSSES}, got {semantic_loss!r}"
            )
        if inference_mode == "heuristic" and not mask_on:
            raise ValueError(
                f"{key}.INFERENCE 'heuristic' merges instance masks with the semantic "
                "segmentation and needs MODEL.MASK_ON: True (Table 1: models A and B cannot use "
                "the heuristic merger)"
            )
        if affinity_head is not None and not panoptic_loss:
            raise ValueError(
                f"{key}.AFFINITY needs {key}.PANOPTIC_LOSS: the affinity head is trained only by "
                "the panoptic matching loss (Table 1 has no 'aff.' model without 'e2e.')"
            )
        self.proposal_generator = proposal_generator
        self.roi_heads = roi_heads
        self.affinity_head = affinity_head
        self.thing_ids = tuple(int(t) for t in thing_ids)
        self.num_classes = num_classes
        self.stuff_ids = tuple(c for c in range(num_classes) if c not in set(self.thing_ids))
        self.ignore_value = ignore_value
        self.mask_on = mask_on
        self.potential = potential
        self.panoptic_loss = panoptic_loss
        self.match_threshold = match_threshold
        self.detection_weight = detection_weight
        self.semantic_weight = semantic_weight
        self.semantic_loss = semantic_loss
        self.inference_mode = inference_mode
        self.heuristic = dict(heuristic or {})
        self.panoptic_on = panoptic_on
        self.instance_on = instance_on
        self.semantic_on = semantic_on
        self.stride = int(getattr(self.sem_seg_head, "common_stride", 4))
        self.register_buffer(
            "thing_class_table", torch.tensor(self.thing_ids, dtype=torch.int64), False
        )

    @classmethod
    def from_config(cls, cfg):
        node = cfg.MODEL.DENSE_AFFINITY_PANOPTIC
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        sem_seg_head = build_sem_seg_head(cfg, shapes)
        if not callable(getattr(sem_seg_head, "layers", None)):
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.NAME: {type(sem_seg_head).__name__} has no "
                "'layers(features) -> logits' method (use detectron2's SemSegFPNHead)"
            )
        thing_ids = tuple(sorted(train_thing_ids(cfg)))
        num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        if not thing_ids:
            raise ValueError(
                "DenseAffinityPanoptic needs the thing classes of the training set "
                f"(cfg.DATASETS.TRAIN = {tuple(cfg.DATASETS.TRAIN)} has no "
                "thing_dataset_id_to_contiguous_id metadata)"
            )
        if cfg.MODEL.ROI_HEADS.NUM_CLASSES != len(thing_ids):
            raise ValueError(
                f"MODEL.ROI_HEADS.NUM_CLASSES is {cfg.MODEL.ROI_HEADS.NUM_CLASSES} but the "
                f"training set {cfg.DATASETS.TRAIN[0]!r} has {len(thing_ids)} thing classes "
                "(the detection submodule classifies thing ranks)"
            )
        if max(thing_ids) >= num_classes:
            raise ValueError(
                f"thing class {max(thing_ids)} is outside MODEL.SEM_SEG_HEAD.NUM_CLASSES = "
                f"{num_classes} (V covers every class, stuff and things)"
            )
        affinity_head = None
        if node.AFFINITY:
            q_cfg = cfg.clone()
            q_cfg.defrost()
            q_cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = node.AFFINITY_DIM  # Q: C output channels
            affinity_head = DenseAffinityHead(
                build_sem_seg_head(q_cfg, shapes),
                node.AFFINITY_DIM,
                activation=node.AFFINITY_ACTIVATION,
                init_std=node.AFFINITY_INIT_STD,
                normalize=node.AFFINITY_NORMALIZE,
                impl=node.AFFINITY_IMPL,
            )
        heu = node.HEURISTIC
        return {
            "backbone": backbone,
            "sem_seg_head": sem_seg_head,
            "criterion": PanopticMatchingCriterion(
                weight=node.PANOPTIC_WEIGHT, ignore_value=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
            ),
            "size_divisibility": -1,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "proposal_generator": build_proposal_generator(cfg, shapes),
            "roi_heads": build_roi_heads(cfg, shapes),
            "affinity_head": affinity_head,
            "thing_ids": thing_ids,
            "num_classes": num_classes,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "mask_on": cfg.MODEL.MASK_ON,
            "potential": node.POTENTIAL,
            "panoptic_loss": node.PANOPTIC_LOSS,
            "match_threshold": node.MATCH_IOU_THRESHOLD,
            "detection_weight": node.DETECTION_WEIGHT,
            "semantic_weight": node.SEMANTIC_WEIGHT,
            "semantic_loss": node.SEMANTIC_LOSS,
            "inference_mode": node.INFERENCE,
            "heuristic": {
                "overlap_threshold": heu.OVERLAP_THRESHOLD,
                "stuff_area_thresh": heu.STUFF_AREA_LIMIT,
                "instances_score_thresh": heu.INSTANCES_SCORE_THRESHOLD,
            },
            "panoptic_on": cfg.TEST.PANOPTIC_ON,
            "instance_on": cfg.TEST.INSTANCE_ON,
            "semantic_on": cfg.TEST.SEMANTIC_ON,
        }

    # ------------------------------------------------------------------ pieces
    def detections_for_training(
        self, features: Dict[str, torch.Tensor], proposals: List[Instances]
    ) -> List[Instances]:
        """The ROI heads' inference branch on the RPN proposals, in training mode.

        detectron2's ``StandardROIHeads`` returns only losses in training; the predicted
        detections the panoptic submodule is trained with (App. A.4) come from its public
        components: ``box_pooler`` -> ``box_head`` -> ``box_predictor`` ->
        ``box_predictor.inference`` (score cut-off ``ROI_HEADS.SCORE_THRESH_TEST``, NMS, top-k),
        then ``mask_pooler`` -> ``mask_head.layers`` -> ``mask_rcnn_inference``. Scores and
        masks keep their gradients; boxes are detached.
        """
        rh = self.roi_heads
        box_features = rh.box_pooler(
            [features[f] for f in rh.box_in_features], [p.proposal_boxes for p in proposals]
        )
        predictions = rh.box_predictor(rh.box_head(box_features))
        instances, _ = rh.box_predictor.inference(predictions, proposals)
        for inst in instances:
            inst.pred_boxes = Boxes(inst.pred_boxes.tensor.detach())
        if self.mask_on:
            mask_features = rh.mask_pooler(
                [features[f] for f in rh.mask_in_features], [x.pred_boxes for x in instances]
            )
            mask_rcnn_inference(rh.mask_head.layers(mask_features), instances)
        return instances

    def potentials(
        self,
        sem_probs: torch.Tensor,
        detections: List[Instances],
        image_sizes: Sequence[Tuple[int, int]],
    ) -> List[torch.Tensor]:
        """Psi of every image (Eq. 1-2), zero on the padding so that padded pixels do not enter
        the affinity sums. Returns per image (D_i + S, h, w)."""
        out = []
        hs, ws = sem_probs.shape[-2:]
        for i, (det, (h, w)) in enumerate(zip(detections, image_sizes)):
            boxes = det.pred_boxes.tensor
            masks = None
            if self.mask_on and det.has("pred_masks"):
                masks = paste_masks_soft(det.pred_masks, boxes, (hs, ws), self.stride)
            psi = dynamic_potential(
                sem_probs[i],
                boxes,
                self.thing_class_table[det.pred_classes],
                det.scores,
                self.stuff_ids,
                variant=self.potential,
                masks=masks,
                stride=self.stride,
            )
            vh, vw = -(-h // self.stride), -(-w // self.stride)
            if vh < hs or vw < ws:
                valid = psi.new_zeros((1, hs, ws))
                valid[:, :vh, :vw] = 1
                psi = psi * valid
            out.append(psi)
        return out

    def panoptic_logits(
        self, features: Dict[str, torch.Tensor], psi: List[torch.Tensor]
    ) -> List[torch.Tensor]:
        """P = Psi + phi0(Q) (phi1(Q)^T Psi) (Eq. 4), or P = Psi without the affinity head."""
        if self.affinity_head is None:
            return psi
        return self.affinity_head(features, psi)

    # ------------------------------------------------------------------ hooks
    def targets(self, batched_inputs: List[Dict], images: ImageList) -> Dict:
        """Hook: {"instances": list of Instances (gt_boxes, gt_classes thing ranks, gt_masks),
        "sem_seg": (B, H, W) int64, void-padded}."""
        what = f"Training {type(self).__name__}"
        hint = "use INPUT.DATASET_MAPPER_NAME: 'panoptic_detection' (detection + sem_seg targets)"
        require_inputs(batched_inputs, "instances", what, hint)
        require_inputs(batched_inputs, "sem_seg", what, hint)
        b, _, h_pad, w_pad = images.tensor.shape
        sem = torch.full((b, h_pad, w_pad), self.ignore_value, dtype=torch.long, device=self.device)
        instances = []
        for i, x in enumerate(batched_inputs):
            s = x["sem_seg"]
            sem[i, : s.shape[-2], : s.shape[-1]] = s.to(self.device)
            inst = x["instances"].to(self.device)
            if not inst.has("gt_boxes"):
                raise ValueError(f"input {i}: 'instances' has no gt_boxes; {hint}")
            instances.append(inst)
        return {"instances": instances, "sem_seg": sem}

    def forward_head(self, images: ImageList, batched_inputs: List[Dict], targets=None) -> Dict:
        """Hook: all submodules. Returns "sem_logits" (B, K, h, w), "detections" (per image
        Instances, duplicates removed in training), "panoptic_logits" (per image (N_i, h, w), or
        None when not needed), and in training "detection_losses" and "panoptic_targets"."""
        features = self.backbone(images.tensor)
        sem_logits = self.sem_seg_head.layers(features)  # (B, K, h, w)
        out: Dict = {"sem_logits": sem_logits, "panoptic_logits": None}
        if targets is not None:
            gt = targets["instances"]
            proposals, rpn_losses = self.proposal_generator(images, features, gt)
            _, roi_losses = self.roi_heads(images, features, proposals, gt)
            out["detection_losses"] = {**rpn_losses, **roi_losses}
            if not self.panoptic_loss:
                return out
            detections = self.detections_for_training(features, proposals)
            detections, out["panoptic_targets"] = self.match(detections, targets)
        else:
            proposals, _ = self.proposal_generator(images, features, None)
            # detectron2's ROI heads split per-image results with len(), which a trace records
            # as a constant (mask_rcnn_inference's split by [len(i) ...]); detectron2's own
            # TracingAdapter traces under patch_builtin_len(), and so do we.
            tracing = patch_builtin_len() if torch.jit.is_tracing() else contextlib.nullcontext()
            with tracing:
                detections, _ = self.roi_heads(images, features, proposals, None)
        out["detections"] = detections
        if targets is None and self.inference_mode == "heuristic":
            return out  # the heuristic merge (C1, D1) uses the instance masks, not P
        sem_probs = sem_logits.softmax(dim=1)  # V
        psi = self.potentials(sem_probs, detections, images.image_sizes)
        out["panoptic_logits"] = self.panoptic_logits(features, psi)
        return out

    def match(self, detections: List[Instances], targets: Dict):
        """Eq. 5 per image: removes duplicate detections and builds the channel targets
        (:mod:`~seg_methods.modeling.criterion.panoptic_matching`)."""
        kept, channel_targets = [], []
        sem = targets["sem_seg"]
        h_pad, w_pad = sem.shape[-2:]
        for i, (det, gt) in enumerate(zip(detections, targets["instances"])):
            match = match_segments_to_detections(
                gt.gt_boxes.tensor,
                gt.gt_classes,
                det.pred_boxes.tensor,
                det.pred_classes,
                self.match_threshold,
            )
            gm = gt.gt_masks.tensor if hasattr(gt.gt_masks, "tensor") else gt.gt_masks
            masks = gm.new_zeros((gm.shape[0], h_pad, w_pad))
            masks[:, : gm.shape[1], : gm.shape[2]] = gm
            channel_targets.append(
                panoptic_matching_target(
                    masks, match.det_for_gt, match.keep, sem[i], self.stuff_ids, self.ignore_value
                )
            )
            kept.append(det[match.keep])
        return kept, channel_targets

    def losses(self, outputs: Dict, targets: Dict, batched_inputs, images) -> Dict:
        """Hook: detection losses x DETECTION_WEIGHT, semantic loss x SEMANTIC_WEIGHT and the
        panoptic matching loss x PANOPTIC_WEIGHT (Sec. 4)."""
        losses = {k: v * self.detection_weight for k, v in outputs["detection_losses"].items()}
        sem = targets["sem_seg"]
        logits = F.interpolate(
            outputs["sem_logits"], size=sem.shape[-2:], mode="bilinear", align_corners=False
        )
        if self.semantic_loss == "lovasz":
            loss_sem = lovasz_softmax(logits.softmax(dim=1), sem, ignore=self.ignore_value)
        else:
            loss_sem = per_pixel_cross_entropy(logits, sem, ignore_value=self.ignore_value)
        losses["loss_sem_seg"] = loss_sem * self.semantic_weight
        if self.panoptic_loss:
            losses.update(
                self.criterion.apply_weights(
                    self.criterion(outputs["panoptic_logits"], outputs["panoptic_targets"])
                )
            )
        return losses

    def inference(self, outputs: Dict, images: ImageList, batched_inputs: List[Dict]):
        """Hook: per image "sem_seg" (K, height, width) = V, "panoptic_seg" (argmax over P, or
        the heuristic merge) and "instances" (the detections; masks from the mask head, or the
        pixels each detection wins in P without one)."""
        results = []
        sem_logits = outputs["sem_logits"]
        pad_size = images.tensor.shape[-2:]
        for i, (x, (h, w)) in enumerate(zip(batched_inputs, images.image_sizes)):
            out_size = (x.get("height", h), x.get("width", w))
            det = outputs["detections"][i]
            probs = F.interpolate(
                sem_logits[i : i + 1], size=pad_size, mode="bilinear", align_corners=False
            )[:, :, :h, :w].softmax(dim=1)
            result = {}
            if self.semantic_on:
                result["sem_seg"] = F.interpolate(
                    probs, size=out_size, mode="bilinear", align_corners=False
                )[0]
            p, won = None, None
            if outputs["panoptic_logits"] is not None:  # None for the heuristic merge
                p = F.interpolate(
                    outputs["panoptic_logits"][i][None],
                    size=pad_size,
                    mode="bilinear",
                    align_corners=False,
                )[0, :, :h, :w]
                # the detection channels 0..D-1 as a tensor (not len(det)): a trace stays dynamic
                det_channels = torch.cumsum(torch.ones_like(det.pred_classes), 0) - 1
                won = channel_pixels(p, det_channels)
            instances = self._instances(det, won, (h, w), out_size)
            if self.panoptic_on:
                if self.inference_mode == "heuristic":
                    result["panoptic_seg"] = self._heuristic_merge(instances, probs[0], out_size)
                else:
                    channel_classes = [self.thing_ids[int(c)] for c in det.pred_classes]
                    channel_classes += list(self.stuff_ids)
                    panoptic_seg, segments_info = panoptic_from_logits(
                        p, channel_classes, self.thing_ids, len(det)
                    )
                    pan = _resize_nearest(panoptic_seg[None].float(), out_size)[0]
                    result["panoptic_seg"] = (pan.to(torch.int32), segments_info)
            if self.instance_on:
                result["instances"] = instances
            results.append(result)
        return results

    def _instances(self, det: Instances, won: Optional[torch.Tensor], size, out_size) -> Instances:
        """Detections at the output size with contiguous pred_classes; masks from the mask head
        (pasted and binarised at 0.5 by detectron2's ``detector_postprocess``) or, without one,
        ``won``: (D, h, w) the pixels each detection wins in P."""
        res = Instances(tuple(size), **det.get_fields())
        res.pred_boxes = Boxes(det.pred_boxes.tensor.clone())  # postprocess scales in place
        use_won = not (self.mask_on and det.has("pred_masks"))
        if use_won:
            if res.has("pred_masks"):
                res.remove("pred_masks")
            res.won_masks = won  # (D, h, w), filtered along with the boxes
        out_h, out_w = (int(s) for s in out_size)
        res = detector_postprocess(res, out_h, out_w)
        if use_won:
            res.pred_masks = _resize_nearest(res.won_masks.float(), (out_h, out_w)) > 0.5
            res.remove("won_masks")
        res.pred_classes = self.thing_class_table[res.pred_classes]
        return res

    def _heuristic_merge(self, instances: Instances, probs: torch.Tensor, out_size):
        """Panoptic FPN's merge (Table 1, heu.): instance masks by score, then the semantic
        argmax's stuff regions (detectron2's ``combine_semantic_and_instance_outputs``)."""
        labels = F.interpolate(
            probs[None], size=tuple(int(s) for s in out_size), mode="bilinear", align_corners=False
        )[0].argmax(dim=0)
        # detectron2's merge treats label 0 as "all things" and every other label as a stuff
        # class: things -> 0, stuff class stuff_ids[j] -> j + 1.
        table = torch.zeros(self.num_classes, dtype=torch.int64, device=labels.device)
        for j, s in enumerate(self.stuff_ids):
            table[s] = j + 1
        panoptic_seg, segments_info = combine_semantic_and_instance_outputs(
            instances, table[labels], **self.heuristic
        )
        for seg in segments_info:
            if not seg["isthing"]:
                seg["category_id"] = self.stuff_ids[int(seg["category_id"]) - 1]
        return panoptic_seg, segments_info


def _resize_nearest(x: torch.Tensor, size) -> torch.Tensor:
    """(N, H, W) float -> (N, size) by nearest neighbours (no-op at the same size)."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[0] == 0:
        return x.new_zeros((0, *size))
    return F.interpolate(x[None], size=size, mode="nearest")[0]
