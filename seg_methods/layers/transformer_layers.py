"""Transformer decoder building blocks shared by query-based methods (Mask2Former, ClustSeg, ...).

Parameter names follow the public Mask2Former checkpoints (``self_attn``, ``multihead_attn``,
``norm``, ``linear1``, ``linear2``, ``layers.{i}``) so official weights load unchanged.

Shape shorthand:
    Q: number of queries, B: batch size, C: hidden dim, S: number of memory (pixel) tokens
    Sequences are (length, B, C), as torch.nn.MultiheadAttention expects by default.
"""
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def _activation(name: str):
    acts = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}
    if name not in acts:
        raise ValueError(f"Unknown activation '{name}'; expected one of {sorted(acts)}")
    return acts[name]


def _xavier_init(module: nn.Module):
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


def _add_pos(x: Tensor, pos: Optional[Tensor]) -> Tensor:
    return x if pos is None else x + pos


class SelfAttentionLayer(nn.Module):
    """Multi-head self-attention among queries with residual and LayerNorm (post- or pre-norm).

    Positional embeddings are added to queries and keys, not to values.
    """

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before=False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier_init(self)

    def forward(self, tgt: Tensor, tgt_mask=None, tgt_key_padding_mask=None, query_pos=None):
        """
        Args:
            tgt (Tensor): (Q, B, C) query features.
            tgt_mask (Tensor or None): attention mask, as nn.MultiheadAttention's attn_mask.
            query_pos (Tensor or None): (Q, B, C) query positional embeddings.

        Returns:
            Tensor: (Q, B, C).
        """
        x = self.norm(tgt) if self.normalize_before else tgt
        qk = _add_pos(x, query_pos)
        out = self.self_attn(
            qk, qk, value=x, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask
        )[0]
        tgt = tgt + self.dropout(out)
        return tgt if self.normalize_before else self.norm(tgt)


class CrossAttentionLayer(nn.Module):
    """Queries attend to memory (pixel) tokens; optional boolean mask (True = blocked)."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before=False):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier_init(self)

    def forward(
        self, tgt, memory, memory_mask=None, memory_key_padding_mask=None, pos=None, query_pos=None
    ):
        """
        Args:
            tgt (Tensor): (Q, B, C) queries.
            memory (Tensor): (S, B, C) pixel tokens.
            memory_mask (Tensor or None): (B*heads, Q, S) bool, True where attention is blocked.
            pos (Tensor or None): (S, B, C) positional embedding of the memory (added to keys).
            query_pos (Tensor or None): (Q, B, C) positional embedding of the queries.

        Returns:
            Tensor: (Q, B, C).
        """
        x = self.norm(tgt) if self.normalize_before else tgt
        out = self.multihead_attn(
            query=_add_pos(x, query_pos),
            key=_add_pos(memory, pos),
            value=memory,
            attn_mask=memory_mask,
            key_padding_mask=memory_key_padding_mask,
        )[0]
        tgt = tgt + self.dropout(out)
        return tgt if self.normalize_before else self.norm(tgt)


class FFNLayer(nn.Module):
    """Two-layer feed-forward block with residual and LayerNorm (post- or pre-norm)."""

    def __init__(
        self,
        d_model: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        activation: str = "relu",
        normalize_before: bool = False,
    ):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before
        _xavier_init(self)

    def forward(self, tgt: Tensor) -> Tensor:
        """(Q, B, C) -> (Q, B, C)."""
        x = self.norm(tgt) if self.normalize_before else tgt
        x = self.linear2(self.dropout(self.activation(self.linear1(x))))
        tgt = tgt + self.dropout(x)
        return tgt if self.normalize_before else self.norm(tgt)


class MLP(nn.Module):
    """``num_layers`` linear layers with an activation between them (none after the last).

    Args:
        input_dim (int): input channels.
        hidden_dim (int): channels of the hidden layers.
        output_dim (int): output channels.
        num_layers (int): number of linear layers (>= 1).
        activation (str): "relu" (DETR / Mask2Former heads) or "gelu" (CMT-DeepLab).
    """

    def __init__(
        self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int,
        activation: str = "relu",
    ):  # fmt: skip
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.activation = _activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.activation(x)
        return x
