"""Position-sensitive axial attention (Axial-DeepLab, Wang et al. ECCV 2020) and the bottleneck
residual blocks built on one shared plumbing (:class:`BottleneckResidual`): the axial bottleneck
:class:`AxialBlock` and its convolutional twin :class:`ConvBottleneck`. Shared by CMT-DeepLab
(Axial-ResNet backbone and decoder) and ClustSeg (pixel decoder).

Axial-DeepLab Eq. 2 (position-sensitive self-attention restricted to a 1 x m span along one axis):

    y_o = sum_{p in N_{1 x m}(o)} softmax_p(q_o^T k_p + q_o^T r^q_{p-o} + k_p^T r^k_{p-o})
          (v_p + r^v_{p-o})

with learned relative positional terms r^q, r^k (query/key channels) and r^v (value channels),
one table of 2m - 1 offsets per term, shared by the heads. A 2D axial-attention layer applies
this along the height axis and then along the width axis.

Shape shorthand:
    N: batch size, C: channels, H, W: height and width of the feature map
    L: length of the attended axis (H or W), B': N * (length of the other axis)
    G: number of heads, Dq: query/key channels per head, Dv: value channels per head
"""

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import StochasticDepth

from detectron2.layers import Conv2d, get_norm

__all__ = [
    "AxialAttention",
    "AxialAttention2D",
    "AxialBlock",
    "BottleneckResidual",
    "ConvBottleneck",
    "get_activation_module",
    "relative_offset_index",
]

_AXES = {"height": 2, "width": 3}


def relative_offset_index(length: int, span: int, device=None) -> Tensor:
    """Index into a table of ``2 * span - 1`` relative offsets for every (query, key) pair.

    Args:
        length (int): L, number of positions along the axis.
        span (int): m, the attention span; offsets p - o lie in [-(m - 1), m - 1].

    Returns:
        Tensor: (L, L) int64, entry [o, p] = clamp(p - o, -(m-1), m-1) + m - 1. Pairs with
        |p - o| >= m are masked out of the attention, so the clamped value is never used.
    """
    pos = torch.arange(length, device=device)
    offset = pos[None, :] - pos[:, None]  # (L, L): p - o
    return offset.clamp(-(span - 1), span - 1) + (span - 1)


