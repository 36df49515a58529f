"""PISR on three base panoptic models (Borse et al., CVPR 2022, Fig. 2 right).

``META_ARCHITECTURE: "PISR"`` builds ``MODEL.PISR.BASE`` extended with the PISR module
(:class:`seg_methods.layers.pisr.PISRModule`); ``MODEL.PISR.ENABLED: False`` builds the same base
model without it. The bases are subclasses (never copies) of:

* detectron2's ``PanopticFPN`` (:class:`PISRPanopticFPN`): pixel features = the semantic FPN
  head's summed scale-head features (before its 1x1 predictor); semantic logits = that
  predictor's output on them; instance features = the box-head features (ROI-pooled from the
  FPN levels) of the top-K RPN proposals by objectness, scores = their objectness; instance maps
  (Table 5 baselines) = the proposals' box indicators. The relational features go through the
  same predictor (the semantic head), ROI heads unchanged. The semantic head predicts all
  ``SEM_SEG_HEAD.NUM_CLASSES`` classes (the seg_methods ``sem_seg`` target), not detectron2's
  "stuff + one thing class", and the panoptic merge is detectron2's Panoptic-FPN rule (instances
  by score with its overlap test, then stuff by area) written with the shared
  :class:`PanopticSegments`.
* detectron2's ``PanopticDeepLab`` (:class:`PISRPanopticDeepLab`): pixel features = the
  semantic branch's head output (before its predictor); semantic logits = the predictor on them;
  instance candidates = the top-K peaks of the predicted centre heatmap (max-pool NMS with
  ``PANOPTIC_DEEPLAB.NMS_KERNEL``, above ``CENTER_THRESHOLD``), instance features = the instance
  branch's decoder features at the peaks, scores = the peak values; instance maps = soft
  grouping of pixels by their predicted centre. Centre/offset training targets are made from the
  ``instance_embedding`` target generator's instance ids and centres.
* our :class:`Mask2Former` (:class:`PISRMask2Former`, through the template hooks
  ``forward_head`` only): pixel features = the pixel decoder's mask features; semantic logits =
  ``log(sum_q p_q(k) sigmoid(m_q))``; instance features = the last decoder layer's query
  embeddings (after ``decoder_norm``), scores = max class probability; instance maps = the
  queries' mask probabilities. The final masks are the final query mask embeddings dotted with
  the relational features; the base prediction becomes one more auxiliary output.

Shape shorthand:
    B: batch, Q: queries, K: classes, T: top-K, C: channels, H, W: padded input size,
    h, w: head resolution.
"""

from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, PanopticFPN
from detectron2.modeling.meta_arch.semantic_seg import SemSegFPNHead
from detectron2.modeling.postprocessing import detector_postprocess, sem_seg_postprocess
from detectron2.projects.deeplab import DeepLabV3PlusHead
from detectron2.projects.panoptic_deeplab import PanopticDeepLab
from detectron2.projects.panoptic_deeplab.panoptic_seg import (
    PanopticDeepLabInsEmbedHead,
    PanopticDeepLabSemSegHead,
)
from detectron2.structures import ImageList
from torch import nn
from torch.nn import functional as F

from ...config.pisr import (
    PISR_BASE_MASK2FORMER,
    PISR_BASE_PANOPTIC_DEEPLAB,
    PISR_BASE_PANOPTIC_FPN,
    PISR_BASES,
)
from ...layers.pisr import PISRModule
from ..criterion import build_set_criterion
from ..metadata import train_thing_ids
from ..postprocessing.panoptic_segments import PanopticSegments
from .mask2former import Mask2Former

__all__ = [
    "PISR",
    "PISRMask2Former",
    "PISRPanopticDeepLab",
    "PISRPanopticFPN",
    "center_offset_targets",
]


def _pisr_module(cfg, pixel_channels: int, instance_channels: int) -> PISRModule:
    p = cfg.MODEL.PISR
    return PISRModule(
        pixel_channels,
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
        instance_channels,
        channels=p.CHANNELS,
        top_k=p.TOP_K,
        variant=p.VARIANT,
        zero_init_fuse=p.ZERO_INIT_FUSE,
    )


