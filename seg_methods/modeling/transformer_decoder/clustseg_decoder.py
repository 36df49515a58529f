"""ClustSeg's decoder: dreamy-start centres refined by a hierarchy of recurrent cross-attention
layers.

ClustSeg (Liang et al., ICML 2023), Sec. 3.2-3.3 and Fig. 3(c):

* C^(0) from dreamy-start (Eq. 7-9; :class:`DreamyStart`).
* ``DEC_LAYERS`` (6) decoder layers, ``DEC_LAYERS_PER_LEVEL`` (2) at each pixel-decoder level from
  the coarsest (1/32) to the finest (1/8); each layer is recurrent cross-attention (T EM
  iterations, Eq. 10-11), then self-attention, then an FFN ("the multi-head mechanism and the
  multi-layer perceptron of a standard transformer decoder", Sec. 3.2; the layer order of the
  review copy, REFERENCE_NOTES). Parameters are not shared between layers.
* Predictions (class logits over K+1 classes and mask logits ``mask_embed(c) . F_4``) are made by
  the initial centres and after every layer, through one shared LayerNorm (as Mask2Former).
* Deep supervision of every E-step (Sec. 3.3, App. B.3): the head-averaged affinities of E-step t
  are mask logits at the level's resolution; their class logits come from the residual state
  whose projection produced that E-step.

Shape shorthand:
    B: batch, K: queries (clusters), C: hidden dim, N_cls: classes, H, W: mask-feature size
    (1/4), H_l, W_l: size of decoder level l
"""

from typing import Dict, List, Optional, Sequence

import torch
from detectron2.config import configurable
from torch import nn

from ...layers.multi_scale import level_input_projections, project_levels
from ...layers.position_encoding import PositionEmbeddingSine
from ...layers.transformer_layers import MLP, FFNLayer, SelfAttentionLayer
from ..build import TRANSFORMER_DECODER_REGISTRY
from ..metadata import train_thing_ids
from .clustseg_layers import DreamyStart, RecurrentCrossAttention

ESTEP_SUPERVISION = ("all", "last", "none")
TASKS = ("panoptic", "instance", "semantic", "superpixel")


def semantic_query_classes(task: str, num_classes: int, thing_ids: Sequence[int]) -> List[int]:
    """Classes that get one scene-agnostic (memory-bank) query each for ``task``.

    Panoptic: the stuff classes (those not in ``thing_ids``); semantic: every class; instance and
    superpixel: none.
    """
    if task not in TASKS:
        raise ValueError(f"MODEL.CLUSTSEG.TASK must be one of {TASKS}, got {task!r}")
    if task == "semantic":
        return list(range(num_classes))
    if task == "panoptic":
        things = set(int(t) for t in thing_ids)
        return [c for c in range(num_classes) if c not in things]
    return []


