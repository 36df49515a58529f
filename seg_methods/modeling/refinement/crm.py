"""CRM's network: a low-resolution encoder and an implicit decoder queried at continuous points.

Shen et al., "High Quality Segmentation for Ultra High-resolution Images" (CVPR 2022; official
code dvlab-research/Entity, folder ``High-Quality-Segmention``, read for understanding and
re-written here). The paper text available to us is a summary without equations, so the pieces
are named by the official functions they re-implement:

* encoder (official ``models/network/extractors.py::ResNet`` + ``aspp.py::ASPP_no4level``): any
  detectron2 backbone on the 4-channel input [normalised image, coarse mask in [-1, 1]] (our
  configs: timm ResNet-50, ``in_chans=4, output_stride=8``, features after the stem ReLU (stride
  2), layer1 (stride 4) and the dilated layer3 (stride 8), exactly the official extractor's three
  outputs), then :class:`CRMFusion`: a 1x1 conv branch per level (64, 64, 128 channels), all
  upsampled to the stride-2 map and fused by a 3x3 conv to 256 channels: the latent codes z.
* :class:`ImplicitDecoder` (official ``crm.py::CRMNet.forward`` after the ASPP; LIIF lineage): the
  prediction at a continuous query point x (normalised (row, col) in [-1, 1]) is
  ``sum_t S_t / S * f([z_t, (x - v_t) * (h, w), x, cell * (h, w)])`` over the 4 latent codes
  z_t nearest to x (centres v_t), each weighted by the area S_t of the rectangle between x and
  the diagonally opposite neighbour (local ensemble, S = sum of the 4 areas); f is an MLP
  (hidden 32, 32, 32, 32). The absolute coordinate x in f's input is what the official code adds
  to LIIF's decoder; we read it as the paper's continuous alignment (CAM: the feature map is
  aligned with the refinement target at any continuous position), see projects/CRM/README.md.
* :func:`cascade_refine` (official ``test.py``): multi-resolution inference at scales 0.125,
  0.25, 0.5, 1 (paper Table 5); each scale re-encodes the image resized to that scale with the
  previous scale's output as the coarse mask, fed as ``(prob - 0.5) * 2``, and queries the
  decoder at every output pixel in chunks (the latent codes are computed once per scale).

Two reformulations (each exact up to float rounding): the first MLP layer is linear in its
input, so its feature part ``W_z z`` is applied to the latent map once (a 1x1 conv) before the
nearest gather, instead of to each gathered copy (every query then gathers 32 numbers instead of
256); and at inference a large latent map is fused in row strips
(:meth:`CRMFusion.forward_tiled`), so that the 256-channel map never exists whole.

Shape shorthand:
    B: batch, H, W: input (padded) size, h, w: latent map size, Q: queries, D: latent channels,
    H1: first hidden width of the MLP
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import get_norm
from torch import nn

__all__ = [
    "CRMFusion",
    "CRMNet",
    "ImplicitDecoder",
    "axis_coords",
    "cascade_refine",
    "ensemble_weights",
    "make_coord",
    "query_chunked",
    "query_grid",
]

# Offsets of the 4 nearest latent codes (row, col), in the official loop order (row outer).
_NEIGHBOURS = ((-1, -1), (-1, 1), (1, -1), (1, 1))
_EPS_SHIFT = 1e-6  # official: shifts the query off latent-cell borders (ties of the nearest gather)
_AREA_EPS = 1e-9  # official: keeps the ensemble weights defined when a query sits on a centre


def _coord_seq(n: int, device=None) -> torch.Tensor:
    """Centres of n cells covering [-1, 1]: ``-1 + (2 i + 1) / n``, float32 (n,).

    Written as the official ``make_coord`` evaluates it (``(2 r) * i + (-1 + r)``, r = 1 / n) so
    that our coordinates are bit-identical to the official ones.
    """
    r = 1.0 / n
    return (2 * r) * torch.arange(n, device=device, dtype=torch.float32) + (-1 + r)


def make_coord(shape: Sequence[int], device=None, flatten: bool = False) -> torch.Tensor:
    """Pixel-centre coordinates of a grid, normalised to [-1, 1], as (row, col).

    Args:
        shape (tuple[int, int]): (h, w).
        device: torch device.
        flatten (bool): return (h * w, 2) instead of (h, w, 2).

    Returns:
        Tensor: (h, w, 2) or (h * w, 2) float32; ``[..., 0]`` is the row, ``[..., 1]`` the column.
    """
    rows, cols = _coord_seq(int(shape[0]), device), _coord_seq(int(shape[1]), device)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1)
    return grid.reshape(-1, 2) if flatten else grid


def axis_coords(n_in: int, pad: int, n_out: int, device=None) -> Tuple[torch.Tensor, int, float]:
    """Query coordinates along one axis of an input padded by ``pad`` pixels on both sides.

    The output has ``n_out`` pixels over the unpadded input (``n_in`` pixels), plus ``p_out``
    pixels of the same spacing over each padded border (``p_out = pad`` when ``n_out == n_in``,
    else ``ceil(pad * n_out / n_in)``), so that the cascade can feed its output back as the next
    coarse mask over the whole padded frame. Coordinates are normalised over the padded input
    ([-1, 1] = its outer edges). With ``n_out == n_in`` they are exactly the official
    ``make_coord`` of the padded input.

    Args:
        n_in (int): input pixels along the axis (unpadded).
        pad (int): padding of the input on each side (pixels).
        n_out (int): output pixels along the axis (unpadded).

    Returns:
        tuple: (coords (n_out + 2 p_out,) float32, p_out, cell size in normalised units).
    """
    n_pad = n_in + 2 * pad
    if n_out == n_in:
        return _coord_seq(n_pad, device), pad, 2.0 / n_pad
    p_out = math.ceil(pad * n_out / n_in) if pad > 0 else 0
    step = n_in / n_out  # input pixels per output pixel
    k = torch.arange(-p_out, n_out + p_out, device=device, dtype=torch.float64)
    centres = (k + 0.5) * step + pad  # in padded input pixels
    return (2.0 * centres / n_pad - 1.0).to(torch.float32), p_out, 2.0 * step / n_pad


def query_grid(
    input_size: Tuple[int, int], output_size: Optional[Tuple[int, int]] = None, pad: int = 0
) -> Tuple[torch.Tensor, torch.Tensor, Tuple[int, int]]:
    """All query points of an output grid (see :func:`axis_coords`), materialised.

    Args:
        input_size (tuple[int, int]): (H, W) of the unpadded input.
        output_size (tuple[int, int] or None): (oh, ow); None: the input size.
        pad (int): input padding on each side.

    Returns:
        tuple: coords (Qh * Qw, 2) and cells (Qh * Qw, 2) float32 (row, col), and the output
        padding (p_row, p_col); Qh = oh + 2 p_row, Qw = ow + 2 p_col.
    """
    oh, ow = output_size if output_size is not None else input_size
    rows, pr, cell_r = axis_coords(int(input_size[0]), pad, int(oh))
    cols, pc, cell_c = axis_coords(int(input_size[1]), pad, int(ow))
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)
    cell = torch.tensor([cell_r, cell_c], dtype=torch.float32).expand_as(grid).contiguous()
    return grid, cell, (pr, pc)


def ensemble_weights(rel_coords: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Local-ensemble weights of the 4 nearest latent codes (official ``CRMNet.forward``).

    Each code's weight is the area of the rectangle between the query and the diagonally
    opposite code, normalised by the sum of the 4 areas; the areas get +1e-9 (official) so a
    query exactly on a latent centre keeps defined weights.

    Args:
        rel_coords (list[Tensor]): 4 tensors (..., 2), the query minus each code's centre in
            latent-cell units, in the order of ``_NEIGHBOURS`` ((-1,-1), (-1,1), (1,-1), (1,1)).

    Returns:
        list[Tensor]: 4 weights (...), summing to 1.
    """
    areas = [torch.abs(r[..., 0] * r[..., 1]) + _AREA_EPS for r in rel_coords]
    total = torch.stack(areas).sum(dim=0)
    # diagonally opposite: (-1,-1) <-> (1,1) and (-1,1) <-> (1,-1)
    return [areas[3 - t] / total for t in range(4)]