@META_ARCH_REGISTRY.register()
def PISR(cfg) -> nn.Module:  # noqa: N802  (a meta-architecture name)
    """Build ``MODEL.PISR.BASE`` with (``MODEL.PISR.ENABLED``) or without the PISR module.

    Raises:
        ValueError: the base has no instance features (PISR's instance encodings need them).
    """
    base = cfg.MODEL.PISR.BASE
    builders = {
        PISR_BASE_PANOPTIC_FPN: PISRPanopticFPN,
        PISR_BASE_PANOPTIC_DEEPLAB: PISRPanopticDeepLab,
        PISR_BASE_MASK2FORMER: PISRMask2Former,
    }
    if base not in builders:
        raise ValueError(
            f"MODEL.PISR.BASE = {base!r}: PISR needs a base panoptic model with instance "
            f"features (its top-K instance encodings, Fig. 3a); {base!r} has none or is not "
            f"supported. Bases with instance features: {list(PISR_BASES)}."
        )
    return builders[base](cfg)


# =============================================================================== Mask2Former
class PISRMask2Former(Mask2Former):
    """Mask2Former + PISR on its mask features (see the module docstring).

    Args:
        pisr (PISRModule or None): None = the plain Mask2Former.
        **kwargs: :class:`Mask2Former` arguments (with PISR on, a criterion expecting
            ``DEC_LAYERS + 1`` auxiliary outputs).
    """

    @configurable
    def __init__(self, *, pisr: Optional[PISRModule] = None, **kwargs):
        super().__init__(**kwargs)
        self.pisr = pisr
        self._query_states: List[torch.Tensor] = []
        if pisr is not None:
            # the decoder applies decoder_norm to the queries of every prediction; the last call
            # of a forward holds the final layer's query embeddings (Q, B, C)
            self.sem_seg_head.predictor.decoder_norm.register_forward_hook(self._keep_queries)

    def _keep_queries(self, module, inputs, output):
        self._query_states.append(output)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["pisr"] = None
        if cfg.MODEL.PISR.ENABLED:
            predictor = ret["sem_seg_head"].predictor
            hidden = predictor.decoder_norm.normalized_shape[0]
            mask_dim = predictor.mask_embed.layers[-1].out_features
            ret["pisr"] = _pisr_module(cfg, mask_dim, hidden)
            ret["criterion"] = build_set_criterion(
                cfg, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, cfg.MODEL.MASK2FORMER.DEC_LAYERS + 1
            )
        return ret

    def forward_head(self, images: ImageList, batched_inputs: List[Dict], targets=None) -> Dict:
        """Backbone, pixel decoder, decoder (base prediction), PISR, final masks.

        Returns:
            dict: "pred_logits" (B, Q, K+1), "pred_masks" (B, Q, h, w) from the relational
            features, "aux_outputs" = the decoder's + the base final prediction.
        """
        if self.pisr is None:
            return super().forward_head(images, batched_inputs, targets)
        head = self.sem_seg_head
        mask_features, _, multi_scale = head.pixel_decoder.forward_features(
            self.backbone(images.tensor)
        )
        self._query_states.clear()
        base = head.predictor(multi_scale, mask_features)
        queries = self._query_states[-1].transpose(0, 1)  # (B, Q, C)
        self._query_states.clear()
        probs = base["pred_logits"].softmax(dim=-1)[..., :-1]  # (B, Q, K)
        masks = base["pred_masks"].sigmoid()  # (B, Q, h, w)
        semantic = torch.einsum("bqk,bqhw->bkhw", probs, masks)
        out = self.pisr(
            mask_features,
            torch.log(semantic.clamp_min(1e-6)),
            queries,
            probs.max(dim=-1).values,
            masks,
        )
        pred_masks = torch.einsum(
            "bqc,bchw->bqhw", head.predictor.mask_embed(queries), out["features"]
        )
        aux = list(base["aux_outputs"])
        aux.append({"pred_logits": base["pred_logits"], "pred_masks": base["pred_masks"]})
        return {"pred_logits": base["pred_logits"], "pred_masks": pred_masks, "aux_outputs": aux}