@TRANSFORMER_DECODER_REGISTRY.register()
class ClustSegRecurrentDecoder(nn.Module):
    """Dreamy-start + recurrent cross-attention decoders (ClustSeg Sec. 3.2-3.3).

    ``forward(x, mask_features, targets=None, num_superpixels=None)`` returns
    ``{"pred_logits": (B, K, N_cls+1), "pred_masks": (B, K, H, W), "mask_embed": (B, K, C_mask),
    "aux_outputs": [{"pred_logits", "pred_masks"}, ...]}``; the auxiliary list holds, in order,
    the initial-centre prediction and, per layer, its supervised E-steps followed by the layer
    output (the last layer output is the main prediction). E-step masks are at the level's
    resolution (H_l, W_l).
    """

    @configurable
    def __init__(
        self,
        in_channels: int,
        mask_classification: bool = True,
        *,
        num_classes: int,
        hidden_dim: int,
        nheads: int,
        dim_feedforward: int,
        dec_layers: int,
        layers_per_level: int,
        pre_norm: bool,
        dropout: float,
        mask_dim: int,
        cross_attention: str,
        num_iterations: int,
        m_step: str,
        scaled_affinity: bool,
        estep_supervision: str,
        dreamy_start: DreamyStart,
        deep_supervision: bool = True,
        num_feature_levels: int = 3,
        cluster_impl: str = "auto",
    ):
        """
        Args:
            in_channels: channels of the multi-scale pixel-decoder maps.
            mask_classification: must be True.
            num_classes: N_cls (without "no object").
            hidden_dim: C.
            nheads: heads of the recurrent cross-attention and self-attention.
            dim_feedforward: FFN width.
            dec_layers: number of decoder layers (6).
            layers_per_level: consecutive layers per level, coarse to fine (2).
            pre_norm: pre-LayerNorm variant.
            dropout: dropout of the attention / FFN blocks.
            mask_dim: channels of the per-pixel mask embeddings.
            cross_attention: "recurrent", "kmeans" or "vanilla".
            num_iterations: T.
            m_step: "mean" or "sum".
            scaled_affinity: scale the affinities by d^-0.5.
            estep_supervision: which E-steps of every layer are intermediate predictions:
                "all", "last" or "none" (only the layer outputs).
            dreamy_start: the query initialiser.
            deep_supervision: whether intermediate predictions are supervised at all
                (``MODEL.MASK_CLS.DEEP_SUPERVISION``); without it no E-step prediction is made,
                whatever ``estep_supervision`` says.
            num_feature_levels: pixel-decoder levels used (3).
            cluster_impl: implementation of the clustering ops.
        """
        super().__init__()
        if not mask_classification:
            raise ValueError("ClustSeg's decoder always predicts classes (mask_classification)")
        if estep_supervision not in ESTEP_SUPERVISION:
            raise ValueError(
                f"estep_supervision must be one of {ESTEP_SUPERVISION}, got {estep_supervision!r}"
            )
        if dec_layers < 1 or layers_per_level < 1:
            raise ValueError("dec_layers and layers_per_level must be >= 1")
        self.mask_classification = True
        self.num_classes = num_classes
        self.num_layers = dec_layers
        self.layers_per_level = layers_per_level
        self.num_feature_levels = num_feature_levels
        self.estep_supervision = estep_supervision
        self.deep_supervision = deep_supervision
        self.cross_attention = cross_attention
        self.num_iterations = num_iterations
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.dreamy_start = dreamy_start
        self.recurrent_cross_attention_layers = nn.ModuleList(
            RecurrentCrossAttention(
                hidden_dim,
                nheads,
                num_iterations=num_iterations,
                mode=cross_attention,
                m_step=m_step,
                scaled=scaled_affinity,
                dropout=dropout,
                normalize_before=pre_norm,
                impl=cluster_impl,
            )
            for _ in range(dec_layers)
        )
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads, dropout=dropout, normalize_before=pre_norm)
            for _ in range(dec_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, dropout=dropout, normalize_before=pre_norm)
            for _ in range(dec_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.level_embed = nn.Embedding(num_feature_levels, hidden_dim)
        self.input_proj = level_input_projections(in_channels, hidden_dim, num_feature_levels)
        # stride-4 mask features -> C for the superpixel seeds (Eq. 9)
        self.superpixel_proj = (
            nn.Conv2d(mask_dim, hidden_dim, 1)
            if dreamy_start.superpixel and mask_dim != hidden_dim
            else nn.Identity()
        )
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @classmethod
    def from_config(cls, cfg, in_channels, mask_classification, mask_dim: int, thing_ids=None):
        """``in_channels`` and ``mask_dim`` come from the pixel decoder (its CONVS_DIM, MASK_DIM)."""
        m = cfg.MODEL.CLUSTSEG
        num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        if thing_ids is None:  # the thing classes of the first training dataset, if any
            thing_ids = train_thing_ids(cfg)
        if m.DEC_LAYERS < 1:
            raise ValueError(f"MODEL.CLUSTSEG.DEC_LAYERS must be >= 1, got {m.DEC_LAYERS}")
        dreamy = DreamyStart(
            hidden_dim=m.HIDDEN_DIM,
            num_thing_queries=m.NUM_THING_QUERIES if m.TASK in ("panoptic", "instance") else 0,
            semantic_classes=semantic_query_classes(m.TASK, num_classes, thing_ids),
            num_classes=num_classes,
            thing_init=m.THING_QUERY_INIT,
            stuff_init=m.STUFF_QUERY_INIT,
            seed_sampler=m.INSTANCE_SEED_SAMPLER,
            memory_size=m.MEMORY_SIZE,
            memory_samples_per_image=m.MEMORY_SAMPLES_PER_IMAGE,
            superpixel=m.TASK == "superpixel",
        )
        return {
            "in_channels": in_channels,
            "mask_classification": mask_classification,
            "num_classes": num_classes,
            "hidden_dim": m.HIDDEN_DIM,
            "nheads": m.NHEADS,
            "dim_feedforward": m.DIM_FEEDFORWARD,
            "dec_layers": m.DEC_LAYERS,
            "layers_per_level": m.DEC_LAYERS_PER_LEVEL,
            "pre_norm": m.PRE_NORM,
            "dropout": m.DROPOUT,
            "mask_dim": mask_dim,
            "cross_attention": m.CROSS_ATTENTION,
            "num_iterations": m.NUM_ITERATIONS,
            "m_step": m.M_STEP,
            "scaled_affinity": m.SCALED_AFFINITY,
            "estep_supervision": m.ESTEP_SUPERVISION,
            "dreamy_start": dreamy,
            "deep_supervision": cfg.MODEL.MASK_CLS.DEEP_SUPERVISION,
        }

    # ------------------------------------------------------------------ structure
    def level_of_layer(self, i: int) -> int:
        """Pixel-decoder level (0 = coarsest) attended by layer ``i``."""
        return min(i // self.layers_per_level, self.num_feature_levels - 1)

    def supervised_esteps(self) -> List[int]:
        """Indices t (0-based) of the E-steps of each layer that are supervised."""
        if (
            not self.deep_supervision
            or self.cross_attention == "vanilla"
            or self.estep_supervision == "none"
        ):
            return []
        if self.estep_supervision == "last":
            return [self.num_iterations - 1]
        return list(range(self.num_iterations))

    @property
    def num_aux_outputs(self) -> int:
        """Entries of ``aux_outputs``: initial prediction + per layer E-steps and output - 1."""
        return 1 + self.num_layers * (len(self.supervised_esteps()) + 1) - 1

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: List[torch.Tensor],
        mask_features: torch.Tensor,
        mask=None,
        *,
        targets: Optional[List[Dict]] = None,
        num_superpixels: Optional[int] = None,
    ) -> Dict:
        """
        Args:
            x: ``num_feature_levels`` maps (B, C_in, H_l, W_l), coarse to fine.
            mask_features: (B, mask_dim, H, W) per-pixel embeddings.
            mask: unused.
            targets: training targets (list of {"labels", "masks"}); when given in training
                mode, the memory banks are updated with the finest level's embeddings.
            num_superpixels: K of the superpixel task.

        Returns:
            dict, see the class docstring.
        """
        if len(x) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature levels, got {len(x)}")
        sizes = [tuple(feat.shape[-2:]) for feat in x]
        # (B, C, H_l, W_l) each
        src, pos = project_levels(x, self.input_proj, self.pe_layer, self.level_embed.weight)
        # dreamy-start from the finest level used by the decoders (1/8)
        seed_feat, seed_pos = self.input_proj[-1](x[-1]), pos[-1]
        sp_feat = sp_pos = None
        if self.dreamy_start.superpixel:
            sp_feat = self.superpixel_proj(mask_features)
            sp_pos = self.pe_layer(sp_feat)
        output, query_pos = self.dreamy_start(
            seed_feat, seed_pos, sp_feat, sp_pos, num_superpixels
        )  # (B, K, C) each
        if self.training and targets is not None:
            self.dreamy_start.update_memory(seed_feat, targets)

        flat_src = [s.flatten(2).transpose(1, 2) for s in src]  # (B, H_l*W_l, C)
        flat_pos = [p.flatten(2).transpose(1, 2) for p in pos]
        supervised = self.supervised_esteps()
        preds = [self.forward_prediction_heads(output, mask_features)]
        for i in range(self.num_layers):
            lvl = self.level_of_layer(i)
            output, states, logits = self.recurrent_cross_attention_layers[i](
                output, flat_src[lvl], flat_pos[lvl], query_pos, need_logits=bool(supervised)
            )
            for t in supervised:
                h, w = sizes[lvl]
                preds.append(
                    {
                        "pred_logits": self.class_embed(self.decoder_norm(states[t])),
                        "pred_masks": logits[t].view(logits[t].shape[0], -1, h, w),
                    }
                )
            # self-attention and FFN take (K, B, C)
            out = self.transformer_self_attention_layers[i](
                output.transpose(0, 1), query_pos=query_pos.transpose(0, 1)
            )
            output = self.transformer_ffn_layers[i](out).transpose(0, 1)
            preds.append(self.forward_prediction_heads(output, mask_features))
        final = preds[-1]
        return {
            "pred_logits": final["pred_logits"],
            "pred_masks": final["pred_masks"],
            "mask_embed": final["mask_embed"],
            "aux_outputs": [
                {"pred_logits": p["pred_logits"], "pred_masks": p["pred_masks"]} for p in preds[:-1]
            ],
        }

    def forward_prediction_heads(self, output: torch.Tensor, mask_features: torch.Tensor) -> Dict:
        """Class logits (B, K, N_cls+1), mask logits (B, K, H, W) and mask embeddings."""
        dec = self.decoder_norm(output)  # (B, K, C)
        mask_embed = self.mask_embed(dec)  # (B, K, mask_dim)
        return {
            "pred_logits": self.class_embed(dec),
            "pred_masks": torch.einsum("bkc,bchw->bkhw", mask_embed, mask_features),
            "mask_embed": mask_embed,
        }
