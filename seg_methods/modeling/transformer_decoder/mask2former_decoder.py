"""Mask2Former's transformer decoder with masked attention.

Mask2Former (Cheng et al., CVPR 2022), Sec. 3.2:
- Eq. 2 (masked attention): X_l = softmax(M_{l-1} + Q_l K_l^T) V_l + X_{l-1}, where
  M_{l-1}(x, y) = 0 if the previous layer's (resized) mask prediction sigmoid(m)(x, y) >= 0.5 and
  -inf otherwise. Rows that would block every pixel are left unblocked. The mask is detached.
- Layer order: masked cross-attention, self-attention, FFN (Sec. 3.2.1 "optimization
  improvements"); learnable query features are supervised before the first layer; 9 layers cycle
  through the 1/32, 1/16, 1/8 pixel-decoder levels (3 rounds of 3, Sec. 3.2.2).
- Every prediction (learnable queries + each layer) goes through one shared LayerNorm
  (``decoder_norm``) then the class head (linear, K+1 classes) and the mask head (3-layer MLP
  whose output is dotted with the per-pixel embeddings).

Parameter names follow the public checkpoints.

Shape shorthand:
    B: batch, Q: queries, C: hidden dim, K: classes, h: heads, H, W: mask-feature size (1/4),
    H_l, W_l: size of decoder level l
"""

from typing import Dict, List

import torch
from detectron2.config import configurable
from torch import nn
from torch.nn import functional as F

from ...layers.multi_scale import level_input_projections, project_levels
from ...layers.position_encoding import PositionEmbeddingSine
from ...layers.transformer_layers import MLP, CrossAttentionLayer, FFNLayer, SelfAttentionLayer
from ..build import TRANSFORMER_DECODER_REGISTRY


def masked_attention_mask(mask_logits, target_size, num_heads, threshold=0.5):
    """Attention mask of Mask2Former Eq. 2 from the previous layer's mask logits.

    Args:
        mask_logits (Tensor): (B, Q, H, W) mask logits of the previous prediction.
        target_size (tuple): (H_l, W_l) of the level attended next.
        num_heads (int): h; the mask is repeated per head as nn.MultiheadAttention expects.
        threshold (float): pixels with sigmoid < threshold are blocked (0.5 in the paper).

    Returns:
        Tensor: (B*h, Q, H_l*W_l) bool, True = blocked; detached; rows where every pixel would be
        blocked are fully unblocked (so that attention is defined).
    """
    with torch.no_grad():
        m = mask_logits.detach()
        if tuple(m.shape[-2:]) != tuple(target_size):  # at scale 1 the resize is the identity
            m = F.interpolate(m, size=target_size, mode="bilinear", align_corners=False)
        blocked = m.sigmoid().flatten(2) < threshold  # (B, Q, H_l*W_l)
        blocked = blocked & ~blocked.all(-1, keepdim=True)
        return blocked.repeat_interleave(num_heads, dim=0)  # (B*h, Q, H_l*W_l), batch-major