# =============================================================================== Panoptic-FPN
class _SemSegFPNHead(SemSegFPNHead):
    """detectron2's semantic FPN head whose loss is 0 (not NaN) on a batch without labels."""

    def losses(self, predictions, targets):
        logits = F.interpolate(
            predictions.float(),
            scale_factor=self.common_stride,
            mode="bilinear",
            align_corners=False,
        )
        pixel = F.cross_entropy(logits, targets, reduction="none", ignore_index=self.ignore_value)
        valid = (targets != self.ignore_value).sum().clamp_min(1)
        return {"loss_sem_seg": pixel.sum() / valid * self.loss_weight}


class _PISRSemSegFPNHead(_SemSegFPNHead):
    """detectron2's semantic FPN head whose predictor reads PISR's relational features.

    ``self.instance_context`` (set by :class:`PISRPanopticFPN` around each call, not a
    submodule) holds "features" (B, N, C_i), "scores" (B, N) and "maps" (B, N, h, w).
    """

    @configurable
    def __init__(self, input_shape, *, pisr: PISRModule, **kwargs):
        super().__init__(input_shape, **kwargs)
        self.pisr = pisr
        self.instance_context: Optional[Dict[str, torch.Tensor]] = None

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["pisr"] = _pisr_module(
            cfg, cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM, cfg.MODEL.ROI_BOX_HEAD.FC_DIM
        )
        return ret

    def layers(self, features):
        x = None
        for i, f in enumerate(self.in_features):
            y = self.scale_heads[i](features[f])
            x = y if x is None else x + y
        ctx = self.instance_context
        if ctx is None:
            raise RuntimeError("PISR's semantic FPN head needs the instance context of its model")
        out = self.pisr(x, self.predictor(x), ctx["features"], ctx["scores"], ctx["maps"])
        return self.predictor(out["features"])


def _box_maps(boxes: torch.Tensor, size, stride: float) -> torch.Tensor:
    """(N, 4) XYXY input-pixel boxes -> (N, h, w) float indicators on a grid of ``stride``."""
    h, w = size
    ys = (torch.arange(h, device=boxes.device, dtype=boxes.dtype) + 0.5) * stride
    xs = (torch.arange(w, device=boxes.device, dtype=boxes.dtype) + 0.5) * stride
    inside_y = (ys[None, :] >= boxes[:, 1:2]) & (ys[None, :] <= boxes[:, 3:4])  # (N, h)
    inside_x = (xs[None, :] >= boxes[:, 0:1]) & (xs[None, :] <= boxes[:, 2:3])  # (N, w)
    return (inside_y[:, :, None] & inside_x[:, None, :]).to(boxes.dtype)