class AxialAttention(nn.Module):
    """Multi-head position-sensitive self-attention along one spatial axis (Axial-DeepLab Eq. 2).

    Projections are 1x1 convolutions (no bias) followed by the norm, as in Axial-DeepLab. With a
    norm, Axial-DeepLab also normalises each of the three similarity terms (per head) and the two
    retrieved outputs (content v and positional r^v) separately before summing them; we do the same
    with BatchNorm when ``norm`` is "BN"/"SyncBN" and skip all normalisation when ``norm`` is "".
    The similarity is additionally scaled by Dq^-0.5 (our choice; with BN it has no effect in
    training mode, without BN it keeps logits in the usual transformer range).

    Attributes (parameter names):
        qkv (Conv1d): input channels -> G * (2 * Dq + Dv).
        relative_q, relative_k (Parameter): (Dq, 2m - 1) positional tables r^q, r^k.
        relative_v (Parameter): (Dv, 2m - 1) positional table r^v.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        axis: str = "height",
        num_heads: int = 8,
        span: int = 65,
        qk_channels: Optional[int] = None,
        norm: str = "BN",
        positional: bool = True,
    ):
        """
        Args:
            in_channels (int): C_in.
            out_channels (int): C_out = G * Dv; must be divisible by ``num_heads``.
            axis (str): "height" or "width", the axis attended along.
            num_heads (int): G.
            span (int): m, keys farther than m - 1 positions from the query are masked out; if the
                axis is shorter than m the attention is global along it.
            qk_channels (int or None): total query/key channels G * Dq; default C_out // 2 (as in
                Axial-DeepLab, which halves query/key channels relative to values).
            norm (str): "BN", "SyncBN" (BatchNorm on the projections, the three similarity terms
                and the two outputs) or "" (none).
            positional (bool): learn r^q, r^k, r^v; if False they are absent (plain axial
                attention).
        """
        super().__init__()
        if axis not in _AXES:
            raise ValueError(f"axis must be one of {sorted(_AXES)}, got {axis!r}")
        qk_channels = out_channels // 2 if qk_channels is None else qk_channels
        if out_channels % num_heads or qk_channels % num_heads:
            raise ValueError(
                f"out_channels ({out_channels}) and qk_channels ({qk_channels}) must be divisible "
                f"by num_heads ({num_heads})"
            )
        if span < 1:
            raise ValueError(f"span must be >= 1, got {span}")
        self.axis = axis
        self.num_heads = num_heads
        self.span = span
        self.dq = qk_channels // num_heads
        self.dv = out_channels // num_heads
        self.out_channels = out_channels
        self.use_norm = norm != ""
        self.qkv = nn.Conv1d(in_channels, 2 * qk_channels + out_channels, 1, bias=False)
        if norm not in ("BN", "SyncBN", ""):
            raise ValueError(f"AxialAttention supports norm 'BN', 'SyncBN' or '', got {norm!r}")
        if self.use_norm:
            self.qkv_norm = nn.BatchNorm1d(2 * qk_channels + out_channels)
            self.similarity_norm = nn.BatchNorm2d(3 * num_heads)
            self.output_norm = nn.BatchNorm1d(2 * out_channels)
        self.positional = positional
        if positional:
            self.relative_q = nn.Parameter(torch.empty(self.dq, 2 * span - 1))
            self.relative_k = nn.Parameter(torch.empty(self.dq, 2 * span - 1))
            self.relative_v = nn.Parameter(torch.empty(self.dv, 2 * span - 1))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.qkv.weight, std=(1.0 / self.qkv.in_channels) ** 0.5)
        if self.positional:
            # Our choice (unstated in the paper): N(0, Dq^-0.5 / Dv^-0.5) relative tables.
            nn.init.normal_(self.relative_q, std=self.dq**-0.5)
            nn.init.normal_(self.relative_k, std=self.dq**-0.5)
            nn.init.normal_(self.relative_v, std=self.dv**-0.5)

    def _to_sequences(self, x: Tensor) -> Tensor:
        # (N, C, H, W) -> (B', C, L)
        n, c, h, w = x.shape
        if self.axis == "height":
            return x.permute(0, 3, 1, 2).reshape(n * w, c, h)  # (N*W, C, H)
        return x.permute(0, 2, 1, 3).reshape(n * h, c, w)  # (N*H, C, W)

    def _from_sequences(self, y: Tensor, n: int, h: int, w: int) -> Tensor:
        c = y.shape[1]
        if self.axis == "height":
            return y.reshape(n, w, c, h).permute(0, 2, 3, 1)  # (N, C, H, W)
        return y.reshape(n, h, c, w).permute(0, 2, 1, 3)  # (N, C, H, W)

    def forward(self, x: Tensor) -> Tensor:
        """
        Args:
            x (Tensor): (N, C_in, H, W).

        Returns:
            Tensor: (N, C_out, H, W); each output pixel attends to the pixels of its own column
            (axis "height") or row (axis "width").
        """
        n, _, h, w = x.shape
        seq = self._to_sequences(x)  # (B', C_in, L)
        bp, _, length = seq.shape
        g, dq, dv = self.num_heads, self.dq, self.dv
        qkv = self.qkv(seq)
        if self.use_norm:
            qkv = self.qkv_norm(qkv)
        q, k, v = torch.split(qkv, [g * dq, g * dq, g * dv], dim=1)
        q = q.reshape(bp, g, dq, length)  # (B', G, Dq, L)
        k = k.reshape(bp, g, dq, length)  # (B', G, Dq, L)
        v = v.reshape(bp, g, dv, length)  # (B', G, Dv, L)

        terms = [torch.einsum("bgdo,bgdp->bgop", q, k)]  # q_o^T k_p: (B', G, L, L)
        if self.positional:
            index = relative_offset_index(length, self.span, x.device)  # (L, L)
            rq = self.relative_q[:, index]  # (Dq, L, L): r^q_{p-o}
            rk = self.relative_k[:, index]  # (Dq, L, L): r^k_{p-o}
            rv = self.relative_v[:, index]  # (Dv, L, L): r^v_{p-o}
            terms.append(torch.einsum("bgdo,dop->bgop", q, rq))  # q_o^T r^q_{p-o}
            terms.append(torch.einsum("bgdp,dop->bgop", k, rk))  # k_p^T r^k_{p-o}
        if self.use_norm:
            while len(terms) < 3:
                terms.append(torch.zeros_like(terms[0]))
            stacked = torch.cat(terms, dim=1)  # (B', 3G, L, L)
            stacked = self.similarity_norm(stacked).reshape(bp, 3, g, length, length)
            logits = stacked.sum(dim=1)  # (B', G, L, L)
        else:
            logits = sum(terms)
        logits = logits * dq**-0.5
        if length > self.span:
            pos = torch.arange(length, device=x.device)
            far = (pos[None, :] - pos[:, None]).abs() >= self.span  # (L, L)
            logits = logits.masked_fill(far, float("-inf"))
        attn = logits.softmax(dim=-1)  # softmax over keys p: (B', G, L, L)

        out = torch.einsum("bgop,bgdp->bgdo", attn, v)  # (B', G, Dv, L)
        if self.positional:
            out_pos = torch.einsum("bgop,dop->bgdo", attn, rv)  # (B', G, Dv, L)
        else:
            out_pos = torch.zeros_like(out)
        if self.use_norm:
            both = torch.cat([out, out_pos], dim=2).reshape(bp, 2 * g * dv, length)
            both = self.output_norm(both).reshape(bp, g, 2, dv, length)
            y = both.sum(dim=2)  # (B', G, Dv, L)
        else:
            y = out + out_pos
        y = y.reshape(bp, g * dv, length)  # (B', C_out, L)
        return self._from_sequences(y, n, h, w)

    def extra_repr(self) -> str:
        return (
            f"axis={self.axis}, heads={self.num_heads}, span={self.span}, dq={self.dq}, "
            f"dv={self.dv}, positional={self.positional}, norm={self.use_norm}"
        )


class AxialAttention2D(nn.Module):
    """Height-axis attention followed by width-axis attention (one 2D axial-attention layer).

    A stride of 2 is applied by 2x2 average pooling after the width attention (Axial-DeepLab).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_heads: int = 8,
        span: int = 65,
        stride: int = 1,
        norm: str = "BN",
        positional: bool = True,
    ):
        """
        Args:
            in_channels (int): C_in.
            out_channels (int): C_out, divisible by ``num_heads``.
            num_heads (int): G, for both axes.
            span (int): m, for both axes.
            stride (int): 1 or 2.
            norm (str): see :class:`AxialAttention`.
            positional (bool): see :class:`AxialAttention`.
        """
        super().__init__()
        kw = dict(num_heads=num_heads, span=span, norm=norm, positional=positional)
        self.height_attention = AxialAttention(in_channels, out_channels, axis="height", **kw)
        self.width_attention = AxialAttention(out_channels, out_channels, axis="width", **kw)
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        """
        Args:
            x (Tensor): (N, C_in, H, W).

        Returns:
            Tensor: (N, C_out, ceil(H / stride), ceil(W / stride)).
        """
        x = self.width_attention(self.height_attention(x))
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride, self.stride, ceil_mode=True)
        return x