@TRANSFORMER_DECODER_REGISTRY.register()
class Mask2FormerMaskedAttentionDecoder(nn.Module):
    """Multi-scale masked-attention transformer decoder (Mask2Former Sec. 3.2).

    ``forward(x, mask_features)`` returns ``{"pred_logits": (B, Q, K+1), "pred_masks":
    (B, Q, H, W), "aux_outputs": [{"pred_logits", "pred_masks"}] * dec_layers}`` where the
    auxiliary list holds the learnable-query prediction and layers 1..dec_layers-1.
    """

    @configurable
    def __init__(
        self,
        in_channels: int,
        mask_classification: bool = True,
        *,
        num_classes: int,
        hidden_dim: int,
        num_queries: int,
        nheads: int,
        dim_feedforward: int,
        dec_layers: int,
        pre_norm: bool,
        mask_dim: int,
        enforce_input_project: bool,
        num_feature_levels: int = 3,
        mask_threshold: float = 0.5,
        eval_level_size_attention_masks: bool = False,
    ):
        """
        Args:
            in_channels: channels of the multi-scale pixel-decoder features.
            mask_classification: must be True (Mask2Former always classifies masks).
            num_classes: K (without the no-object class).
            hidden_dim: C (256).
            num_queries: Q (100 for COCO panoptic, 200 for instance/ADE20K panoptic).
            nheads: attention heads (8).
            dim_feedforward: FFN width (2048).
            dec_layers: number of masked-attention layers (9).
            pre_norm: pre-LayerNorm variant (False in the paper).
            mask_dim: channels of the per-pixel mask embeddings.
            enforce_input_project: always add a 1x1 input projection.
            num_feature_levels: pixel-decoder levels cycled through (3).
            mask_threshold: sigmoid threshold of the attention mask (0.5).
            eval_level_size_attention_masks: in eval mode, predict the intermediate masks at
                the size of the level attended next (``einsum`` with the mask features resized
                there) instead of at the mask-feature size followed by a resize of the masks.
                Bilinear resizing and the ``einsum`` are both linear, so the attention masks are
                the same up to float rounding (a flip needs a mask logit within rounding of 0),
                and the 1/4-resolution products of all but the last prediction are skipped. The
                eval outputs' ``aux_outputs`` then hold ``pred_logits`` only. Training is
                unchanged.
        """
        super().__init__()
        if not mask_classification:
            raise ValueError("Mask2Former's decoder always predicts classes (mask_classification)")
        self.mask_classification = True
        self.num_classes = num_classes
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.mask_threshold = mask_threshold
        self.eval_level_size_attention_masks = bool(eval_level_size_attention_masks)
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads, dropout=0.0, normalize_before=pre_norm)
            for _ in range(dec_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads, dropout=0.0, normalize_before=pre_norm)
            for _ in range(dec_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, dropout=0.0, normalize_before=pre_norm)
            for _ in range(dec_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.num_queries = num_queries
        self.query_feat = nn.Embedding(num_queries, hidden_dim)  # learnable query features
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # learnable query positions
        self.num_feature_levels = num_feature_levels
        self.level_embed = nn.Embedding(num_feature_levels, hidden_dim)
        self.input_proj = level_input_projections(
            in_channels, hidden_dim, num_feature_levels, enforce=enforce_input_project
        )
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @classmethod
    def from_config(cls, cfg, in_channels, mask_classification, mask_dim: int):
        """``in_channels`` and ``mask_dim`` come from the pixel decoder (its CONVS_DIM, MASK_DIM)."""
        m = cfg.MODEL.MASK2FORMER
        if m.DEC_LAYERS < 1:
            raise ValueError(f"MODEL.MASK2FORMER.DEC_LAYERS must be >= 1, got {m.DEC_LAYERS}")
        return {
            "in_channels": in_channels,
            "mask_classification": mask_classification,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "hidden_dim": m.HIDDEN_DIM,
            "num_queries": m.NUM_OBJECT_QUERIES,
            "nheads": m.NHEADS,
            "dim_feedforward": m.DIM_FEEDFORWARD,
            "dec_layers": m.DEC_LAYERS,
            "pre_norm": m.PRE_NORM,
            "mask_dim": mask_dim,
            "enforce_input_project": m.ENFORCE_INPUT_PROJ,
            "mask_threshold": m.MASK_ATTENTION_THRESHOLD,
            "eval_level_size_attention_masks": m.EVAL_LEVEL_SIZE_ATTENTION_MASKS,
        }

    def forward(self, x: List[torch.Tensor], mask_features: torch.Tensor, mask=None) -> Dict:
        """
        Args:
            x: ``num_feature_levels`` maps (B, C_in, H_l, W_l), low to high resolution.
            mask_features: (B, mask_dim, H, W) per-pixel embeddings.
            mask: unused (padding is not masked, as in the paper's implementation).

        Returns:
            dict with "pred_logits" (B, Q, K+1), "pred_masks" (B, Q, H, W), "aux_outputs".
        """
        if len(x) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature levels, got {len(x)}")
        sizes = [feat.shape[-2:] for feat in x]
        src, pos = project_levels(x, self.input_proj, self.pe_layer, self.level_embed.weight)
        src = [s.flatten(2).permute(2, 0, 1) for s in src]  # (H_l*W_l, B, C)
        pos = [p.flatten(2).permute(2, 0, 1) for p in pos]  # (H_l*W_l, B, C)
        bs = src[0].shape[1]
        query_pos = self.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)  # (Q, B, C)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, bs, 1)  # (Q, B, C)

        level_size = self.eval_level_size_attention_masks and not self.training
        resized = {}  # level size -> mask features resized there (level_size only)

        def heads(output, next_size, last):
            if not level_size or last:
                return self.forward_prediction_heads(output, mask_features, next_size)
            key = tuple(int(v) for v in next_size)
            if key not in resized:
                resized[key] = F.interpolate(
                    mask_features, size=key, mode="bilinear", align_corners=False
                )
            cls_, _, attn = self.forward_prediction_heads(output, resized[key], key)
            return cls_, None, attn  # the level-size masks are not the model's predictions

        classes, masks = [], []
        cls_, mask_, attn_mask = heads(output, sizes[0], self.num_layers == 0)
        classes.append(cls_)
        masks.append(mask_)
        for i in range(self.num_layers):
            lvl = i % self.num_feature_levels
            # masked cross-attention (Eq. 2), then self-attention, then FFN
            output = self.transformer_cross_attention_layers[i](
                output, src[lvl], memory_mask=attn_mask, pos=pos[lvl], query_pos=query_pos
            )
            output = self.transformer_self_attention_layers[i](output, query_pos=query_pos)
            output = self.transformer_ffn_layers[i](output)
            next_size = sizes[(i + 1) % self.num_feature_levels]
            cls_, mask_, attn_mask = heads(output, next_size, i == self.num_layers - 1)
            classes.append(cls_)
            masks.append(mask_)
        return {
            "pred_logits": classes[-1],
            "pred_masks": masks[-1],
            "aux_outputs": [
                {"pred_logits": c} if m is None else {"pred_logits": c, "pred_masks": m}
                for c, m in zip(classes[:-1], masks[:-1])
            ],
        }

    def forward_prediction_heads(self, output, mask_features, attn_mask_target_size):
        """Class and mask predictions of the current queries, and the next attention mask.

        Args:
            output (Tensor): (Q, B, C) query features.
            mask_features (Tensor): (B, mask_dim, H, W).
            attn_mask_target_size (tuple): (H_l, W_l) of the next level.

        Returns:
            class logits (B, Q, K+1), mask logits (B, Q, H, W), attention mask (B*h, Q, H_l*W_l).
        """
        dec = self.decoder_norm(output).transpose(0, 1)  # (B, Q, C)
        outputs_class = self.class_embed(dec)
        mask_embed = self.mask_embed(dec)  # (B, Q, mask_dim)
        # einsum("bqc,bchw->bqhw"), written as the bmm it runs (same values, no output copy)
        outputs_mask = torch.bmm(mask_embed, mask_features.flatten(2)).view(
            *mask_embed.shape[:2], *mask_features.shape[-2:]
        )
        attn_mask = masked_attention_mask(
            outputs_mask, attn_mask_target_size, self.num_heads, self.mask_threshold
        )
        return outputs_class, outputs_mask, attn_mask