class PISRPanopticFPN(PanopticFPN):
    """detectron2's Panoptic-FPN + PISR in its semantic head (see the module docstring).

    Args:
        pisr_enabled (bool): False: the plain Panoptic-FPN (same semantic-class convention).
        top_k (int): proposals whose box features become instance candidates.
        thing_ids (list[int]): contiguous ids of the thing classes, by ROI-head class index.
        stuff_ids (list[int]): contiguous ids of the stuff classes.
        **kwargs: :class:`PanopticFPN` arguments.
    """

    @configurable
    def __init__(
        self,
        *,
        pisr_enabled: bool,
        top_k: int,
        thing_ids: List[int],
        stuff_ids: List[int],
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.pisr_enabled, self.top_k = pisr_enabled, top_k
        self.thing_ids, self.stuff_ids = list(thing_ids), list(stuff_ids)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        head = _PISRSemSegFPNHead if cfg.MODEL.PISR.ENABLED else _SemSegFPNHead
        if cfg.MODEL.SEM_SEG_HEAD.NAME != "SemSegFPNHead":
            raise ValueError(
                f"PISR on Panoptic-FPN extends detectron2's SemSegFPNHead; "
                f"MODEL.SEM_SEG_HEAD.NAME is {cfg.MODEL.SEM_SEG_HEAD.NAME!r}"
            )
        ret["sem_seg_head"] = head(cfg, ret["backbone"].output_shape())
        box_channels = ret["roi_heads"].box_head.output_shape.channels
        if cfg.MODEL.PISR.ENABLED and box_channels != cfg.MODEL.ROI_BOX_HEAD.FC_DIM:
            raise ValueError(
                "PISR on Panoptic-FPN reads box-head features of MODEL.ROI_BOX_HEAD.FC_DIM "
                f"({cfg.MODEL.ROI_BOX_HEAD.FC_DIM}) channels; the box head gives {box_channels} "
                "(use NUM_FC >= 1)"
            )
        thing_ids = sorted(train_thing_ids(cfg))
        num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        stuff_ids = [c for c in range(num_classes) if c not in set(thing_ids)]
        if len(thing_ids) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
            raise ValueError(
                f"MODEL.ROI_HEADS.NUM_CLASSES = {cfg.MODEL.ROI_HEADS.NUM_CLASSES} but the "
                f"dataset {cfg.DATASETS.TRAIN[0]!r} has {len(thing_ids)} thing classes"
            )
        ret.update(
            pisr_enabled=cfg.MODEL.PISR.ENABLED,
            top_k=cfg.MODEL.PISR.TOP_K,
            thing_ids=thing_ids,
            stuff_ids=stuff_ids,
        )
        return ret

    def _instance_context(self, features, proposals, size) -> Dict[str, torch.Tensor]:
        """Box-head features, objectness and box maps of the top-K proposals of every image,
        padded to K (score -inf) so that shapes do not depend on the image."""
        k = self.top_k
        kept = [p[:k] for p in proposals]  # RPN proposals are sorted by objectness
        heads = self.roi_heads
        pooled = heads.box_pooler(
            [features[f] for f in heads.box_in_features], [p.proposal_boxes for p in kept]
        )
        box_feats = heads.box_head(pooled)  # (sum_i n_i, C_i)
        stride = self.sem_seg_head.common_stride
        feats, scores, maps = [], [], []
        start = 0
        for p in kept:
            n = len(p)
            f = box_feats[start : start + n]
            start += n
            boxes = p.proposal_boxes.tensor
            feats.append(torch.cat([f, f.new_zeros((k, f.shape[1]))])[:k])
            scores.append(torch.cat([p.objectness_logits, f.new_full((k,), float("-inf"))])[:k])
            m = _box_maps(boxes, size, stride)
            maps.append(torch.cat([m, m.new_zeros((k,) + tuple(size))])[:k])
        return {
            "features": torch.stack(feats),
            "scores": torch.stack(scores),
            "maps": torch.stack(maps),
        }

    def _proposals_and_semantics(self, images, features, gt_instances, gt_sem_seg):
        proposals, proposal_losses = self.proposal_generator(images, features, gt_instances)
        if self.pisr_enabled:
            size = (
                images.tensor.shape[-2] // self.sem_seg_head.common_stride,
                images.tensor.shape[-1] // self.sem_seg_head.common_stride,
            )
            self.sem_seg_head.instance_context = self._instance_context(features, proposals, size)
        try:
            sem_seg_results, sem_seg_losses = self.sem_seg_head(features, gt_sem_seg)
        finally:
            if self.pisr_enabled:
                self.sem_seg_head.instance_context = None
        return proposals, proposal_losses, sem_seg_results, sem_seg_losses

    def forward(self, batched_inputs):
        """detectron2's Panoptic-FPN forward with the proposals computed before the semantic
        head (PISR reads them). Inputs and outputs as :class:`PanopticFPN`."""
        if not self.training:
            return self.inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        for key in ("sem_seg", "instances"):
            if key not in batched_inputs[0]:
                raise KeyError(
                    f"Training PISR on Panoptic-FPN needs {key!r} in every input; use "
                    "INPUT.DATASET_MAPPER_NAME 'panoptic_detection' (thing boxes + masks + sem_seg)"
                )
        gt_sem_seg = ImageList.from_tensors(
            [x["sem_seg"].to(self.device) for x in batched_inputs],
            self.backbone.size_divisibility,
            self.sem_seg_head.ignore_value,
            self.backbone.padding_constraints,
        ).tensor
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        proposals, losses_p, _, losses = self._proposals_and_semantics(
            images, features, gt_instances, gt_sem_seg
        )
        _, detector_losses = self.roi_heads(images, features, proposals, gt_instances)
        losses.update(losses_p)
        losses.update(detector_losses)
        return losses

    def inference(self, batched_inputs: List[Dict[str, torch.Tensor]], do_postprocess=True):
        """Semantic map (all classes), instances (contiguous class ids) and the panoptic merge.

        Returns:
            list[dict]: "sem_seg" (K, height, width), "instances", "panoptic_seg".
        """
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        proposals, _, sem_seg_results, _ = self._proposals_and_semantics(
            images, features, None, None
        )
        detector_results, _ = self.roi_heads(images, features, proposals, None)
        if not do_postprocess:
            return detector_results, sem_seg_results
        thing_ids = torch.as_tensor(self.thing_ids, dtype=torch.int64, device=self.device)
        results = []
        for sem, det, x, image_size in zip(
            sem_seg_results, detector_results, batched_inputs, images.image_sizes
        ):
            height, width = x.get("height", image_size[0]), x.get("width", image_size[1])
            sem = sem_seg_postprocess(sem, image_size, height, width)
            det = detector_postprocess(det, height, width)
            det.pred_classes = thing_ids[det.pred_classes]  # ROI-head index -> contiguous id
            results.append(
                {"sem_seg": sem, "instances": det, "panoptic_seg": self._merge(sem, det)}
            )
        return results

    def _merge(self, sem: torch.Tensor, det):
        """Panoptic-FPN's combination rule on the shared accumulator.

        Instances by decreasing score (>= COMBINE.INSTANCES_CONFIDENCE_THRESH, mask > 0.5) keep
        the pixels not yet painted unless more than COMBINE.OVERLAP_THRESH of them is taken;
        then each stuff class of the semantic argmax keeps its free pixels when they are at
        least COMBINE.STUFF_AREA_LIMIT. An image without detections gives stuff only.
        """
        segments = PanopticSegments(
            sem.shape[-2:],
            sem.device,
            thing_ids=self.thing_ids,
            overlap_threshold=1.0 - self.combine_overlap_thresh,
        )
        painted = torch.zeros(sem.shape[-2:], dtype=torch.bool, device=sem.device)
        order = torch.argsort(det.scores, descending=True)
        for i in order.tolist():
            if float(det.scores[i]) < self.combine_instances_score_thresh:
                break
            mask = det.pred_masks[i].to(torch.bool)  # detector_postprocess thresholds at 0.5
            area = int(mask.sum())
            free = mask & ~painted
            if segments.add(
                free, int(det.pred_classes[i]), visible_area=int(free.sum()), original_area=area
            ):
                painted |= free
        labels = sem.argmax(dim=0)
        for c in self.stuff_ids:
            free = (labels == c) & ~painted
            if int(free.sum()) >= self.combine_stuff_area_thresh:
                segments.add(free, c)
                painted |= free
        return segments.result()


# =========================================================================== Panoptic-DeepLab
def center_offset_targets(
    instance_ids: torch.Tensor,
    centers: torch.Tensor,
    *,
    sigma: float,
    small_area: int,
    small_weight: float,
) -> Dict[str, torch.Tensor]:
    """Panoptic-DeepLab's training targets from an instance id map and instance centres.

    Args:
        instance_ids (Tensor): (H, W) int64, k in 1..N on instance k, 0 stuff, -1 void.
        centers (Tensor): (N, 2) float (y, x) centre of each instance, row k-1 for id k.
        sigma (float): Gaussian sigma of the centre heatmap (pixels).
        small_area (int), small_weight (float): semantic weight of instances smaller than
            ``small_area`` pixels (Panoptic-DeepLab's small-instance weighting).

    Returns:
        dict, in the layout of detectron2's ``PanopticDeepLabTargetGenerator`` (the weights carry
        a leading channel so that they broadcast per image against the (B, 1, H, W) centre and
        (B, 2, H, W) offset predictions): "center" (H, W) = max_k exp(-|p - c_k|^2 /
        (2 sigma^2)); "center_weights" (1, H, W) (0 on void); "offset" (2, H, W) = c_k - p on
        instance k's pixels, 0 elsewhere (y, x); "offset_weights" (1, H, W) (1 on instance
        pixels); "sem_seg_weights" (H, W).
    """
    h, w = instance_ids.shape
    ys = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
    xs = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w)
    center = torch.zeros((h, w), dtype=torch.float32)
    offset = torch.zeros((2, h, w), dtype=torch.float32)
    sem_weights = torch.ones((h, w), dtype=torch.float32)
    for k in range(centers.shape[0]):
        cy, cx = float(centers[k, 0]), float(centers[k, 1])
        g = torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * sigma**2))
        center = torch.maximum(center, g)
        mask = instance_ids == k + 1
        offset[0][mask] = cy - ys[mask]
        offset[1][mask] = cx - xs[mask]
        if int(mask.sum()) < small_area:
            sem_weights[mask] = small_weight
    return {
        "center": center,
        "center_weights": (instance_ids >= 0).to(torch.float32)[None],
        "offset": offset,
        "offset_weights": (instance_ids > 0).to(torch.float32)[None],
        "sem_seg_weights": sem_weights,
    }


