"""Hierarchical Lovász Embeddings (Kerola et al., CVPR 2021), in the per-pixel template.

A DeepLabV3+ network (backbone + detectron2's ``DeepLabV3PlusHead`` as a feature decoder, built
without its class predictor, as ProtoSeg does) predicts per pixel (Fig. 2):

* a unit-norm embedding e_i (d channels, 1x1 conv + L2 normalisation);
* an instance variance sigma_i > 0 (1x1 conv + softplus);
* a seed score s_i in (0, 1) (1x1 conv + sigmoid).

The class scores psi (Eq. 9) come from the embedding and the learned class means and variances
(:class:`~seg_methods.modeling.criterion.hle.HLEEmbeddingSpace`), so the template's semantic
output, sliding-window inference and export use them unchanged; panoptic segmentation comes from
the decoding of Sec. 3.5 (:mod:`seg_methods.modeling.postprocessing.hle_decoding`).

Template hooks used: :meth:`forward_head` (the three maps at 1/4 resolution),
:meth:`segmentation_logits` (log p_k of Eq. 9, i.e. logits whose softmax is psi), :meth:`losses`
(Eq. 11-16 at the padded input resolution, :class:`~seg_methods.modeling.criterion.hle.
HLECriterion`) and :meth:`inference` (sem_seg, panoptic_seg, instances).

Training inputs: "sem_seg" and "instance_ids" (the ``instance_embedding`` target generator:
``INPUT.EXTRA_TARGETS: ["instance_embedding"]``).

Shape shorthand:
    B: batch, D: embedding dimension, C: classes, H, W: padded input size,
    h, w: feature size (H / 4)
"""

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import BitMasks, ImageList, Instances
from torch import nn

from ..criterion.hle import (
    HLECriterion,
    HLEEmbeddingSpace,
    VOID_ID,
    pixel_positions,
    split_embedding,
)
from ..metadata import train_thing_ids
from ..postprocessing.hle_decoding import hle_panoptic_decode
from .common import require_inputs
from .per_pixel import PerPixelSemanticModel, build_feature_head

__all__ = ["HierarchicalLovaszEmbedding", "SEMANTIC_BRANCHES"]

SEMANTIC_BRANCHES = ("embedding", "separate")
FEATURE_HEADS = ("DeepLabV3PlusHead",)