class _MLP(nn.Module):
    """Linear + ReLU layers (official ``MLP``); ``layers`` holds them, in the official order."""

    def __init__(self, in_dim: int, out_dim: int, hidden: Sequence[int]):
        super().__init__()
        layers: List[nn.Module] = []
        last = in_dim
        for width in hidden:
            layers += [nn.Linear(last, width), nn.ReLU()]
            last = width
        layers.append(nn.Linear(last, out_dim))
        self.layers = nn.Sequential(*layers)


class ImplicitDecoder(nn.Module):
    """Continuous decoder: latent map + query points -> logits (see the module docstring).

    Args:
        in_channels (int): D, channels of the latent map.
        hidden_dims (list[int]): MLP hidden widths (official: 32, 32, 32, 32).
        abs_coord (bool): feed the absolute query coordinate to the MLP (official; CAM).
        cell_decode (bool): feed the query's cell size (times (h, w)) to the MLP (official).
        local_ensemble (bool): blend the 4 nearest codes by opposite areas (official); False: the
            single nearest code, no shift (LIIF's switch).

    The MLP's first layer takes ``[z (D), rel (2), x (2, if abs_coord), cell (2, if
    cell_decode)]``, the official order (so official weights load without permutation).
    """

    def __init__(
        self,
        in_channels: int,
        hidden_dims: Sequence[int] = (32, 32, 32, 32),
        *,
        abs_coord: bool = True,
        cell_decode: bool = True,
        local_ensemble: bool = True,
    ):
        super().__init__()
        if not hidden_dims:
            raise ValueError("MODEL.CRM.MLP_HIDDEN_DIMS must name at least one hidden layer")
        self.in_channels = int(in_channels)
        self.abs_coord = abs_coord
        self.cell_decode = cell_decode
        self.local_ensemble = local_ensemble
        in_dim = self.in_channels + 2 + (2 if abs_coord else 0) + (2 if cell_decode else 0)
        self.mlp = _MLP(in_dim, 1, list(hidden_dims))

    def prepare(self, feat: torch.Tensor) -> torch.Tensor:
        """Latent table, computed once per image/scale and reused by every query chunk.

        Args:
            feat (Tensor): (B, D, h, w) latent codes.

        Returns:
            Tensor: (B, H1 + 2, h, w): the first MLP layer's feature part ``W_z z`` (H1
            channels) and each code's centre (row, col) (2 channels).
        """
        return self.with_centres(self.project(feat))

    def project(self, feat: torch.Tensor) -> torch.Tensor:
        """The first MLP layer's feature part ``W_z z``: (B, D, h, w) -> (B, H1, h, w)."""
        if feat.shape[1] != self.in_channels:
            raise ValueError(
                f"ImplicitDecoder expects {self.in_channels} latent channels, got "
                f"{tuple(feat.shape)}"
            )
        w_z = self.mlp.layers[0].weight[:, : self.in_channels]
        return F.conv2d(feat, w_z[:, :, None, None])

    @staticmethod
    def with_centres(proj: torch.Tensor) -> torch.Tensor:
        """(B, H1, h, w) -> (B, H1 + 2, h, w): append each code's centre (row, col)."""
        centres = make_coord(proj.shape[-2:], device=proj.device).permute(2, 0, 1)
        centres = centres.to(proj.dtype).unsqueeze(0).expand(proj.shape[0], 2, *proj.shape[-2:])
        return torch.cat([proj, centres], dim=1)

    def query(
        self, latent: torch.Tensor, coord: torch.Tensor, cell: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Decode query points.

        Args:
            latent (Tensor): (B, H1 + 2, h, w) from :meth:`prepare`.
            coord (Tensor): (B, Q, 2) normalised (row, col) query points in [-1, 1].
            cell (Tensor or None): (B, Q, 2) query cell sizes (normalised units); required when
                ``cell_decode``.

        Returns:
            Tensor: (B, Q) logits.
        """
        h, w = latent.shape[-2:]
        first = self.mlp.layers[0]
        d = self.in_channels
        n_hidden = first.weight.shape[0]
        scale = coord.new_tensor([float(h), float(w)])
        # The query-only terms of the first layer (bias, absolute coordinate, cell), shared by
        # the 4 neighbours.
        shared = first.bias
        col = d + 2
        if self.abs_coord:
            shared = shared + coord @ first.weight[:, col : col + 2].t()
            col += 2
        if self.cell_decode:
            if cell is None:
                raise ValueError("ImplicitDecoder(cell_decode=True) needs the query cells")
            shared = shared + (cell * scale) @ first.weight[:, col : col + 2].t()
        w_rel = first.weight[:, d : d + 2]

        if self.local_ensemble:
            offsets, eps = _NEIGHBOURS, _EPS_SHIFT
        else:
            offsets, eps = ((0, 0),), 0.0
        rx, ry = 1.0 / h, 1.0 / w  # half a latent cell (official: 2 / h / 2)
        preds, rels = [], []
        for vx, vy in offsets:
            shifted = coord + coord.new_tensor([vx * rx + eps, vy * ry + eps])
            shifted = shifted.clamp(-1 + 1e-6, 1 - 1e-6)
            # grid_sample takes (x, y) = (col, row): flip; nearest, align_corners=False (official)
            picked = F.grid_sample(
                latent, shifted.flip(-1).unsqueeze(1), mode="nearest", align_corners=False
            )[:, :, 0, :].permute(
                0, 2, 1
            )  # (B, Q, H1 + 2)
            rel = (coord - picked[..., n_hidden:]) * scale
            hidden = torch.relu(shared + picked[..., :n_hidden] + rel @ w_rel.t())
            preds.append(self.mlp.layers[2:](hidden)[..., 0])
            rels.append(rel)
        if not self.local_ensemble:
            return preds[0]
        weights = ensemble_weights(rels)
        out = preds[0] * weights[0]
        for pred, weight in zip(preds[1:], weights[1:]):
            out = out + pred * weight
        return out

    def forward(
        self, feat: torch.Tensor, coord: torch.Tensor, cell: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """(B, D, h, w) latent codes, (B, Q, 2) points and cells -> (B, Q) logits."""
        return self.query(self.prepare(feat), coord, cell)


class _FusionBranch(nn.Module):
    """1x1 conv, norm, ReLU, norm, ReLU, dropout (official ``_ASPPModule`` + ``bn1_*``)."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, dropout: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.norm1 = get_norm(norm, out_channels) or nn.Identity()
        self.norm2 = get_norm(norm, out_channels) or nn.Identity()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm1(self.conv(x)))
        return self.dropout(torch.relu(self.norm2(x)))