def get_activation_module(name: str) -> nn.Module:
    acts = {"gelu": nn.GELU, "relu": nn.ReLU}
    if name not in acts:
        raise ValueError(f"Unknown activation {name!r}; expected one of {sorted(acts)}")
    return acts[name]()


class BottleneckResidual(nn.Module):
    """Plumbing of a ResNet bottleneck residual block around a spatial ``transform``.

    Layout::

        x -> conv1x1(C_in -> C_b) -> norm -> act -> transform (C_b -> C_b, stride) -> act
          -> conv1x1(C_b -> C_out) -> norm -> drop-path -> (+ shortcut(x)) -> act

    A subclass builds ``transform`` (a 3x3 convolution in :class:`ConvBottleneck`, height + width
    axial attention in :class:`AxialBlock`) and implements :meth:`transform`. The shortcut is the
    identity when C_in == C_out and stride == 1; otherwise conv1x1 + norm, either strided
    (``pool_shortcut=False``, the ResNet shortcut) or after a stride x stride average pooling
    (``pool_shortcut=True``, Axial-DeepLab's). With ``zero_init_residual`` the last norm's weight
    starts at zero, so a fresh block is the shortcut followed by the activation.

    Attributes (parameter names): ``conv1``, ``conv3`` (detectron2 Conv2d with norm), ``shortcut``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        bottleneck_channels: int,
        *,
        stride: int = 1,
        norm: str = "BN",
        activation: str = "gelu",
        drop_path: float = 0.0,
        zero_init_residual: bool = True,
        pool_shortcut: bool = False,
    ):
        """
        Args:
            in_channels (int): C_in.
            out_channels (int): C_out.
            bottleneck_channels (int): C_b, the width of ``transform``.
            stride (int): stride of ``transform`` and of the shortcut.
            norm (str): detectron2 ``get_norm`` name of the 1x1 convolutions ("" = none).
            activation (str): "gelu" or "relu" (see :func:`get_activation_module`).
            drop_path (float): stochastic-depth probability of the residual branch.
            zero_init_residual (bool): zero-initialise the last norm's weight.
            pool_shortcut (bool): average-pool then 1x1 conv (True) or strided 1x1 conv (False)
                on a projection shortcut.
        """
        super().__init__()
        self.conv1 = Conv2d(
            in_channels,
            bottleneck_channels,
            1,
            bias=not norm,
            norm=get_norm(norm, bottleneck_channels),
        )
        self.conv3 = Conv2d(
            bottleneck_channels, out_channels, 1, bias=not norm, norm=get_norm(norm, out_channels)
        )
        if in_channels == out_channels and stride == 1:
            self.shortcut = nn.Identity()
        elif pool_shortcut:
            pool = nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity()
            proj = Conv2d(
                in_channels, out_channels, 1, bias=not norm, norm=get_norm(norm, out_channels)
            )
            self.shortcut = nn.Sequential(pool, proj)
        else:
            self.shortcut = Conv2d(
                in_channels,
                out_channels,
                1,
                stride=stride,
                bias=not norm,
                norm=get_norm(norm, out_channels),
            )
        self.act1 = get_activation_module(activation)
        self.act2 = get_activation_module(activation)
        self.act3 = get_activation_module(activation)
        self.drop_path = StochasticDepth(drop_path, mode="row")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        if zero_init_residual and self.conv3.norm is not None:
            nn.init.zeros_(self.conv3.norm.weight)

    def transform(self, y: Tensor) -> Tensor:
        """(N, C_b, H, W) -> (N, C_b, ceil(H / stride), ceil(W / stride)); set by a subclass."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """
        Args:
            x (Tensor): (N, C_in, H, W).

        Returns:
            Tensor: (N, C_out, ceil(H / stride), ceil(W / stride)).
        """
        y = self.act1(self.conv1(x))
        y = self.act2(self.transform(y))
        y = self.drop_path(self.conv3(y))
        return self.act3(y + self.shortcut(x))


class ConvBottleneck(BottleneckResidual):
    """ResNet bottleneck (1x1, 3x3 with stride, 1x1) with a configurable activation and drop-path:
    :class:`BottleneckResidual` with a 3x3 convolution + norm (``conv2``) as the transform, the
    width C_out // 4 and the strided 1x1 projection shortcut."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        norm: str = "BN",
        activation: str = "gelu",
        drop_path: float = 0.0,
    ):
        """
        Args:
            in_channels (int): C_in.
            out_channels (int): C_out; the bottleneck width is C_out // 4.
            stride (int): stride of the 3x3 convolution.
            norm, activation, drop_path: see :class:`BottleneckResidual`.
        """
        width = out_channels // 4
        super().__init__(
            in_channels,
            out_channels,
            width,
            stride=stride,
            norm=norm,
            activation=activation,
            drop_path=drop_path,
        )
        self.conv2 = Conv2d(
            width, width, 3, stride=stride, padding=1, bias=not norm, norm=get_norm(norm, width)
        )

    def transform(self, y: Tensor) -> Tensor:
        return self.conv2(y)