class _PISRDeepLabInsEmbedHead(PanopticDeepLabInsEmbedHead):
    """detectron2's instance branch that also keeps its decoder features, computed once per
    forward (the semantic branch reads them first)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._cache = None  # (features dict, (center, offset, decoder features))

    def decode(self, features):
        """(center (B, 1, h, w), offset (B, 2, h, w), decoder features (B, C, h, w))."""
        if self._cache is not None and self._cache[0] is features:
            return self._cache[1]
        y = DeepLabV3PlusHead.layers(self, features)
        center = self.center_predictor(self.center_head(y))
        out = (center, self.offset_predictor(self.offset_head(y)), y)
        self._cache = (features, out)
        return out

    def layers(self, features):
        center, offset, _ = self.decode(features)
        return center, offset


class _PISRDeepLabSemSegHead(PanopticDeepLabSemSegHead):
    """detectron2's semantic branch whose predictor reads PISR's relational features; the
    instance context comes from ``self.instance_source(features)`` (set by the model)."""

    @configurable
    def __init__(self, input_shape, *, pisr: PISRModule, **kwargs):
        super().__init__(input_shape, **kwargs)
        self.pisr = pisr
        self.instance_source = None

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["pisr"] = _pisr_module(
            cfg, cfg.MODEL.SEM_SEG_HEAD.HEAD_CHANNELS, cfg.MODEL.INS_EMBED_HEAD.CONVS_DIM
        )
        return ret

    def layers(self, features):
        y = self.head(DeepLabV3PlusHead.layers(self, features))
        ctx = self.instance_source(features)
        out = self.pisr(y, self.predictor(y), ctx["features"], ctx["scores"], ctx["maps"])
        return self.predictor(out["features"])


class PISRPanopticDeepLab(PanopticDeepLab):
    """detectron2's Panoptic-DeepLab + PISR in its semantic branch (module docstring).

    Training inputs carry the ``instance_embedding`` generator's "instance_ids" and
    "instance_centers"; the centre / offset targets are made from them here
    (:func:`center_offset_targets`, ``INPUT.GAUSSIAN_SIGMA``, ``INPUT.SMALL_INSTANCE_*``).
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        p = cfg.MODEL.PISR
        self.pisr_enabled, self.top_k = p.ENABLED, p.TOP_K
        self.map_sigma = p.INSTANCE_MAP_SIGMA
        self.gaussian_sigma = cfg.INPUT.GAUSSIAN_SIGMA
        self.small_area = cfg.INPUT.SMALL_INSTANCE_AREA
        self.small_weight = cfg.INPUT.SMALL_INSTANCE_WEIGHT
        if self.pisr_enabled:
            names = (cfg.MODEL.SEM_SEG_HEAD.NAME, cfg.MODEL.INS_EMBED_HEAD.NAME)
            if names != ("PanopticDeepLabSemSegHead", "PanopticDeepLabInsEmbedHead"):
                raise ValueError(
                    "PISR on Panoptic-DeepLab extends detectron2's PanopticDeepLabSemSegHead and "
                    "PanopticDeepLabInsEmbedHead; MODEL.SEM_SEG_HEAD.NAME / "
                    f"MODEL.INS_EMBED_HEAD.NAME are {names}"
                )
            shape = self.backbone.output_shape()
            self.sem_seg_head = _PISRDeepLabSemSegHead(cfg, shape)
            self.ins_embed_head = _PISRDeepLabInsEmbedHead(cfg, shape)
            self.sem_seg_head.instance_source = self._instance_context

    def _instance_context(self, features) -> Dict[str, torch.Tensor]:
        """Top-K centre peaks: decoder features, peak scores, soft instance maps."""
        center, offset, y = self.ins_embed_head.decode(features)
        heat = center  # detectron2's centre head regresses the Gaussian heatmap (no sigmoid)
        pooled = F.max_pool2d(heat, self.nms_kernel, stride=1, padding=self.nms_kernel // 2)
        is_peak = (heat == pooled) & (heat > self.threshold)
        scores = torch.where(is_peak, heat, torch.full_like(heat, float("-inf"))).flatten(1)
        k = min(self.top_k, scores.shape[1])
        top, idx = scores.topk(k, dim=1)  # (B, T)
        b, c, h, w = y.shape
        feats = torch.gather(y.flatten(2), 2, idx[:, None, :].expand(b, c, k)).transpose(1, 2)
        stride = self.ins_embed_head.common_stride
        cy = torch.div(idx, w, rounding_mode="floor").to(y.dtype)
        cx = (idx % w).to(y.dtype)
        gy = torch.arange(h, device=y.device, dtype=y.dtype)[:, None] + offset[:, 0] / stride
        gx = torch.arange(w, device=y.device, dtype=y.dtype)[None, :] + offset[:, 1] / stride
        d2 = (gy[:, None] - cy[:, :, None, None]) ** 2 + (gx[:, None] - cx[:, :, None, None]) ** 2
        maps = torch.exp(-d2 * stride**2 / (2 * self.map_sigma**2))  # (B, T, h, w)
        return {"features": feats, "scores": top, "maps": maps}

    def _with_targets(self, batched_inputs: List[Dict]) -> List[Dict]:
        if "center" in batched_inputs[0] or "instance_ids" not in batched_inputs[0]:
            return batched_inputs
        out = []
        for x in batched_inputs:
            t = center_offset_targets(
                x["instance_ids"],
                x["instance_centers"],
                sigma=self.gaussian_sigma,
                small_area=self.small_area,
                small_weight=self.small_weight,
            )
            out.append({**x, **t})
        return out

    def forward(self, batched_inputs):
        """detectron2's forward, on inputs completed with centre / offset targets."""
        if self.training:
            if "instance_ids" not in batched_inputs[0] and "center" not in batched_inputs[0]:
                raise KeyError(
                    "Training Panoptic-DeepLab needs 'instance_ids' and 'instance_centers' in "
                    "every input: add 'instance_embedding' to INPUT.EXTRA_TARGETS"
                )
            batched_inputs = self._with_targets(batched_inputs)
        else:  # detectron2's inference reads "height" / "width" without a default
            batched_inputs = [
                {"height": x["image"].shape[-2], "width": x["image"].shape[-1], **x}
                for x in batched_inputs
            ]
        try:
            return super().forward(batched_inputs)
        finally:
            if self.pisr_enabled:
                self.ins_embed_head._cache = None
