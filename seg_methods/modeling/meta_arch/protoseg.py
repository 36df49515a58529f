"""ProtoSeg: nonparametric semantic segmentation with class prototypes, in the per-pixel template.

Zhou et al., "Rethinking Semantic Segmentation: A Prototype View" (CVPR 2022); official code
tfzhou/ProtoSeg (``HRNet_W48_Proto`` in ``lib/models/nets/hrnet.py``), read for understanding.

Pixel embeddings (projection head on the feature head's output, L2-normalised; by default, as
the official code, followed by a LayerNorm and a second L2 normalisation) are compared by cosine
with C x M non-learnable unit prototypes (a buffer, saved in checkpoints). A class's logit is the
maximum cosine over its M prototypes, by default followed by a LayerNorm over the classes
(official). In training, each class's pixels are clustered onto its prototypes with
Sinkhorn-Knopp; the prototypes move towards the embeddings of the correctly classified pixels
assigned to them (momentum gamma, no gradient), and the pixel-prototype contrastive (PPC) and
distance (PPD) losses pull the embeddings to their assigned prototype, computed with the
prototypes from before this step's update. See projects/ProtoSeg/README.md.

Feature heads: detectron2's ``DeepLabV3PlusHead`` (ResNet configs) or ``HRNetV2Head`` on a timm
HRNet (the official HRNet-W48 model; official checkpoints convert with
tools/convert_protoseg_weights.py and need ``PROJECTION_L2_AXIS: "width"``).

Shape shorthand:
    B: batch, C: classes, M: prototypes per class, D: embedding dim, H, W: padded input size,
    h, w: feature size (H / 4 with a DeepLabV3+ head on res2 or the HRNetV2 head),
    N = B * h * w pixels
"""

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils import comm
from torch import nn

from ..criterion.protoseg import (
    UPDATE_ASSIGNMENTS,
    VOID,
    assign_prototypes,
    momentum_update_prototypes,
    ppc_loss,
    ppd_loss,
)
from .per_pixel import FEATURE_HEADS, PerPixelSemanticModel, build_feature_head

__all__ = ["FEATURE_HEADS", "L2_AXES", "PROJECTIONS", "ProtoSeg"]

PROJECTIONS = ("convmlp", "linear")
L2_AXES = ("channels", "width")


def _projection_head(kind: str, in_channels: int, embed_dim: int) -> nn.Module:
    """The projection head: "convmlp" (1x1 conv, ReLU, 1x1 conv; the official
    ``ProjectionHead`` of ``lib/models/modules/contrast.py``) or "linear" (one 1x1 conv)."""
    if kind == "convmlp":
        return nn.Sequential(
            Conv2d(in_channels, in_channels, kernel_size=1),
            nn.ReLU(inplace=True),
            Conv2d(in_channels, embed_dim, kernel_size=1),
        )
    if kind == "linear":
        return Conv2d(in_channels, embed_dim, kernel_size=1)
    raise ValueError(f"MODEL.PROTOSEG.PROJECTION must be one of {PROJECTIONS}, got {kind!r}")