class AxialBlock(BottleneckResidual):
    """Axial bottleneck residual block (Axial-ResNet, Axial-DeepLab Sec. 3.2): the 3x3 convolution
    of a ResNet bottleneck is replaced by a height-axis and a width-axis position-sensitive
    attention layer (``attention``, an :class:`AxialAttention2D`); plumbing of
    :class:`BottleneckResidual` with the average-pooling shortcut.

    Example (ClustSeg pixel decoder at stride 16 with 256 channels)::

        block = AxialBlock(256, 256, num_heads=8, span=65, norm="BN", activation="gelu")
        y = block(x)  # x: (N, 256, H, W) -> y: (N, 256, H, W)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        bottleneck_channels: Optional[int] = None,
        num_heads: int = 8,
        span: int = 65,
        stride: int = 1,
        norm: str = "BN",
        activation: str = "gelu",
        drop_path: float = 0.0,
        positional: bool = True,
        zero_init_residual: bool = True,
    ):
        """
        Args:
            in_channels (int): C_in.
            out_channels (int): C_out.
            bottleneck_channels (int or None): C_b, the attention width; default
                max(C_out // 4, 2 * num_heads) (C_out // 4 as in a ResNet bottleneck). C_b and
                the query/key width C_b // 2 must be divisible by ``num_heads``.
            num_heads (int): G heads of both axial attentions.
            span (int): m, attention span of both axes (global when the axis is shorter).
            stride (int): 1 or 2 (2x2 average pooling after the width attention).
            norm (str): "BN", "SyncBN" or "" for the attention layers; the same name is passed
                to detectron2's ``get_norm`` for the 1x1 convolutions ("" = no norm).
            activation (str): "gelu" (CMT-DeepLab Sec. 3.4 replaces ReLU by GeLU) or "relu".
            drop_path (float): stochastic-depth probability of the residual branch.
            positional (bool): position-sensitive terms r^q, r^k, r^v (Axial-DeepLab Eq. 2).
            zero_init_residual (bool): zero-initialise the last norm's weight.
        """
        bottleneck_channels = bottleneck_channels or max(out_channels // 4, num_heads * 2)
        super().__init__(
            in_channels,
            out_channels,
            bottleneck_channels,
            stride=stride,
            norm=norm,
            activation=activation,
            drop_path=drop_path,
            zero_init_residual=zero_init_residual,
            pool_shortcut=True,
        )
        self.attention = AxialAttention2D(
            bottleneck_channels,
            bottleneck_channels,
            num_heads=num_heads,
            span=span,
            stride=stride,
            norm=norm,
            positional=positional,
        )

    def transform(self, y: Tensor) -> Tensor:
        return self.attention(y)