@META_ARCH_REGISTRY.register()
class HierarchicalLovaszEmbedding(PerPixelSemanticModel):
    """DeepLabV3+ predicting (e_i, sigma_i, s_i) per pixel, trained with the HLE losses.

    Args (besides :class:`PerPixelSemanticModel`'s; ``sem_seg_head`` must return features):
        feature_channels (int): channels of ``sem_seg_head.layers(features)``.
        embed_dim (int): d.
        instance_sigma_init (float): initial sigma_i (bias of the variance conv).
        split_embedding (bool): Table 6 "Split emb. space".
        semantic_branch (str): "embedding" (Eq. 9) or "separate" (Table 6 "Sep. seg. branch").
        space (HLEEmbeddingSpace): class means, class variances, spatial bandwidth.
        criterion (HLECriterion): the losses.
        coord_scale (float): positions rho are pixels / coord_scale.
        thing_ids (tuple[int]): contiguous thing classes.
        decode (dict): keyword arguments of :func:`hle_panoptic_decode` (thresholds, areas,
            max instances, downsample).
        panoptic_on, instance_on (bool): which outputs :meth:`inference` returns (sem_seg always).
        output_embedding (bool): :meth:`inference` also returns "embedding" (D, height, width),
            the unit embedding (``demo/demo.py --paint-embedding`` draws three of its dimensions
            as RGB, Fig. 3).
    """

    @configurable
    def __init__(
        self,
        *,
        feature_channels: int,
        embed_dim: int,
        instance_sigma_init: float,
        split_embedding: bool,
        semantic_branch: str,
        space: HLEEmbeddingSpace,
        criterion: HLECriterion,
        coord_scale: float,
        thing_ids: Tuple[int, ...],
        decode: Dict,
        panoptic_on: bool = True,
        instance_on: bool = True,
        output_embedding: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if semantic_branch not in SEMANTIC_BRANCHES:
            raise ValueError(
                f"MODEL.HLE.SEMANTIC_BRANCH must be one of {SEMANTIC_BRANCHES}, got "
                f"{semantic_branch!r}"
            )
        if split_embedding and embed_dim % 2:
            raise ValueError(f"MODEL.HLE.SPLIT_EMBEDDING needs an even EMBED_DIM, got {embed_dim}")
        if instance_sigma_init <= 0 or coord_scale <= 0:
            raise ValueError(
                "MODEL.HLE.INSTANCE_SIGMA_INIT and MODEL.HLE.COORD_SCALE must be > 0, got "
                f"{instance_sigma_init} and {coord_scale}"
            )
        self.embed_dim = embed_dim
        self.split_embedding = split_embedding
        self.semantic_branch = semantic_branch
        self.coord_scale = float(coord_scale)
        self.thing_ids = tuple(sorted(int(t) for t in thing_ids))
        self.decode = dict(decode)
        self.panoptic_on = panoptic_on
        self.instance_on = instance_on
        self.output_embedding = output_embedding
        self.space = space
        self.criterion = criterion
        self.embedding_head = nn.Conv2d(feature_channels, embed_dim, 1)
        self.variance_head = nn.Conv2d(feature_channels, 1, 1)
        self.seed_head = nn.Conv2d(feature_channels, 1, 1)
        nn.init.normal_(self.embedding_head.weight, std=0.01)
        nn.init.zeros_(self.embedding_head.bias)
        nn.init.zeros_(self.variance_head.weight)
        # softplus(bias) = instance_sigma_init
        nn.init.constant_(self.variance_head.bias, math.log(math.expm1(instance_sigma_init)))
        nn.init.normal_(self.seed_head.weight, std=0.01)
        nn.init.zeros_(self.seed_head.bias)
        self.class_head = (
            nn.Conv2d(feature_channels, self.num_classes, 1)
            if semantic_branch == "separate"
            else None
        )

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        head_cfg = cfg.MODEL.SEM_SEG_HEAD
        ret["sem_seg_head"], feature_channels = build_feature_head(
            cfg, ret["backbone"].output_shape(), "HierarchicalLovaszEmbedding", FEATURE_HEADS
        )
        h = cfg.MODEL.HLE
        sem_dim = h.EMBED_DIM // 2 if h.SPLIT_EMBEDDING else h.EMBED_DIM
        space = HLEEmbeddingSpace(
            head_cfg.NUM_CLASSES,
            sem_dim,
            semantic_sigma_init=h.SEMANTIC_SIGMA_INIT,
            spatial_sigma_init=h.SPATIAL_SIGMA_INIT,
            thomson=h.THOMSON_INIT,
            thomson_iters=h.THOMSON_ITERS,
            thomson_lr=h.THOMSON_LR,
            thomson_seed=h.THOMSON_SEED,
        )
        dec = h.DECODE
        ret.update(
            feature_channels=feature_channels,
            embed_dim=h.EMBED_DIM,
            instance_sigma_init=h.INSTANCE_SIGMA_INIT,
            split_embedding=h.SPLIT_EMBEDDING,
            semantic_branch=h.SEMANTIC_BRANCH,
            space=space,
            criterion=HLECriterion(cfg),
            coord_scale=h.COORD_SCALE,
            thing_ids=tuple(sorted(train_thing_ids(cfg))),
            decode={
                "seed_threshold": dec.SEED_THRESHOLD,
                "nms_kernel": dec.NMS_KERNEL,
                "mask_threshold": dec.MASK_THRESHOLD,
                "merge_threshold": dec.MERGE_THRESHOLD,
                "stuff_threshold": dec.STUFF_THRESHOLD,
                "thing_min_area": dec.THING_MIN_AREA,
                "stuff_min_area": dec.STUFF_MIN_AREA,
                "max_instances": dec.MAX_INSTANCES,
                "downsample": dec.DOWNSAMPLE,
                "impl": dec.IMPL,
            },
            panoptic_on=cfg.TEST.PANOPTIC_ON,
            instance_on=cfg.TEST.INSTANCE_ON,
            output_embedding=h.OUTPUT_EMBEDDING,
        )
        return ret

    # ------------------------------------------------------------------ network
    def forward_head(
        self, images: torch.Tensor, targets: Optional[torch.Tensor] = None
    ) -> Dict[str, torch.Tensor]:
        """Hook: (B, 3, H, W) -> "embedding" (B, D, h, w) unit, "sigma" (B, 1, h, w) > 0,
        "seed_logits" (B, 1, h, w) and, with a separate branch, "class_logits" (B, C, h, w)."""
        feats = self.sem_seg_head.layers(self.backbone(images))  # (B, F, h, w)
        out = {
            "embedding": F.normalize(self.embedding_head(feats), dim=1),
            "sigma": F.softplus(self.variance_head(feats)) + 1e-4,
            "seed_logits": self.seed_head(feats),
        }
        if self.class_head is not None:
            out["class_logits"] = self.class_head(feats)
        return out

    def upsample(self, outputs: Dict[str, torch.Tensor], size) -> Dict[str, torch.Tensor]:
        """The head's maps at ``size`` (bilinear; embeddings re-normalised): "sem_embedding",
        "ins_embedding" (B, D', H, W), "ins_sigma", "seed" (B, H, W) and "class_logits"."""

        def up(x):
            if tuple(x.shape[-2:]) == tuple(size):
                return x
            return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)

        emb = F.normalize(up(outputs["embedding"]), dim=1)
        sem_emb, ins_emb = split_embedding(emb, self.split_embedding)
        out = {
            "sem_embedding": sem_emb,
            "ins_embedding": ins_emb,
            "ins_sigma": up(outputs["sigma"])[:, 0],
            "seed": up(outputs["seed_logits"])[:, 0].sigmoid(),
        }
        if "class_logits" in outputs:
            out["class_logits"] = up(outputs["class_logits"])
        return out

    def segmentation_logits(self, outputs: Dict[str, torch.Tensor], size) -> torch.Tensor:
        """Hook: (B, C, size) logits whose softmax is psi (Eq. 9), from the embedding upsampled
        to ``size``; the separate branch's logits with SEMANTIC_BRANCH "separate"."""
        up = self.upsample(outputs, size)
        if "class_logits" in up:
            return up["class_logits"]
        return self.space.semantic_logits(up["sem_embedding"])

    # ------------------------------------------------------------------ training
    def instance_targets(self, batched_inputs: List[Dict], images: ImageList) -> torch.Tensor:
        """(B, H, W) int64 instance ids (k >= 1 instance, 0 stuff, -1 void and padding)."""
        require_inputs(
            batched_inputs,
            "instance_ids",
            f"Training {type(self).__name__}",
            "add the 'instance_embedding' target generator (INPUT.EXTRA_TARGETS: "
            "['instance_embedding']) to a panoptic dataset mapper",
        )
        b, _, h_pad, w_pad = images.tensor.shape
        out = torch.full((b, h_pad, w_pad), VOID_ID, dtype=torch.long, device=self.device)
        for i, (x, size) in enumerate(zip(batched_inputs, images.image_sizes)):
            ids = x["instance_ids"]
            if tuple(ids.shape[-2:]) != tuple(size):
                raise ValueError(
                    f"input {i}: 'instance_ids' is {tuple(ids.shape)} but its image is "
                    f"{tuple(size)}"
                )
            out[i, : size[0], : size[1]] = ids.to(self.device)
        return out

    def losses(self, outputs, targets, batched_inputs, images) -> Dict[str, torch.Tensor]:
        """Hook: the HLE losses (Eq. 16 terms) at the padded input resolution."""
        instance_ids = self.instance_targets(batched_inputs, images)
        h, w = targets.shape[-2:]
        up = self.upsample(outputs, (h, w))
        positions = pixel_positions(h, w, self.coord_scale, device=targets.device)
        return self.criterion(up, targets, instance_ids, self.space, positions)

    # ------------------------------------------------------------------ inference
    def decode_panoptic(self, up: Dict[str, torch.Tensor], probs: torch.Tensor) -> Dict:
        """Sec. 3.5 decoding of one image's upsampled maps (batch of 1) and psi (1, C, h, w)."""
        return hle_panoptic_decode(
            up["ins_embedding"][0],
            up["ins_sigma"][0],
            up["seed"][0],
            probs[0],
            thing_ids=self.thing_ids,
            spatial_sigma=float(self.space.spatial_sigma),
            coord_scale=self.coord_scale,
            **self.decode,
        )

    def inference(self, images: ImageList, batched_inputs: List[Dict]) -> List[Dict]:
        """Hook: per image "sem_seg" (C, height, width) = psi, and, when enabled,
        "panoptic_seg" and "instances" (decoded at the input resolution, then resized with
        nearest neighbours to (height, width))."""
        results = []
        for i, (x, (h, w)) in enumerate(zip(batched_inputs, images.image_sizes)):
            image = images.tensor[i : i + 1, :, :h, :w]
            out_size = (x.get("height", h), x.get("width", w))
            head = self.forward_head(image)
            up = self.upsample(head, (h, w))
            logits = up["class_logits"] if "class_logits" in up else None
            if logits is None:
                logits = self.space.semantic_logits(up["sem_embedding"])
            probs = logits.softmax(dim=1)  # (1, C, h, w) psi
            sem_seg = F.interpolate(probs, size=out_size, mode="bilinear", align_corners=False)
            result = {"sem_seg": sem_seg[0]}
            if self.output_embedding:
                emb = F.interpolate(
                    head["embedding"], size=out_size, mode="bilinear", align_corners=False
                )
                result["embedding"] = F.normalize(emb, dim=1)[0]
            if self.panoptic_on or self.instance_on:
                decoded = self.decode_panoptic(up, probs)
                if self.panoptic_on:
                    pan = _resize_nearest(decoded["panoptic_seg"][None].float(), out_size)
                    result["panoptic_seg"] = (pan[0].to(torch.int32), decoded["segments_info"])
                if self.instance_on:
                    masks = _resize_nearest(decoded["instance_masks"].float(), out_size) > 0.5
                    inst = Instances(tuple(int(s) for s in out_size))
                    inst.pred_masks = masks
                    inst.pred_boxes = BitMasks(masks).get_bounding_boxes()
                    inst.scores = decoded["instance_scores"]
                    inst.pred_classes = decoded["instance_classes"]
                    result["instances"] = inst
            results.append(result)
        return results

    @torch.no_grad()
    def embeddings(self, batched_inputs: List[Dict]) -> List[torch.Tensor]:
        """Unit embeddings (D, H_img, W_img) per input image, for the demo picture
        (:func:`~seg_methods.modeling.postprocessing.hle_decoding.embedding_to_rgb`)."""
        images = self.preprocess_images(batched_inputs)
        out = []
        for i, (h, w) in enumerate(images.image_sizes):
            emb = self.forward_head(images.tensor[i : i + 1, :, :h, :w])["embedding"]
            emb = F.interpolate(emb, size=(h, w), mode="bilinear", align_corners=False)
            out.append(F.normalize(emb, dim=1)[0])
        return out


def _resize_nearest(x: torch.Tensor, size) -> torch.Tensor:
    """(N, H, W) float -> (N, size) by nearest neighbours (no-op at the same size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[0] == 0:
        return x.new_zeros((0, *(int(s) for s in size)))
    return F.interpolate(x[None], size=tuple(size), mode="nearest")[0]
