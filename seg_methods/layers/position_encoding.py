"""Sinusoidal 2D positional encoding (DETR / Mask2Former style).

Shape shorthand:
    N: batch size, C: feature channels, H, W: spatial size, F: features per axis (= C_out / 2)
"""

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Fixed sine/cosine positional encoding of pixel coordinates.

    For a coordinate t (row index for the first half of the channels, column index for the
    second half), normalised to (0, scale] when ``normalize`` is set, channel pair (2i, 2i+1)
    holds (sin(t / T^(2i/F)), cos(t / T^(2i/F))), with T = ``temperature``.
    Output channels are [y-encoding (F), x-encoding (F)], i.e. 2F channels.

    Args:
        num_pos_feats (int): F, channels per axis.
        temperature (float): T.
        normalize (bool): divide coordinates by the extent and multiply by ``scale``.
        scale (float): defaults to 2*pi; only valid with ``normalize``.
        offset (float): added to the 1-based coordinate before normalising, ``(t + offset) /
            extent``: mmdet's ``SinePositionalEncoding(offset=...)`` (Deformable DETR and Panoptic
            SegFormer use -0.5); 0 is DETR's / Mask2Former's encoding. Only valid with
            ``normalize``.
    """

    def __init__(
        self, num_pos_feats=64, temperature=10000, normalize=False, scale=None, offset=0.0
    ):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: `scale` requires normalize=True")
        if offset and not normalize:
            raise ValueError("PositionEmbeddingSine: `offset` requires normalize=True")
        self.offset = float(offset)
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x, mask=None):
        """
        Args:
            x (Tensor): (N, C, H, W); only its batch size, spatial size and device are used.
            mask (Tensor or None): (N, H, W) bool, True at padded pixels (excluded from counts).

        Returns:
            Tensor: (N, 2F, H, W) float32.
        """
        n, _, h, w = x.shape
        if mask is None:
            valid = torch.ones((n, h, w), device=x.device, dtype=torch.float32)
        else:
            valid = (~mask).to(torch.float32)
        y = valid.cumsum(1)  # (N, H, W): 1-based row coordinate of valid pixels
        xx = valid.cumsum(2)  # (N, H, W): 1-based column coordinate
        if self.normalize:
            eps = 1e-6
            y = (y + self.offset) / (y[:, -1:, :] + eps) * self.scale
            xx = (xx + self.offset) / (xx[:, :, -1:] + eps) * self.scale
        i = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        freq = self.temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / self.num_pos_feats)
        return torch.cat((self._encode(y, freq), self._encode(xx, freq)), dim=1)

    @staticmethod
    def _encode(coord, freq):
        # coord: (N, H, W); freq: (F,) -> (N, F, H, W) with sin on even, cos on odd channels
        t = coord[:, :, :, None] / freq  # (N, H, W, F)
        out = torch.empty_like(t)
        out[..., 0::2] = t[..., 0::2].sin()
        out[..., 1::2] = t[..., 1::2].cos()
        return out.permute(0, 3, 1, 2)

    def extra_repr(self):
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
            f"normalize={self.normalize}, scale={self.scale:.4f}, offset={self.offset}"
        )