class CRMFusion(nn.Module):
    """Fuse multi-level features into the latent map (official ``ASPP_no4level``).

    Every level goes through a 1x1 conv branch; the branches are upsampled (bilinear,
    align_corners=True, as the official code) to the first level's size, concatenated and fused by
    a 3x3 conv + norm + ReLU + dropout.

    Args:
        in_channels (list[int]): channels of the levels, finest first.
        branch_channels (list[int]): output channels of each branch (official: 64, 64, 128).
        out_channels (int): D (official: 256).
        norm (str): detectron2 norm name ("BN", "SyncBN", "" for none).
        dropout (float): dropout of the branches and the fusion (official: 0.5).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        branch_channels: Sequence[int] = (64, 64, 128),
        out_channels: int = 256,
        *,
        norm: str = "BN",
        dropout: float = 0.5,
    ):
        super().__init__()
        if len(in_channels) != len(branch_channels):
            raise ValueError(
                f"MODEL.CRM.IN_FEATURES gives {len(in_channels)} levels but "
                f"MODEL.CRM.BRANCH_CHANNELS has {len(branch_channels)} entries"
            )
        self.branches = nn.ModuleList(
            _FusionBranch(c_in, c_out, norm, dropout)
            for c_in, c_out in zip(in_channels, branch_channels)
        )
        fused = int(sum(branch_channels))
        self.project = nn.Sequential(
            nn.Conv2d(fused, out_channels, kernel_size=3, padding=1, bias=False),
            get_norm(norm, out_channels) or nn.Identity(),
            nn.ReLU(),
            nn.Dropout(dropout),
        )
        self.out_channels = int(out_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)  # official _init_weight

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            features (list[Tensor]): (B, C_i, h_i, w_i), finest first.

        Returns:
            Tensor: (B, D, h_0, w_0) latent codes.
        """
        size = features[0].shape[-2:]
        outs = []
        for i, (branch, x) in enumerate(zip(self.branches, features)):
            y = branch(x)
            if i > 0:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=True)
            outs.append(y)
        return self.project(torch.cat(outs, dim=1))

    def forward_tiled(
        self, features: Sequence[torch.Tensor], tile_rows: int, post: nn.Module
    ) -> torch.Tensor:
        """``post(forward(features))`` computed in strips of ``tile_rows`` output rows.

        Inference only (eval mode: BatchNorm uses running statistics and dropout is off, so every
        step after the branches is local): the branches run at their own resolution, and each
        strip upsamples only the rows it needs (bilinear, align_corners=True, as
        :meth:`forward`), concatenates them with a 1-row halo for the 3x3 conv and applies
        ``post`` (e.g. :meth:`ImplicitDecoder.project`). The full-resolution concatenation and
        fused map never exist at once; equal to the untiled path up to float rounding.

        Args:
            features (list[Tensor]): (B, C_i, h_i, w_i), finest first.
            tile_rows (int): output rows per strip.
            post (callable): (B, D, rows, w_0) -> (B, K, rows, w_0).

        Returns:
            Tensor: (B, K, h_0, w_0).
        """
        if self.training:
            raise RuntimeError("CRMFusion.forward_tiled is for inference (eval mode) only")
        h0, w0 = features[0].shape[-2:]
        branches = [branch(x) for branch, x in zip(self.branches, features)]
        conv, rest = self.project[0], self.project[1:]
        out = None
        for r0 in range(0, h0, tile_rows):
            r1 = min(h0, r0 + tile_rows)
            a, b = max(r0 - 1, 0), min(r1 + 1, h0)
            parts = [branches[0][:, :, a:b]]
            for y in branches[1:]:
                parts.append(_upsample_rows(y, a, b, h0, w0))
            x = torch.cat(parts, dim=1)
            x = F.pad(x, (0, 0, int(a == r0), int(b == r1)))  # zero rows at the map's border
            x = F.conv2d(x, conv.weight, conv.bias, padding=(0, 1))
            strip = post(rest(x))
            if out is None:
                out = strip.new_empty(strip.shape[0], strip.shape[1], h0, w0)
            out[:, :, r0:r1] = strip
        return out


