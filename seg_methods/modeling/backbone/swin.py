"""Swin Transformer backbone, registered in detectron2's BACKBONE_REGISTRY as ``D2SwinTransformer``.

Paper: Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows",
ICCV 2021. A stage is a sequence of blocks alternating regular (W-MSA) and shifted (SW-MSA) window
attention (paper Eq. 3); attention inside a window adds a learned relative position bias
(paper Eq. 4); stages are joined by 2x2 patch merging.

Checkpoint compatibility: the parameter and buffer names (``patch_embed.proj``,
``layers.{i}.blocks.{j}.attn.qkv``, ``layers.{i}.downsample.reduction``, ``norm{i}``, ...) are the
ones of the Swin backbone in the official Mask2Former release, so its model-zoo checkpoints and
the ImageNet Swin checkpoints converted for it load without renaming. The computation reproduces
that backbone exactly, including its less obvious choices:

- the image is zero-padded on the right/bottom to a multiple of the patch size; token maps are
  zero-padded (after ``norm1``) to a multiple of the window size, and the padded tokens take part
  in the attention like any other token (they are not masked out);
- shifted windows roll the padded map by ``-M // 2`` and block cross-region pairs with an additive
  -100 (not -inf) in the logits;
- patch merging pads odd sizes by one row/column and concatenates the 2x2 neighbours in the order
  (0, 0), (1, 0), (0, 1), (1, 1) (row offset first) before LayerNorm and the linear reduction;
- every stage output is taken *before* that stage's patch merging and normalised by its own
  LayerNorm ``norm{i}``; ``norm0``..``norm3`` always exist, whichever outputs are requested;
- the stochastic-depth rate grows linearly from 0 to DROP_PATH_RATE over all blocks.

Shape shorthand:
    N: batch size
    C: channels at the current stage (C_i = EMBED_DIM * 2**i)
    H, W: size of the token map at the current stage
    M: window size; L = M * M tokens per window
    Hp, Wp: H, W zero-padded up to multiples of M
    nW: windows per image, (Hp / M) * (Wp / M)
    h: attention heads; d = C / h channels per head
"""

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as activation_checkpoint
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, ShapeSpec

__all__ = [
    "D2SwinTransformer",
    "SwinTransformerBlock",
    "WindowAttention",
    "PatchMerging",
    "PatchEmbed",
    "window_partition",
    "window_reverse",
    "relative_position_index",
    "shifted_window_attention_mask",
    "patch_merging_gather",
]

# Additive logit for blocked (cross-region) pairs in shifted windows. The official Swin code uses
# a finite -100 rather than -inf; we keep the same value so outputs match its checkpoints exactly.
_MASKED_LOGIT = -100.0