@META_ARCH_REGISTRY.register()
class ProtoSeg(PerPixelSemanticModel):
    """Backbone + feature head + projection, classified by the nearest of M prototypes per class.

    Args (besides :class:`PerPixelSemanticModel`'s; ``sem_seg_head`` must return features,
    e.g. a ``DeepLabV3PlusHead`` or ``HRNetV2Head`` built without a predictor):
        feature_channels (int): channels of ``sem_seg_head.layers(features)``.
        num_prototypes (int): M.
        embed_dim (int): D.
        projection (str): "convmlp" or "linear" (see :func:`_projection_head`).
        feature_norm (bool): LayerNorm + L2 after the first L2 normalisation (official).
        logits_norm (bool): LayerNorm over classes on the max-over-prototypes cosines (official).
        sinkhorn_iterations (int), sinkhorn_epsilon (float): Sinkhorn-Knopp settings.
        update_assignment (str): "gumbel" (official) or "argmax" (paper) for the update.
        gumbel_tau (float): Gumbel-softmax temperature.
        momentum (float): gamma of the prototype moving average.
        update_prototypes (bool): False freezes the prototypes.
        ppc_weight, ppd_weight (float): loss weights.
        ppc_temperature (float): PPC softmax temperature (official: 1).
        projection_l2_axis (str): "channels" or "width" (official; see :meth:`embed`).
        ce_class_weights (list[float] or None): per-class cross-entropy weights (official
            Cityscapes recipe); None: plain cross-entropy.
        output_prototype_index (bool): inference also returns "prototype_index".
    """

    @configurable
    def __init__(
        self,
        *,
        feature_channels: int,
        num_prototypes: int = 10,
        embed_dim: int = 720,
        projection: str = "convmlp",
        feature_norm: bool = True,
        logits_norm: bool = True,
        sinkhorn_iterations: int = 3,
        sinkhorn_epsilon: float = 0.05,
        update_assignment: str = "gumbel",
        gumbel_tau: float = 0.5,
        momentum: float = 0.999,
        update_prototypes: bool = True,
        ppc_weight: float = 0.01,
        ppd_weight: float = 0.001,
        ppc_temperature: float = 1.0,
        projection_l2_axis: str = "channels",
        ce_class_weights: Optional[List[float]] = None,
        output_prototype_index: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if projection_l2_axis not in L2_AXES:
            raise ValueError(
                f"MODEL.PROTOSEG.PROJECTION_L2_AXIS must be one of {L2_AXES}, got "
                f"{projection_l2_axis!r}"
            )
        if ce_class_weights and len(ce_class_weights) != self.num_classes:
            raise ValueError(
                f"MODEL.PROTOSEG.CE_CLASS_WEIGHTS has {len(ce_class_weights)} values for "
                f"{self.num_classes} classes"
            )
        if num_prototypes < 1 or embed_dim < 1:
            raise ValueError(
                "MODEL.PROTOSEG.NUM_PROTOTYPES and MODEL.PROTOSEG.EMBED_DIM must be >= 1, got "
                f"{num_prototypes} and {embed_dim}"
            )
        if update_assignment not in UPDATE_ASSIGNMENTS:
            raise ValueError(
                f"MODEL.PROTOSEG.UPDATE_ASSIGNMENT must be one of {UPDATE_ASSIGNMENTS}, got "
                f"{update_assignment!r}"
            )
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"MODEL.PROTOSEG.MOMENTUM must be in [0, 1], got {momentum}")
        self.num_prototypes = num_prototypes
        self.embed_dim = embed_dim
        self.projection = _projection_head(projection, feature_channels, embed_dim)
        self.feature_norm = nn.LayerNorm(embed_dim) if feature_norm else None
        self.logits_norm = nn.LayerNorm(self.num_classes) if logits_norm else None
        # Non-learnable prototypes on the unit sphere: a buffer (no gradient, not seen by the
        # optimizer, saved in checkpoints). Official initialisation: truncated normal, std 0.02,
        # then L2-normalised.
        protos = torch.empty(self.num_classes, num_prototypes, embed_dim)
        nn.init.trunc_normal_(protos, std=0.02)
        self.register_buffer("prototypes", F.normalize(protos, dim=-1))
        self.sinkhorn_iterations = sinkhorn_iterations
        self.sinkhorn_epsilon = sinkhorn_epsilon
        self.update_assignment = update_assignment
        self.gumbel_tau = gumbel_tau
        self.momentum = momentum
        self.update_prototypes = update_prototypes
        self.ppc_weight = ppc_weight
        self.ppd_weight = ppd_weight
        self.ppc_temperature = ppc_temperature
        self.projection_l2_axis = projection_l2_axis
        self.output_prototype_index = output_prototype_index
        if ce_class_weights:
            self.register_buffer(
                "ce_class_weights", torch.tensor(ce_class_weights, dtype=torch.float32), False
            )
        else:
            self.ce_class_weights = None

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        # The template built the head with a class predictor; ProtoSeg's classifier is the
        # prototypes, so the head is rebuilt in detectron2's decoder-only mode (no predictor).
        ret["sem_seg_head"], feature_channels = build_feature_head(
            cfg, ret["backbone"].output_shape(), "ProtoSeg"
        )
        p = cfg.MODEL.PROTOSEG
        ret.update(
            feature_channels=feature_channels,
            num_prototypes=p.NUM_PROTOTYPES,
            embed_dim=p.EMBED_DIM,
            projection=p.PROJECTION,
            feature_norm=p.FEATURE_NORM,
            logits_norm=p.LOGITS_NORM,
            sinkhorn_iterations=p.SINKHORN_ITERATIONS,
            sinkhorn_epsilon=p.SINKHORN_EPSILON,
            update_assignment=p.UPDATE_ASSIGNMENT,
            gumbel_tau=p.GUMBEL_TAU,
            momentum=p.MOMENTUM,
            update_prototypes=p.UPDATE_PROTOTYPES,
            ppc_weight=p.PPC_WEIGHT,
            ppd_weight=p.PPD_WEIGHT,
            ppc_temperature=p.PPC_TEMPERATURE,
            projection_l2_axis=p.PROJECTION_L2_AXIS,
            ce_class_weights=list(p.CE_CLASS_WEIGHTS) or None,
            output_prototype_index=p.OUTPUT_PROTOTYPE_INDEX,
        )
        return ret

    # ------------------------------------------------------------------ pieces
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised batch (B, 3, H, W) -> unit pixel embeddings (B, D, h, w).

        projection -> L2 (over the channels, or with ``projection_l2_axis="width"`` over the
        last axis as the official ``ProjectionHead``) -> [LayerNorm(D) -> L2 over channels].
        """
        feats = self.sem_seg_head.layers(self.backbone(images))
        emb = F.normalize(
            self.projection(feats), dim=1 if self.projection_l2_axis == "channels" else -1
        )
        if self.feature_norm is not None:
            emb = self.feature_norm(emb.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            emb = F.normalize(emb, dim=1)
        return emb

    def prototype_cosines(
        self, embeddings: torch.Tensor, prototypes: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """(B, D, h, w) unit embeddings -> (B, C, M, h, w) cosines to the (C, M, D) prototypes
        (default: the current buffer)."""
        protos = self.prototypes if prototypes is None else prototypes
        return torch.einsum("bdhw,cmd->bcmhw", embeddings, protos)

    def class_logits(self, cosines: torch.Tensor) -> torch.Tensor:
        """(B, C, M, h, w) cosines -> (B, C, h, w) logits: the max over each class's prototypes,
        then (optionally) a LayerNorm over classes."""
        logits = cosines.amax(dim=2)
        if self.logits_norm is not None:
            logits = self.logits_norm(logits.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return logits

    # ------------------------------------------------------------------ hooks
    def forward_head(
        self, images: torch.Tensor, targets: Optional[torch.Tensor] = None
    ) -> Dict[str, torch.Tensor]:
        """Hook: ``{"sem_seg": (B, C, h, w)}``; in training (``targets`` given) also the PPC/PPD
        inputs, after which the prototypes are updated.

        Training outputs: "proto_logits" (N, C * M) cosines to the prototypes from before the
        update, and "proto_targets" (N,) the Sinkhorn argmax prototype of every pixel
        (:data:`VOID` for void pixels), at feature resolution.
        """
        emb = self.embed(images)
        cosines = self.prototype_cosines(emb)  # (B, C, M, h, w)
        logits = self.class_logits(cosines)
        if targets is None:
            return {"sem_seg": logits}

        _, c, m, h, w = cosines.shape
        # Labels at feature resolution (nearest, as the official code); void stays void.
        labels = F.interpolate(targets[:, None].float(), size=(h, w), mode="nearest")
        labels = labels[:, 0].long().reshape(-1)  # (N,)
        labels = torch.where((labels >= 0) & (labels < c), labels, torch.full_like(labels, VOID))
        pixel_cosines = cosines.permute(0, 3, 4, 1, 2).reshape(-1, c, m)  # (N, C, M)
        target_ids, update_ids = assign_prototypes(
            pixel_cosines.detach(),
            labels,
            iterations=self.sinkhorn_iterations,
            epsilon=self.sinkhorn_epsilon,
            update_assignment=self.update_assignment,
            gumbel_tau=self.gumbel_tau,
        )
        if self.update_prototypes:
            correct = logits.detach().argmax(dim=1).reshape(-1) == labels
            pixel_emb = emb.detach().permute(0, 2, 3, 1).reshape(-1, self.embed_dim)
            new = momentum_update_prototypes(
                self.prototypes, pixel_emb, update_ids, correct, self.momentum
            )
            if comm.get_world_size() > 1:
                torch.distributed.all_reduce(new.div_(comm.get_world_size()))
                new = F.normalize(new, dim=-1)
            # A new tensor, not an in-place copy: the old one is saved for this step's backward.
            self.prototypes = new
        return {
            "sem_seg": logits,
            "proto_logits": pixel_cosines.reshape(-1, c * m),
            "proto_targets": target_ids,
        }

    def losses(self, outputs, targets, batched_inputs, images) -> Dict[str, torch.Tensor]:
        """Hook: the template's cross-entropy ("loss_sem_seg": class logits upsampled to the
        padded input size, void excluded) plus the weighted PPC and PPD at feature resolution."""
        if self.ce_class_weights is None:
            losses = super().losses(outputs, targets, batched_inputs, images)
        else:
            losses = {"loss_sem_seg": self.weighted_cross_entropy(outputs, targets)}
        proto_logits, proto_targets = outputs["proto_logits"], outputs["proto_targets"]
        losses["loss_ppc"] = (
            ppc_loss(proto_logits, proto_targets, self.ppc_temperature) * self.ppc_weight
        )
        losses["loss_ppd"] = ppd_loss(proto_logits, proto_targets) * self.ppd_weight
        return losses

    def weighted_cross_entropy(
        self, outputs: Dict[str, torch.Tensor], targets: torch.Tensor
    ) -> torch.Tensor:
        """Class-weighted cross-entropy (official Cityscapes recipe): logits upsampled to the
        padded input size, void excluded, weighted mean ``sum_i w_{y_i} CE_i / sum_i w_{y_i}``;
        0 (attached to the graph) for an all-void batch. Times ``SEM_SEG_HEAD.LOSS_WEIGHT``."""
        logits = self.segmentation_logits(outputs, targets.shape[-2:])
        if not (targets != self.ignore_value).any():
            return logits.sum() * 0.0
        loss = F.cross_entropy(
            logits, targets, weight=self.ce_class_weights, ignore_index=self.ignore_value
        )
        return loss * self.loss_weight

    def inference(self, images, batched_inputs: List[Dict]) -> List[Dict]:
        """Hook: the template's per-image ``{"sem_seg"}``; with ``output_prototype_index`` also
        ``"prototype_index"`` (height, width) int64 from :meth:`nearest_prototypes`."""
        results = super().inference(images, batched_inputs)
        if self.output_prototype_index:
            for r, ids in zip(results, self.nearest_prototypes(batched_inputs)):
                r["prototype_index"] = ids
        return results

    # ------------------------------------------------------------------ demo helper
    @torch.no_grad()
    def nearest_prototypes(self, batched_inputs: List[Dict]) -> List[torch.Tensor]:
        """Each pixel's nearest prototype, for painting prototypes in a demo.

        Args:
            batched_inputs (list[dict]): model inputs ("image" (3, H, W); optional
                "height"/"width" output size).

        Returns:
            list[Tensor]: per image, (height, width) int64 global prototype ids ``class * M + m``
            of the largest cosine (the cosines are upsampled bilinearly to the output size);
            ``ids // M`` is the class of that prototype.
        """
        images = self.preprocess_images(batched_inputs)
        padded = images.tensor.shape[-2:]
        out = []
        for i, (x, (h, w)) in enumerate(zip(batched_inputs, images.image_sizes)):
            # Whole padded image (as the template's "whole" test mode), cropped to the image.
            cos = self.prototype_cosines(self.embed(images.tensor[i : i + 1])).flatten(1, 2)
            cos = F.interpolate(cos, size=padded, mode="bilinear", align_corners=False)
            size = (x.get("height", h), x.get("width", w))
            cos = F.interpolate(cos[..., :h, :w], size=size, mode="bilinear", align_corners=False)
            out.append(cos[0].argmax(dim=0))  # (C*M, height, width) -> (height, width)
        return out