def _upsample_rows(y: torch.Tensor, a: int, b: int, h_out: int, w_out: int) -> torch.Tensor:
    """Rows [a, b) of ``F.interpolate(y, (h_out, w_out), bilinear, align_corners=True)``."""
    h_in = y.shape[-2]
    scale = (h_in - 1) / (h_out - 1) if h_out > 1 else 0.0
    src = torch.arange(a, b, device=y.device, dtype=torch.float32) * scale
    top = src.floor().long().clamp(max=h_in - 1)
    bottom = (top + 1).clamp(max=h_in - 1)
    frac = (src - top.to(src.dtype)).view(1, 1, -1, 1)
    rows = y[:, :, top] * (1 - frac) + y[:, :, bottom] * frac
    # same row count: align_corners=True maps every row onto itself, only the width is resampled
    return F.interpolate(rows, size=(b - a, w_out), mode="bilinear", align_corners=True)


class CRMNet(nn.Module):
    """Encoder (backbone + :class:`CRMFusion`) and :class:`ImplicitDecoder`.

    Args:
        backbone (nn.Module): detectron2 Backbone taking (B, 4, H, W) -> dict of features.
        in_features (list[str]): backbone outputs fused, finest first.
        fusion (CRMFusion): the fusion.
        decoder (ImplicitDecoder): the decoder.
        fusion_tile_rows (int): at inference, latent maps with more rows than this are fused in
            strips of this many rows (:meth:`CRMFusion.forward_tiled`; bounds the encoder's
            memory on large inputs); 0: never.
    """

    def __init__(
        self,
        backbone: nn.Module,
        in_features: Sequence[str],
        fusion: CRMFusion,
        decoder: ImplicitDecoder,
        fusion_tile_rows: int = 0,
    ):
        super().__init__()
        self.backbone = backbone
        self.in_features = list(in_features)
        self.fusion = fusion
        self.decoder = decoder
        self.fusion_tile_rows = int(fusion_tile_rows)

    def encode(self, image: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        """Latent table of a batch.

        Args:
            image (Tensor): (B, 3, H, W) normalised image.
            seg (Tensor): (B, 1, H, W) coarse mask in [-1, 1] ((prob - 0.5) * 2).

        Returns:
            Tensor: (B, H1 + 2, h, w), see :meth:`ImplicitDecoder.prepare`.
        """
        features: Dict[str, torch.Tensor] = self.backbone(torch.cat([image, seg], dim=1))
        levels = [features[k] for k in self.in_features]
        tile = self.fusion_tile_rows
        if not self.training and tile > 0 and levels[0].shape[-2] > tile:
            return self.decoder.with_centres(
                self.fusion.forward_tiled(levels, tile, self.decoder.project)
            )
        return self.decoder.prepare(self.fusion(levels))

    def query(
        self, latent: torch.Tensor, coord: torch.Tensor, cell: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """(B, Q, 2) points -> (B, Q) logits; see :meth:`ImplicitDecoder.query`."""
        return self.decoder.query(latent, coord, cell)


def query_chunked(
    net: CRMNet,
    latent: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    cell: Tuple[float, float],
    chunk: int,
) -> torch.Tensor:
    """Logits at every (row, col) of a grid, ``chunk`` queries at a time.

    The coordinates of a chunk are built from its flat indices, so neither the full coordinate
    list nor the MLP activations of more than ``chunk`` queries exist at once.

    Args:
        net (CRMNet): the network.
        latent (Tensor): (1, H1 + 2, h, w) latent table.
        rows, cols (Tensor): (Qh,), (Qw,) normalised row / column coordinates.
        cell (tuple[float, float]): the cell size of every query.
        chunk (int): queries per chunk; <= 0: all at once.

    Returns:
        Tensor: (Qh, Qw) logits.
    """
    qh, qw = rows.shape[0], cols.shape[0]
    n = qh * qw
    step = n if chunk <= 0 else int(chunk)
    cell_t = rows.new_tensor(cell)
    outs = []
    for start in range(0, n, step):
        idx = torch.arange(start, min(n, start + step), device=rows.device)
        coord = torch.stack([rows[idx // qw], cols[idx % qw]], dim=-1).unsqueeze(0)
        outs.append(net.query(latent, coord, cell_t.expand_as(coord))[0])
    return torch.cat(outs).reshape(qh, qw)


def cascade_refine(
    net: CRMNet,
    image: torch.Tensor,
    seg: torch.Tensor,
    *,
    scales: Sequence[float] = (0.125, 0.25, 0.5, 1.0),
    output_size: Optional[Tuple[int, int]] = None,
    chunk: int = 65536,
    pad: int = 32,
    suppress_empty: bool = True,
) -> torch.Tensor:
    """Multi-resolution refinement of one image (official ``test.py``; paper Table 5).

    The input is reflect-padded by ``pad`` pixels (official test set: 32). At each scale s the
    padded image and the current coarse mask are resized to ``round(s * padded size)``
    (bilinear, align_corners=True), encoded, and the decoder is queried at every output pixel
    (and the padded border, see :func:`axis_coords`) in chunks; the sigmoid output, fed as
    ``(prob - 0.5) * 2``, is the next scale's coarse mask. With ``suppress_empty`` a scale whose
    coarse mask is almost empty (``sum(seg + 1) < 2``, i.e. total probability < 1) outputs 0
    (official).

    Args:
        net (CRMNet): the network (eval mode).
        image (Tensor): (1, 3, H, W) normalised image.
        seg (Tensor): (1, 1, H, W) coarse mask in [-1, 1].
        scales (list[float]): inference scales, in order.
        output_size (tuple[int, int] or None): (oh, ow) of the result; None: (H, W).
        chunk (int): queries per decoder call (<= 0: all at once).
        pad (int): reflect padding (clipped to H - 1 and W - 1).
        suppress_empty (bool): official suppression of empty coarse masks.

    Returns:
        Tensor: (oh, ow) foreground probability.
    """
    if image.dim() != 4 or seg.dim() != 4 or image.shape[0] != 1 or seg.shape[0] != 1:
        raise ValueError(
            f"cascade_refine takes one image (1, 3, H, W) and mask (1, 1, H, W), got "
            f"{tuple(image.shape)} and {tuple(seg.shape)}"
        )
    if tuple(image.shape[-2:]) != tuple(seg.shape[-2:]):
        raise ValueError(
            f"coarse mask {tuple(seg.shape[-2:])} and image {tuple(image.shape[-2:])} sizes differ"
        )
    if not scales:
        raise ValueError("MODEL.CRM.TEST_SCALES is empty")
    H, W = int(image.shape[-2]), int(image.shape[-1])
    oh, ow = (H, W) if output_size is None else (int(output_size[0]), int(output_size[1]))
    p = min(int(pad), H - 1, W - 1) if pad > 0 else 0
    if p > 0:
        image = F.pad(image, (p, p, p, p), mode="reflect")
        seg = F.pad(seg, (p, p, p, p), mode="reflect")
    hp, wp = H + 2 * p, W + 2 * p
    rows, pr, cell_r = axis_coords(H, p, oh, device=image.device)
    cols, pc, cell_c = axis_coords(W, p, ow, device=image.device)
    current = seg
    prob = image.new_zeros(rows.shape[0], cols.shape[0])
    for s in scales:
        size = (max(1, round(hp * s)), max(1, round(wp * s)))
        im_s = F.interpolate(image, size=size, mode="bilinear", align_corners=True)
        seg_s = F.interpolate(current, size=size, mode="bilinear", align_corners=True)
        latent = net.encode(im_s, seg_s)
        prob = torch.sigmoid(query_chunked(net, latent, rows, cols, (cell_r, cell_c), chunk))
        if suppress_empty:
            empty = (current + 1).sum() < 2
            prob = torch.where(empty, torch.zeros_like(prob), prob)
        current = ((prob - 0.5) * 2)[None, None]
    return prob[pr : pr + oh, pc : pc + ow]