# --------------------------------------------------------------------------------------------
# Pure tensor helpers
# --------------------------------------------------------------------------------------------
def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Cut a padded token map into non-overlapping square windows.

    Windows are ordered image by image, then row-major over the window grid; tokens inside a
    window are row-major.

    Args:
        x (Tensor): (N, Hp, Wp, C) with Hp and Wp multiples of ``window_size``.
        window_size (int): M.

    Returns:
        Tensor: (N * nW, M, M, C).
    """
    n, hp, wp, c = x.shape
    m = window_size
    x = x.reshape(n, hp // m, m, wp // m, m, c)  # (N, Hp/M, M, Wp/M, M, C)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (N, Hp/M, Wp/M, M, M, C)
    return x.reshape(-1, m, m, c)


def window_reverse(windows: torch.Tensor, window_size: int, hp: int, wp: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`.

    Args:
        windows (Tensor): (N * nW, M, M, C).
        window_size (int): M.
        hp (int): padded height Hp (a multiple of M).
        wp (int): padded width Wp (a multiple of M).

    Returns:
        Tensor: (N, Hp, Wp, C).
    """
    m = window_size
    c = windows.shape[-1]
    x = windows.reshape(-1, hp // m, wp // m, m, m, c)  # (N, Hp/M, Wp/M, M, M, C)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (N, Hp/M, M, Wp/M, M, C)
    return x.reshape(-1, hp, wp, c)


def relative_position_index(window_size: int) -> torch.Tensor:
    """Index into the relative-position-bias table for every (query, key) pair of a window.

    For query token i at (y_i, x_i) and key token j at (y_j, x_j) (row-major inside the window),
    the index is ``(y_i - y_j + M - 1) * (2M - 1) + (x_i - x_j + M - 1)``, so the table holds
    (2M - 1)^2 rows, one per displacement (the bias B of paper Eq. 4).

    Args:
        window_size (int): M.

    Returns:
        Tensor: (L, L) int64.
    """
    m = window_size
    ys = torch.arange(m).repeat_interleave(m)  # (L,) row of each token
    xs = torch.arange(m).repeat(m)  # (L,) column of each token
    dy = ys[:, None] - ys[None, :] + (m - 1)  # (L, L) in [0, 2M-2]
    dx = xs[:, None] - xs[None, :] + (m - 1)  # (L, L)
    return dy * (2 * m - 1) + dx


def _shift_region_labels(size: int, window_size: int, shift: int) -> torch.Tensor:
    """Label each row (or column) of the rolled, padded map by the region it came from.

    After rolling by ``-shift``, the last ``shift`` rows come from the top of the map (wrapped
    around); the rows of the last window row before them are the map's bottom rows. Rows before
    the last window row only ever share windows with each other.

    Returns:
        Tensor: (size,) int64 with values 0, 1 or 2.
    """
    idx = torch.arange(size)
    labels = torch.zeros(size, dtype=torch.long)
    labels[idx >= size - window_size] = 1
    labels[idx >= size - shift] = 2
    return labels


def shifted_window_attention_mask(
    hp: int, wp: int, window_size: int, shift: int, device: Optional[torch.device] = None
) -> torch.Tensor:
    """Additive attention mask for shifted-window attention (SW-MSA) on a rolled map.

    A token pair inside one window may attend to each other only if both tokens come from the
    same region of the un-rolled map (cyclic-shift masking, paper Sec. 3.2); blocked pairs get
    -100, allowed pairs 0.

    Args:
        hp (int): padded height Hp (a multiple of M).
        wp (int): padded width Wp (a multiple of M).
        window_size (int): M.
        shift (int): shift in tokens (M // 2 in Swin).
        device (torch.device): device of the result.

    Returns:
        Tensor: (nW, L, L) float32, windows ordered as in :func:`window_partition`.
    """
    rows = _shift_region_labels(hp, window_size, shift)  # (Hp,)
    cols = _shift_region_labels(wp, window_size, shift)  # (Wp,)
    region = (rows[:, None] * 3 + cols[None, :]).to(torch.float32)  # (Hp, Wp)
    region = window_partition(region[None, :, :, None], window_size)  # (nW, M, M, 1)
    region = region.reshape(-1, window_size * window_size)  # (nW, L)
    different = region[:, :, None] != region[:, None, :]  # (nW, L, L)
    mask = torch.zeros(different.shape, dtype=torch.float32)
    mask[different] = _MASKED_LOGIT
    return mask.to(device) if device is not None else mask


def patch_merging_gather(x: torch.Tensor) -> torch.Tensor:
    """Stack each 2x2 neighbourhood of a token map along channels (zero-padding odd sizes).

    The order of the four neighbours is (row, col) offsets (0, 0), (1, 0), (0, 1), (1, 1), which
    is what the official Swin checkpoints' ``downsample.reduction`` weights expect.

    Args:
        x (Tensor): (N, H, W, C).

    Returns:
        Tensor: (N, ceil(H / 2), ceil(W / 2), 4C).
    """
    h, w = x.shape[1], x.shape[2]
    if h % 2 or w % 2:
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
    parts = [x[:, dy::2, dx::2, :] for dy, dx in ((0, 0), (1, 0), (0, 1), (1, 1))]
    return torch.cat(parts, dim=-1)


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole residual branches per sample, rescale the kept ones.

    Args:
        x (Tensor): (N, ...) residual branch output.
        drop_prob (float): probability of dropping the branch of a sample.
        training (bool): identity when False.

    Returns:
        Tensor: same shape as ``x``.
    """
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    mask = x.new_empty(shape).bernoulli_(keep)
    return x * mask / keep


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------
class DropPath(nn.Module):
    """Module wrapper of :func:`drop_path` (stochastic depth, Huang et al. 2016)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class SwinMlp(nn.Module):
    """Two-layer MLP with GELU of a Swin block (``mlp.fc1``, ``mlp.fc2``)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a relative position bias (paper Eq. 4).

    ``Attention(Q, K, V) = SoftMax(Q K^T / sqrt(d) + B) V``, where B is looked up from the
    learned table ``relative_position_bias_table`` ((2M-1)^2, h) through the persistent buffer
    ``relative_position_index`` (L, L).
    """

    def __init__(
        self,
        dim: int,
        window_size: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        """
        Args:
            dim (int): channels C.
            window_size (int): M.
            num_heads (int): h; must divide C.
            qkv_bias (bool): learnable bias in the query/key/value projection.
            qk_scale (float or None): logit scale; None means d ** -0.5.
            attn_drop (float): dropout on the attention weights.
            proj_drop (float): dropout on the output projection.
        """
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5

        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> torch.Tensor:
        """The bias B of paper Eq. 4.

        Returns:
            Tensor: (h, L, L).
        """
        n_tok = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.reshape(n_tok, n_tok, self.num_heads).permute(2, 0, 1)  # (h, L, L)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            x (Tensor): (N * nW, L, C) tokens of each window.
            mask (Tensor or None): (nW, L, L) additive mask (0 or -100), for shifted windows.

        Returns:
            Tensor: (N * nW, L, C).
        """
        b, n_tok, c = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(b, n_tok, 3, h, c // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each (N * nW, h, L, d)

        logits = (q * self.scale) @ k.transpose(-2, -1)  # (N * nW, h, L, L)
        logits = logits + self.relative_position_bias().unsqueeze(0)
        if mask is not None:
            n_win = mask.shape[0]
            logits = logits.reshape(b // n_win, n_win, h, n_tok, n_tok)
            logits = (logits + mask[None, :, None]).reshape(b, h, n_tok, n_tok)
        attn = self.attn_drop(logits.softmax(dim=-1))

        out = (attn @ v).transpose(1, 2).reshape(b, n_tok, c)  # (N * nW, L, C)
        return self.proj_drop(self.proj(out))


class SwinTransformerBlock(nn.Module):
    """One Swin block: (shifted) window attention then MLP, each pre-norm with a residual.

    Implements one line pair of paper Eq. 3:
    ``z' = (S)W-MSA(LN(z)) + z``, ``z'' = MLP(LN(z')) + z'``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        shift_size: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        """
        Args:
            dim (int): channels C.
            num_heads (int): h.
            window_size (int): M.
            shift_size (int): cyclic shift in tokens; 0 for W-MSA, M // 2 for SW-MSA.
            mlp_ratio (float): MLP hidden width / C.
            qkv_bias (bool): see :class:`WindowAttention`.
            qk_scale (float or None): see :class:`WindowAttention`.
            drop (float): dropout after the attention projection and in the MLP.
            attn_drop (float): dropout on attention weights.
            drop_path (float): stochastic-depth probability of this block.
        """
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size {shift_size} must be in [0, {window_size})")
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(
            dim,
            window_size=window_size,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            attn_drop=attn_drop,
            proj_drop=drop,
        )
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = SwinMlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(
        self, x: torch.Tensor, height: int, width: int, attn_mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """
        Args:
            x (Tensor): (N, H * W, C) tokens, row-major.
            height (int): H.
            width (int): W.
            attn_mask (Tensor or None): (nW, L, L) mask of
                :func:`shifted_window_attention_mask`; used only when this block is shifted.

        Returns:
            Tensor: (N, H * W, C).
        """
        n, num_tokens, c = x.shape
        if num_tokens != height * width:
            raise ValueError(f"got {num_tokens} tokens for a {height}x{width} map")
        m, s = self.window_size, self.shift_size

        shortcut = x
        x = self.norm1(x).reshape(n, height, width, c)
        pad_b, pad_r = (-height) % m, (-width) % m
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))  # (N, Hp, Wp, C); padded tokens are zeros
        hp, wp = height + pad_b, width + pad_r

        if s > 0:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        windows = window_partition(x, m).reshape(-1, m * m, c)  # (N * nW, L, C)
        windows = self.attn(windows, mask=attn_mask if s > 0 else None)
        x = window_reverse(windows.reshape(-1, m, m, c), m, hp, wp)  # (N, Hp, Wp, C)
        if s > 0:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        x = x[:, :height, :width, :].reshape(n, height * width, c)

        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 patch merging between stages: (N, H*W, C) -> (N, ceil(H/2)*ceil(W/2), 2C)."""

    def __init__(self, dim: int):
        """
        Args:
            dim (int): input channels C.
        """
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """
        Args:
            x (Tensor): (N, H * W, C).
            height (int): H.
            width (int): W.

        Returns:
            Tensor: (N, ceil(H/2) * ceil(W/2), 2C).
        """
        n, _, c = x.shape
        x = patch_merging_gather(x.reshape(n, height, width, c))  # (N, H/2, W/2, 4C)
        x = x.reshape(n, -1, 4 * c)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """A stage: ``depth`` blocks alternating W-MSA / SW-MSA, then optional patch merging."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: Optional[float],
        drop: float,
        attn_drop: float,
        drop_path: Sequence[float],
        downsample: bool,
        use_checkpoint: bool,
    ):
        """
        Args:
            dim (int): channels C of this stage.
            depth (int): number of blocks.
            num_heads (int): h.
            window_size (int): M.
            mlp_ratio (float): MLP hidden width / C.
            qkv_bias (bool): see :class:`WindowAttention`.
            qk_scale (float or None): see :class:`WindowAttention`.
            drop (float): dropout rate.
            attn_drop (float): attention dropout rate.
            drop_path (list[float]): stochastic-depth probability of each block.
            downsample (bool): end the stage with :class:`PatchMerging`.
            use_checkpoint (bool): recompute blocks in backward (activation checkpointing).
        """
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            [
                SwinTransformerBlock(
                    dim,
                    num_heads,
                    window_size=window_size,
                    shift_size=0 if i % 2 == 0 else window_size // 2,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    drop=drop,
                    attn_drop=attn_drop,
                    drop_path=drop_path[i],
                )
                for i in range(depth)
            ]
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(
        self, x: torch.Tensor, height: int, width: int
    ) -> Tuple[torch.Tensor, torch.Tensor, int, int]:
        """
        Args:
            x (Tensor): (N, H * W, C).
            height (int): H.
            width (int): W.

        Returns:
            tuple: the stage output before merging (N, H * W, C), the input of the next stage
            (N, H' * W', C') and its size H', W' (the same tensor and size without merging).
        """
        m = self.window_size
        mask = shifted_window_attention_mask(
            height + (-height) % m, width + (-width) % m, m, self.shift_size, device=x.device
        ).to(x.dtype)
        for blk in self.blocks:
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                x = activation_checkpoint.checkpoint(
                    blk, x, height, width, mask, use_reentrant=False
                )
            else:
                x = blk(x, height, width, mask)
        if self.downsample is None:
            return x, x, height, width
        return x, self.downsample(x, height, width), (height + 1) // 2, (width + 1) // 2


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding by a strided conv, with optional LayerNorm."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm: bool):
        """
        Args:
            patch_size (int): P; the conv has kernel and stride P.
            in_chans (int): input channels.
            embed_dim (int): output channels C.
            norm (bool): LayerNorm over channels after the projection.
        """
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (Tensor): (N, 3, H_img, W_img); zero-padded right/bottom to multiples of P.

        Returns:
            Tensor: (N, C, ceil(H_img / P), ceil(W_img / P)).
        """
        p = self.patch_size
        x = F.pad(x, (0, (-x.shape[-1]) % p, 0, (-x.shape[-2]) % p))
        x = self.proj(x)
        if self.norm is not None:
            x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x


@BACKBONE_REGISTRY.register()
class D2SwinTransformer(Backbone):
    """Swin Transformer as a detectron2 backbone with outputs res2..res5 (strides 4..32)."""

    @configurable
    def __init__(
        self,
        *,
        in_chans: int = 3,
        pretrain_img_size: int = 224,
        patch_size: int = 4,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.3,
        ape: bool = False,
        patch_norm: bool = True,
        out_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
        use_checkpoint: bool = False,
    ):
        """
        Args:
            in_chans (int): input image channels.
            pretrain_img_size (int): image size of the pre-training; sets the size of the
                absolute position embedding (only with ``ape``).
            patch_size (int): patch size P of the patch embedding.
            embed_dim (int): channels C of the first stage; stage i has C * 2**i.
            depths (list[int]): blocks per stage.
            num_heads (list[int]): attention heads per stage.
            window_size (int): M.
            mlp_ratio (float): MLP hidden width / channels.
            qkv_bias (bool): learnable bias in the q/k/v projections.
            qk_scale (float or None): logit scale override; None means d ** -0.5.
            drop_rate (float): dropout after the patch embedding, attention projection and MLP.
            attn_drop_rate (float): dropout on attention weights.
            drop_path_rate (float): stochastic depth of the last block (linear from 0).
            ape (bool): add a learned absolute position embedding, bicubically resized.
            patch_norm (bool): LayerNorm after the patch embedding.
            out_features (list[str]): subset of ``res2``..``res{len(depths)+1}`` to return.
            use_checkpoint (bool): activation checkpointing of every block while training.
        """
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {list(depths)} and num_heads {list(num_heads)} differ")
        num_stages = len(depths)
        self.num_features = [int(embed_dim * 2**i) for i in range(num_stages)]
        names = [f"res{i + 2}" for i in range(num_stages)]
        unknown = [f for f in out_features if f not in names]
        if unknown:
            raise ValueError(f"unknown Swin out_features {unknown}; available: {names}")
        self._out_features = list(out_features)
        self._out_feature_strides = {n: patch_size * 2**i for i, n in enumerate(names)}
        self._out_feature_channels = dict(zip(names, self.num_features))

        self.ape = ape
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm=patch_norm)
        if ape:
            grid = pretrain_img_size // patch_size
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, grid, grid))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(p=drop_rate)

        # Stochastic depth decays linearly over all blocks of all stages.
        # (Computed on the CPU in float32 even when built under a device context such as meta.)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        for i in range(num_stages):
            start = sum(depths[:i])
            self.layers.append(
                SwinStage(
                    dim=self.num_features[i],
                    depth=depths[i],
                    num_heads=num_heads[i],
                    window_size=window_size,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[start : start + depths[i]],
                    downsample=i < num_stages - 1,
                    use_checkpoint=use_checkpoint,
                )
            )
        # One output LayerNorm per stage, present for every stage (checkpoint key set).
        for i, ch in enumerate(self.num_features):
            self.add_module(f"norm{i}", nn.LayerNorm(ch))
        # Linear and LayerNorm layers keep PyTorch's default initialisation, as in the official
        # Mask2Former backbone (its weight-init helper is never applied); in practice the weights
        # come from an ImageNet checkpoint.

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        s = cfg.MODEL.SWIN
        return {
            "in_chans": input_shape.channels,
            "pretrain_img_size": s.PRETRAIN_IMG_SIZE,
            "patch_size": s.PATCH_SIZE,
            "embed_dim": s.EMBED_DIM,
            "depths": list(s.DEPTHS),
            "num_heads": list(s.NUM_HEADS),
            "window_size": s.WINDOW_SIZE,
            "mlp_ratio": s.MLP_RATIO,
            "qkv_bias": s.QKV_BIAS,
            "qk_scale": s.QK_SCALE,
            "drop_rate": s.DROP_RATE,
            "attn_drop_rate": s.ATTN_DROP_RATE,
            "drop_path_rate": s.DROP_PATH_RATE,
            "ape": s.APE,
            "patch_norm": s.PATCH_NORM,
            "out_features": list(s.OUT_FEATURES),
            "use_checkpoint": s.USE_CHECKPOINT,
        }

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x (Tensor): (N, C_in, H_img, W_img). Any size works (padded internally); sizes that
                are multiples of ``size_divisibility`` avoid padding.

        Returns:
            dict[str, Tensor]: for each requested ``res{i+2}``, (N, C_i, H_i, W_i) with
            H_0 = ceil(H_img / P) and H_{i+1} = ceil(H_i / 2).
        """
        if x.dim() != 4:
            raise ValueError(f"D2SwinTransformer expects (N, C, H, W) input, got {tuple(x.shape)}")
        x = self.patch_embed(x)  # (N, C, H, W)
        height, width = x.shape[-2:]
        if self.ape:
            pos = F.interpolate(self.absolute_pos_embed, size=(height, width), mode="bicubic")
            x = x + pos
        x = self.pos_drop(x.flatten(2).transpose(1, 2))  # (N, H * W, C)

        outputs = {}
        for i, stage in enumerate(self.layers):
            out, x, next_h, next_w = stage(x, height, width)
            name = f"res{i + 2}"
            if name in self._out_features:
                out = getattr(self, f"norm{i}")(out)  # (N, H * W, C_i)
                outputs[name] = (
                    out.reshape(-1, height, width, self.num_features[i])
                    .permute(0, 3, 1, 2)
                    .contiguous()
                )
            height, width = next_h, next_w
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }

    @property
    def size_divisibility(self) -> int:
        return 32
