"""Panoptic SegFormer's decoders: location decoder + mask decoders, with decoupled queries.

Panoptic SegFormer (Li et al., "Panoptic SegFormer: Delving Deeper into Panoptic Segmentation
with Transformers", CVPR 2022):

* **Location decoder** (Sec. 3.3): ``NUM_QUERIES`` thing queries refined by Deformable-DETR
  decoder layers (self-attention, multi-scale deformable cross-attention to the encoder memory,
  FFN; post-norm). Layer l predicts thing-class logits and a box
  ``b_l = sigmoid(reg_l(q_l) + sigmoid^-1(r_l))`` (Eq. 3 "location" supervision), where ``r_l``
  is the reference of layer l: a point ``sigmoid(W p)`` from the query position ``p`` for l = 0,
  the detached previous box afterwards (iterative box refinement, as in the official code).
* **Query decoupling** (Sec. 3.2): the thing queries that reach the mask decoder come from the
  location decoder's last layer; there is one learnt stuff query (content + position) per stuff
  class of the dataset.
* **Mask decoder** (Sec. 3.4, Eq. 4): queries cross-attend to the encoder tokens of the 1/8, 1/16
  and 1/32 levels. The attention logits ``A = q k^T / sqrt(d)`` of each level and head are
  mapped by a per-level ``Linear(M, M) + ReLU`` over the heads, resized to 1/8 and fused over
  levels and heads by ``Linear(3M, 1) + ReLU``: that non-negative map is the query's mask. Each
  block (optional self-attention, cross-attention, MLP; post-norm) yields an intermediate mask; a
  last attention-only "tail" gives the final mask. Things use 4 blocks without self-attention,
  stuff 6 with; each stuff block's query also predicts a one-logit "present" score.

Parameter names are ours; ``tools/convert_panoptic_segformer_weights.py`` maps the official ones.

Shape shorthand:
    B: batch, Q: thing queries of the location decoder, T: thing queries fed to the mask decoder,
    S_st: stuff queries (stuff classes), K: thing classes, C: hidden dim, M: heads,
    S: encoder tokens of all levels, L: encoder levels (4), h, w: size of the 1/8 level
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from torch import nn
from torch.nn import functional as F

from ...layers.deform_attn import MSDeformAttn
from ...layers.transformer_layers import MLP, FFNLayer, SelfAttentionLayer
from ..build import TRANSFORMER_DECODER_REGISTRY

__all__ = [
    "PanopticSegFormerDecoder",
    "LocationDecoderLayer",
    "AttentionMaskHead",
    "MaskDecoderBlock",
    "MaskDecoder",
    "inverse_sigmoid",
]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``log(x / (1 - x))`` with x clamped to [eps, 1 - eps] (Deformable DETR)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def flatten_levels(maps: Sequence[torch.Tensor]):
    """(B, C, H_l, W_l) maps -> tokens (B, S, C), spatial_shapes (L, 2), level_start_index (L,)."""
    tokens = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)
    shapes = torch.as_tensor([m.shape[-2:] for m in maps], dtype=torch.long, device=tokens.device)
    start = torch.cat((shapes.new_zeros((1,)), shapes.prod(1).cumsum(0)[:-1]))
    return tokens, shapes, start


class LocationDecoderLayer(nn.Module):
    """Deformable DETR decoder layer: self-attention, deformable cross-attention, FFN (post-norm).

    Args:
        d_model (int): C.
        nhead (int): M.
        dim_feedforward (int): FFN width.
        dropout (float): dropout of the three sub-layers.
        n_levels (int): L.
        n_points (int): sampling points per head and level.
        impl (str): deformable-attention implementation ("auto", "op", "pytorch").
    """

    def __init__(self, d_model, nhead, dim_feedforward, dropout, n_levels, n_points, impl="auto"):
        super().__init__()
        self.self_attn = SelfAttentionLayer(d_model, nhead, dropout=dropout)
        self.cross_attn = MSDeformAttn(d_model, n_levels, nhead, n_points, impl=impl)
        self.cross_dropout = nn.Dropout(dropout)
        self.cross_norm = nn.LayerNorm(d_model)
        self.ffn = FFNLayer(d_model, dim_feedforward, dropout=dropout)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index):
        """
        Args:
            tgt (Tensor): (B, Q, C) query content.
            query_pos (Tensor): (B, Q, C) query positions (added to queries and keys).
            reference_points (Tensor): (B, Q, L, 2) points or (B, Q, L, 4) boxes, normalised.
            memory (Tensor): (B, S, C) encoder tokens.
            spatial_shapes (Tensor): (L, 2); level_start_index (Tensor): (L,).

        Returns:
            Tensor: (B, Q, C).
        """
        tgt = self.self_attn(tgt.transpose(0, 1), query_pos=query_pos.transpose(0, 1))
        tgt = tgt.transpose(0, 1)  # (B, Q, C)
        attn = self.cross_attn(
            tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index
        )
        tgt = self.cross_norm(tgt + self.cross_dropout(attn))
        return self.ffn(tgt)


class AttentionMaskHead(nn.Module):
    """Cross-attention whose per-level attention logits also give a mask (Sec. 3.4, Eq. 4).

    Args:
        d_model (int): C.
        nhead (int): M.
        num_levels (int): levels the mask is built from (3: 1/8, 1/16, 1/32).
        with_value (bool): also compute the attention output (False for the final "tail").
    """

    def __init__(self, d_model: int, nhead: int, num_levels: int = 3, with_value: bool = True):
        super().__init__()
        self.nhead = nhead
        self.scale = (d_model // nhead) ** -0.5
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.with_value = with_value
        if with_value:
            self.v_proj = nn.Linear(d_model, d_model)
            self.out_proj = nn.Linear(d_model, d_model)
        self.level_fc = nn.ModuleList(nn.Linear(nhead, nhead) for _ in range(num_levels))
        self.mask_fc = nn.Linear(nhead * num_levels, 1)

    def forward(
        self, query: torch.Tensor, memory: torch.Tensor, level_shapes: Sequence[Tuple[int, int]]
    ) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """
        Args:
            query (Tensor): (B, T, C).
            memory (Tensor): (B, S', C) tokens of the mask levels, finest first.
            level_shapes (sequence[tuple[int, int]]): (h_l, w_l) of those levels, finest first.

        Returns:
            tuple: attention output (B, T, C) (None without value) and mask (B, T, h, w) >= 0 at
            the finest level's size.
        """
        b, t, c = query.shape
        m, d = self.nhead, c // self.nhead
        q = self.q_proj(query).view(b, t, m, d).transpose(1, 2)  # (B, M, T, D)
        k = self.k_proj(memory).view(b, -1, m, d).transpose(1, 2)  # (B, M, S', D)
        logits = (q @ k.transpose(-2, -1)) * self.scale  # (B, M, T, S')
        per_token = logits.permute(0, 2, 3, 1)  # (B, T, S', M)
        h0, w0 = level_shapes[0]
        fused, start = [], 0
        for lvl, (h, w) in enumerate(level_shapes):
            x = F.relu(self.level_fc[lvl](per_token[:, :, start : start + h * w]))  # (B,T,hw,M)
            start += h * w
            if lvl > 0:  # resize to the finest level
                x = x.permute(0, 1, 3, 2).reshape(b * t, m, h, w)
                x = F.interpolate(x, size=(h0, w0), mode="bilinear", align_corners=False)
                x = x.reshape(b, t, m, h0 * w0).permute(0, 1, 3, 2)
            fused.append(x)
        mask = F.relu(self.mask_fc(torch.cat(fused, -1)))  # (B, T, h0*w0, 1)
        mask = mask.view(b, t, h0, w0)
        if not self.with_value:
            return None, mask
        v = self.v_proj(memory).view(b, -1, m, d).transpose(1, 2)  # (B, M, S', D)
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c)
        return self.out_proj(out), mask


class _QuerySelfAttention(nn.Module):
    """Plain multi-head self-attention (fused qkv projection) of the stuff mask decoder."""

    def __init__(self, d_model: int, nhead: int):
        super().__init__()
        self.nhead = nhead
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        """(B, T, C) -> (B, T, C)."""
        b, t, c = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.nhead, c // self.nhead).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, M, T, D)
        attn = ((q @ k.transpose(-2, -1)) * (c // self.nhead) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, t, c))


class MaskDecoderBlock(nn.Module):
    """[self-attention + norm,] mask cross-attention + norm, MLP (GELU, ratio 4) + norm.

    Args:
        d_model (int): C.
        nhead (int): M.
        self_attn (bool): with query self-attention (stuff decoder).
        num_levels (int): mask levels.
    """

    def __init__(self, d_model: int, nhead: int, self_attn: bool, num_levels: int = 3):
        super().__init__()
        self.self_attn = _QuerySelfAttention(d_model, nhead) if self_attn else None
        self.norm_self = nn.LayerNorm(d_model, eps=1e-6) if self_attn else None
        self.attn = AttentionMaskHead(d_model, nhead, num_levels, with_value=True)
        self.norm1 = nn.LayerNorm(d_model, eps=1e-6)
        self.mlp = MLP(d_model, 4 * d_model, d_model, 2, activation="gelu")
        self.norm2 = nn.LayerNorm(d_model, eps=1e-6)

    def forward(self, query, memory, level_shapes):
        """(B, T, C) -> ((B, T, C) updated queries, (B, T, h, w) mask)."""
        if self.self_attn is not None:
            query = self.norm_self(query + self.self_attn(query))
        out, mask = self.attn(query, memory, level_shapes)
        query = self.norm1(query + out)
        query = self.norm2(query + self.mlp(query))
        return query, mask


class MaskDecoder(nn.Module):
    """Blocks + attention-only tail (Sec. 3.4).

    As in the official code, the query position is added to each block's *input* query (the
    block's output then carries it on).

    Args:
        d_model (int): C.
        nhead (int): M.
        num_layers (int): blocks.
        self_attn (bool): blocks with query self-attention.
        num_levels (int): mask levels.
    """

    def __init__(self, d_model, nhead, num_layers, self_attn, num_levels=3):
        super().__init__()
        self.blocks = nn.ModuleList(
            MaskDecoderBlock(d_model, nhead, self_attn, num_levels) for _ in range(num_layers)
        )
        self.tail = AttentionMaskHead(d_model, nhead, num_levels, with_value=False)

    def forward(self, query, memory, level_shapes, query_pos=None):
        """
        Args:
            query (Tensor): (B, T, C).
            memory (Tensor): (B, S', C) mask-level tokens, finest first.
            level_shapes (sequence): (h_l, w_l) of the mask levels.
            query_pos (Tensor or None): (B, T, C).

        Returns:
            tuple: final mask (B, T, h, w), list of block masks (B, T, h, w), list of block
            queries (B, T, C).
        """
        masks, queries = [], []
        for block in self.blocks:
            query, mask = block(
                query if query_pos is None else query + query_pos, memory, level_shapes
            )
            masks.append(mask)
            queries.append(query)
        _, final = self.tail(
            query if query_pos is None else query + query_pos, memory, level_shapes
        )
        return final, masks, queries


@TRANSFORMER_DECODER_REGISTRY.register()
class PanopticSegFormerDecoder(nn.Module):
    """Location decoder, thing / stuff mask decoders and the decoupled queries.

    Used by :class:`seg_methods.modeling.meta_arch.panoptic_segformer.PanopticSegFormer` in three
    calls: :meth:`locate` (encoder levels -> per-layer thing logits and boxes), then
    :meth:`decode_things` (chosen thing queries -> masks) and :meth:`decode_stuff`.
    """

    @configurable
    def __init__(
        self,
        *,
        hidden_dim: int,
        num_thing_classes: int,
        num_stuff_classes: int,
        num_queries: int,
        nheads: int,
        dim_feedforward: int,
        dropout: float,
        dec_layers: int,
        n_levels: int,
        n_points: int,
        with_box_refine: bool,
        thing_mask_layers: int,
        stuff_mask_layers: int,
        mask_nheads: int,
        num_mask_levels: int = 3,
        deform_attn_impl: str = "auto",
    ):
        """
        Args:
            hidden_dim (int): C, the encoder's channels.
            num_thing_classes (int): K (from the dataset metadata).
            num_stuff_classes (int): S_st, one stuff query each (from the dataset metadata).
            num_queries (int): Q (300).
            nheads (int): heads of the location decoder (8).
            dim_feedforward (int): its FFN width (1024).
            dropout (float): its dropout (0.1).
            dec_layers (int): its layers (6).
            n_levels (int): encoder levels (4).
            n_points (int): deformable sampling points (4).
            with_box_refine (bool): iterative box refinement (per-layer heads; True).
            thing_mask_layers (int): blocks of the thing mask decoder (4).
            stuff_mask_layers (int): blocks of the stuff mask decoder (6).
            mask_nheads (int): heads of the mask decoders (8).
            num_mask_levels (int): finest encoder levels used by the mask decoders (3).
            deform_attn_impl (str): "auto", "op" or "pytorch".
        """
        super().__init__()
        if num_thing_classes < 1 or num_stuff_classes < 1:
            raise ValueError(
                f"Panoptic SegFormer needs at least one thing and one stuff class; the training "
                f"metadata (cfg.DATASETS.TRAIN[0]) gives {num_thing_classes} thing and "
                f"{num_stuff_classes} stuff classes"
            )
        if num_mask_levels > n_levels:
            raise ValueError(f"{num_mask_levels} mask levels but only {n_levels} encoder levels")
        c = hidden_dim
        self.hidden_dim = c
        self.num_queries = num_queries
        self.num_thing_classes = num_thing_classes
        self.num_stuff_classes = num_stuff_classes
        self.with_box_refine = with_box_refine
        self.num_mask_levels = num_mask_levels
        # decoupled queries (Sec. 3.2): (content, position) pairs
        self.query_embed = nn.Embedding(num_queries, 2 * c)
        self.stuff_query = nn.Embedding(num_stuff_classes, 2 * c)
        self.reference_points = nn.Linear(c, 2)
        self.layers = nn.ModuleList(
            LocationDecoderLayer(
                c, nheads, dim_feedforward, dropout, n_levels, n_points, impl=deform_attn_impl
            )
            for _ in range(dec_layers)
        )
        num_heads = dec_layers if with_box_refine else 1  # per-layer heads or one shared head
        self.class_embed = nn.ModuleList(nn.Linear(c, num_thing_classes) for _ in range(num_heads))
        self.bbox_embed = nn.ModuleList(MLP(c, c, 4, 3) for _ in range(num_heads))
        self.thing_mask_decoder = MaskDecoder(
            c, mask_nheads, thing_mask_layers, self_attn=False, num_levels=num_mask_levels
        )
        self.stuff_mask_decoder = MaskDecoder(
            c, mask_nheads, stuff_mask_layers, self_attn=True, num_levels=num_mask_levels
        )
        self.stuff_class_embed = nn.ModuleList(nn.Linear(c, 1) for _ in range(stuff_mask_layers))
        self._reset_parameters()

    def _reset_parameters(self):
        """Official initialisation: xavier for matrices (deformable attention keeps its own),
        focal-loss prior 0.01 on class biases, zero last box layer, w/h bias -2 on the first."""
        for name, p in self.named_parameters():
            if p.dim() > 1 and "cross_attn" not in name:
                nn.init.xavier_uniform_(p)
        for layer in self.layers:
            layer.cross_attn.reset_parameters()
        nn.init.xavier_uniform_(self.reference_points.weight)
        nn.init.zeros_(self.reference_points.bias)
        prior = -math.log((1 - 0.01) / 0.01)
        for head in list(self.class_embed) + list(self.stuff_class_embed):
            nn.init.constant_(head.bias, prior)
        for mlp in self.bbox_embed:
            nn.init.zeros_(mlp.layers[-1].weight)
            nn.init.zeros_(mlp.layers[-1].bias)
        nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
        nn.init.normal_(self.query_embed.weight)
        nn.init.normal_(self.stuff_query.weight)

    @classmethod
    def from_config(
        cls,
        cfg,
        in_channels: int,
        mask_classification: bool = True,
        *,
        num_thing_classes: int,
        num_stuff_classes: int,
        n_levels: int,
    ):
        m = cfg.MODEL.PANOPTIC_SEGFORMER
        return {
            "hidden_dim": in_channels,
            "num_thing_classes": num_thing_classes,
            "num_stuff_classes": num_stuff_classes,
            "num_queries": m.NUM_QUERIES,
            "nheads": m.NHEADS,
            "dim_feedforward": m.DIM_FEEDFORWARD,
            "dropout": m.DROPOUT,
            "dec_layers": m.DEC_LAYERS,
            "n_levels": n_levels,
            "n_points": m.DEC_N_POINTS,
            "with_box_refine": m.WITH_BOX_REFINE,
            "thing_mask_layers": m.THING_MASK_LAYERS,
            "stuff_mask_layers": m.STUFF_MASK_LAYERS,
            "mask_nheads": m.MASK_NHEADS,
            "deform_attn_impl": cfg.MODEL.MSDEFORM_PIXEL_DECODER.DEFORM_ATTN_IMPL,
        }

    def _head(self, heads: nn.ModuleList, lvl: int) -> nn.Module:
        return heads[lvl] if self.with_box_refine else heads[0]

    def locate(self, maps: List[torch.Tensor]) -> Dict:
        """Location decoder over the encoder levels.

        Args:
            maps (list[Tensor]): L encoder outputs (B, C, H_l, W_l), coarsest first (the order of
                the shared encoder).

        Returns:
            dict: "pred_logits" (B, Q, K) and "pred_boxes" (B, Q, 4) normalised (cx, cy, w, h) of
            the last layer; "aux_outputs": the same for layers 0..dec_layers-2; "queries"
            (B, Q, C) of the last layer; "mask_memory" (B, S', C) tokens of the
            ``num_mask_levels`` finest levels, finest first, and "mask_shapes" their sizes.
        """
        memory, spatial_shapes, level_start_index = flatten_levels(maps)
        b, c = memory.shape[0], self.hidden_dim
        pos, tgt = self.query_embed.weight.split(c, dim=1)  # (Q, C) each
        pos = pos.unsqueeze(0).expand(b, -1, -1)
        tgt = tgt.unsqueeze(0).expand(b, -1, -1)
        reference = self.reference_points(pos).sigmoid()  # (B, Q, 2)
        logits, boxes = [], []
        num_levels = spatial_shapes.shape[0]
        for lvl, layer in enumerate(self.layers):
            ref_input = reference[:, :, None, :].expand(-1, -1, num_levels, -1)
            tgt = layer(tgt, pos, ref_input, memory, spatial_shapes, level_start_index)
            delta = self._head(self.bbox_embed, lvl)(tgt)  # (B, Q, 4)
            if reference.shape[-1] == 4:
                box = (delta + inverse_sigmoid(reference)).sigmoid()
            else:
                box = torch.cat(
                    (delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]), -1
                ).sigmoid()
            logits.append(self._head(self.class_embed, lvl)(tgt))
            boxes.append(box)
            if self.with_box_refine:
                reference = box.detach()  # iterative box refinement
        mask_maps = maps[::-1][: self.num_mask_levels]  # finest first
        mask_memory = torch.cat([m.flatten(2).transpose(1, 2) for m in mask_maps], 1)
        return {
            "pred_logits": logits[-1],
            "pred_boxes": boxes[-1],
            "aux_outputs": [
                {"pred_logits": a, "pred_boxes": bb} for a, bb in zip(logits[:-1], boxes[:-1])
            ],
            "queries": tgt,
            "mask_memory": mask_memory,
            "mask_shapes": [tuple(int(s) for s in m.shape[-2:]) for m in mask_maps],
        }

    def decode_things(self, located: Dict, thing_queries: torch.Tensor):
        """Thing masks (no query position, as in the official code).

        Args:
            located (dict): output of :meth:`locate`.
            thing_queries (Tensor): (B, T, C) chosen last-layer queries.

        Returns:
            tuple: final masks (B, T, h, w) and the block masks, list of (B, T, h, w).
        """
        final, masks, _ = self.thing_mask_decoder(
            thing_queries, located["mask_memory"], located["mask_shapes"]
        )
        return final, masks

    def decode_stuff(self, located: Dict):
        """Stuff masks and "present" logits of the one-per-class stuff queries.

        Returns:
            tuple: final masks (B, S_st, h, w), block masks (list of (B, S_st, h, w)), block
            logits (list of (B, S_st); the last one scores the final masks).
        """
        b = located["mask_memory"].shape[0]
        query, pos = self.stuff_query.weight.split(self.hidden_dim, dim=1)
        query = query.unsqueeze(0).expand(b, -1, -1)
        pos = pos.unsqueeze(0).expand(b, -1, -1)
        final, masks, queries = self.stuff_mask_decoder(
            query, located["mask_memory"], located["mask_shapes"], query_pos=pos
        )
        logits = [head(q).squeeze(-1) for head, q in zip(self.stuff_class_embed, queries)]
        return final, masks, logits
