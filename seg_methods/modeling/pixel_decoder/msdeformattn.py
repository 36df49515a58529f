"""Mask2Former's pixel decoder: a multi-scale deformable-attention encoder plus an FPN lateral.

Mask2Former (Cheng et al., CVPR 2022), Sec. 3.2 / 4.1: 6 deformable-attention encoder layers over
the 1/32, 1/16 and 1/8 features, then a lateral 1x1 + 3x3 conv adds the 1/4 feature, from which a
1x1 conv gives the per-pixel mask embeddings. The three encoder outputs (1/32, 1/16, 1/8) feed the
transformer decoder round-robin.

Parameter names follow the public checkpoints (``input_proj``, ``transformer.level_embed``,
``transformer.encoder.layers.{i}``, ``mask_features``, ``adapter_1``, ``layer_1``).

Shape shorthand:
    N: batch, C: conv_dim, S: tokens of all encoder levels, L: encoder levels (3),
    H_l, W_l: size of level l (levels ordered from low to high resolution inside the encoder)
"""

import contextlib
import math
from typing import Callable, Dict, List, Optional, Union

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from torch import nn
from torch.nn import functional as F

from ...layers.deform_attn import MSDeformAttn
from ...layers.multi_scale import c2_conv, project_levels
from ...layers.position_encoding import PositionEmbeddingSine
from ..build import PIXEL_DECODER_REGISTRY


class MSDeformAttnEncoderLayer(nn.Module):
    """Deformable self-attention over all levels + FFN, post-norm (Deformable DETR encoder)."""

    def __init__(
        self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8, n_points=4, impl="auto"
    ):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, impl=impl)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src,
        pos,
        reference_points,
        spatial_shapes,
        level_start_index,
        padding_mask=None,
        ffn_dtype: Optional[torch.dtype] = None,
    ):
        """(N, S, C) -> (N, S, C); ``pos`` (N, S, C) is added to the queries only.

        ``ffn_dtype`` (e.g. bfloat16): run the FFN's two linear layers under an autocast to this
        dtype (its output is cast back); None: the layer's own dtype (official)."""
        attn = self.self_attn(
            src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask
        )
        src = self.norm1(src + self.dropout1(attn))
        ffn_precision = (
            contextlib.nullcontext()
            if ffn_dtype is None
            else torch.autocast(src.device.type, dtype=ffn_dtype)
        )
        with ffn_precision:
            # in place on linear1's fresh output (its backward does not need it)
            ffn = self.linear2(self.dropout2(F.relu(self.linear1(src), inplace=True)))
        return self.norm2(src + self.dropout3(ffn.to(src.dtype)))


class MSDeformAttnEncoder(nn.Module):
    """A stack of :class:`MSDeformAttnEncoderLayer` (attribute ``layers``)."""

    def __init__(self, num_layers: int, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(
            MSDeformAttnEncoderLayer(**layer_kwargs) for _ in range(num_layers)
        )

    @staticmethod
    def reference_points(spatial_shapes, batch_size, device):
        """Pixel-centre reference points of every token, identical across levels.

        Returns:
            Tensor: (N, S, L, 2) normalised (x, y): ((j + 0.5) / W_l, (i + 0.5) / H_l).
            (No padding masks are used, so the valid ratios of Deformable DETR are all 1.)
        """
        refs = []
        for h, w in spatial_shapes.tolist():
            ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
            xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
            ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
            refs.append(torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), -1))  # (H*W, 2)
        ref = torch.cat(refs, 0)  # (S, 2)
        num_levels = spatial_shapes.shape[0]
        return ref[None, :, None, :].expand(batch_size, -1, num_levels, -1)

    def forward(self, src, spatial_shapes, level_start_index, pos, ffn_dtype=None):
        ref = self.reference_points(spatial_shapes, src.shape[0], src.device)
        for layer in self.layers:
            src = layer(src, pos, ref, spatial_shapes, level_start_index, ffn_dtype=ffn_dtype)
        return src


class MSDeformAttnEncoderOnly(nn.Module):
    """Flattens the levels, adds level embeddings to the positional encodings, runs the encoder.

    Attributes ``level_embed`` (L, C) and ``encoder`` match the public checkpoints.
    """

    def __init__(
        self,
        d_model=256,
        nhead=8,
        num_encoder_layers=6,
        dim_feedforward=1024,
        dropout=0.1,
        num_feature_levels=4,
        enc_n_points=4,
        impl="auto",
    ):
        super().__init__()
        self.encoder = MSDeformAttnEncoder(
            num_encoder_layers,
            d_model=d_model,
            d_ffn=dim_feedforward,
            dropout=dropout,
            n_levels=num_feature_levels,
            n_heads=nhead,
            n_points=enc_n_points,
            impl=impl,
        )
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(
        self,
        srcs: List[torch.Tensor],
        pos_embeds: List[torch.Tensor],
        ffn_dtype: Optional[torch.dtype] = None,
    ):
        """
        Args:
            srcs: L tensors (N, C, H_l, W_l).
            pos_embeds: L tensors (N, C, H_l, W_l).
            ffn_dtype: autocast dtype of the encoder layers' FFNs (None: float32, official).

        Returns:
            memory (Tensor): (N, S, C); spatial_shapes (L, 2) int64; level_start_index (L,).
        """
        flat, flat_pos, shapes = [], [], []
        for lvl, (src, pos) in enumerate(zip(srcs, pos_embeds)):
            shapes.append(src.shape[-2:])
            flat.append(src.flatten(2).transpose(1, 2))  # (N, H_l*W_l, C)
            flat_pos.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        src_flat = torch.cat(flat, 1)
        pos_flat = torch.cat(flat_pos, 1)
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=src_flat.device)
        level_start_index = torch.cat(
            (spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1])
        )
        memory = self.encoder(
            src_flat, spatial_shapes, level_start_index, pos_flat, ffn_dtype=ffn_dtype
        )
        return memory, spatial_shapes, level_start_index


@PIXEL_DECODER_REGISTRY.register()
class Mask2FormerMSDeformAttnPixelDecoder(nn.Module):
    """Multi-scale deformable-attention pixel decoder of Mask2Former.

    ``forward_features(features)`` returns ``(mask_features (N, mask_dim, H/4, W/4),
    coarsest encoder output (N, C, H/32, W/32), [3 encoder outputs, 1/32 -> 1/8])``.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        transformer_dropout: float,
        transformer_nheads: int,
        transformer_dim_feedforward: int,
        transformer_enc_layers: int,
        transformer_n_points: int,
        conv_dim: int,
        mask_dim: int,
        norm: Optional[Union[str, Callable]] = None,
        transformer_in_features: List[str],
        common_stride: int,
        num_outputs: int = 3,
        deform_attn_impl: str = "auto",
        num_extra_levels: int = 0,
        pos_offset: float = 0.0,
        fpn_autocast: bool = False,
        encoder_ffn_autocast: bool = False,
    ):
        """
        Args:
            input_shape: backbone features used (name -> channels/stride).
            transformer_dropout: dropout inside the encoder layers.
            transformer_nheads: heads of the deformable attention.
            transformer_dim_feedforward: FFN width of the encoder (1024 in the paper).
            transformer_enc_layers: number of encoder layers (6 in the paper).
            transformer_n_points: sampling points per head and level (4).
            conv_dim: channels of the encoder and FPN convs (256).
            mask_dim: channels of the per-pixel mask embeddings (256).
            norm: norm of the FPN convs ("GN").
            transformer_in_features: features fed to the encoder (res3, res4, res5).
            common_stride: stride of the mask features (4).
            num_outputs: number of multi-scale outputs for the transformer decoder (3).
            deform_attn_impl: "auto", "op" (compiled) or "pytorch" (reference).
            num_extra_levels: coarser encoder levels added below the coarsest input feature,
                each a 3x3 stride-2 conv + GroupNorm(32) of the level above it (the first one
                reads the raw backbone feature), as Deformable DETR / Panoptic SegFormer's 4th
                level (0: none, Mask2Former). ``mask_dim`` 0 builds no mask-feature conv and
                ``forward_features`` then returns None for the mask features.
            pos_offset: offset of the sine positional encoding's coordinates (0: Mask2Former's;
                -0.5: mmdet's ``SinePositionalEncoding(offset=-0.5)`` of Deformable DETR and
                Panoptic SegFormer).
            fpn_autocast: under an enclosing autocast (e.g. ``SPEED.BF16_AUTOCAST``), run the FPN
                convs and the mask-feature conv in it instead of float32 (the deformable encoder
                always runs in float32). False is the official behaviour; without autocast both
                are the same.
            encoder_ffn_autocast: under an enclosing autocast, run the encoder layers' FFNs
                (two linear layers) in its dtype; the deformable attention (offsets, weights,
                sampling, projections) stays float32. False is the official behaviour.
        """
        super().__init__()
        self.fpn_autocast = bool(fpn_autocast)
        self.encoder_ffn_autocast = bool(encoder_ffn_autocast)
        shapes = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [k for k, _ in shapes]  # high -> low resolution
        self.feature_channels = [v.channels for _, v in shapes]
        enc_shapes = [(k, v) for k, v in shapes if k in transformer_in_features]
        if len(enc_shapes) != len(transformer_in_features):
            missing = set(transformer_in_features) - {k for k, _ in enc_shapes}
            raise ValueError(
                f"Pixel decoder: encoder features {sorted(missing)} (MODEL.MSDEFORM_PIXEL_DECODER."
                "TRANSFORMER_IN_FEATURES) are not among its input features (IN_FEATURES)"
            )
        self.transformer_in_features = [k for k, _ in enc_shapes]
        enc_channels = [v.channels for _, v in enc_shapes]
        enc_strides = [v.stride for _, v in enc_shapes]
        self.transformer_num_feature_levels = len(enc_shapes) + num_extra_levels

        # 1x1 conv + GroupNorm(32) per encoder level, ordered low -> high resolution
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim))
            for c in enc_channels[::-1]
        )
        # option (Panoptic SegFormer): extra coarser levels, ordered high -> low resolution
        self.extra_proj = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(enc_channels[-1] if i == 0 else conv_dim, conv_dim, 3, 2, 1),
                nn.GroupNorm(32, conv_dim),
            )
            for i in range(num_extra_levels)
        )
        for proj in list(self.input_proj) + list(self.extra_proj):
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)

        self.transformer = MSDeformAttnEncoderOnly(
            d_model=conv_dim,
            nhead=transformer_nheads,
            num_encoder_layers=transformer_enc_layers,
            dim_feedforward=transformer_dim_feedforward,
            dropout=transformer_dropout,
            num_feature_levels=self.transformer_num_feature_levels,
            enc_n_points=transformer_n_points,
            impl=deform_attn_impl,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True, offset=pos_offset)

        self.conv_dim = conv_dim
        self.mask_dim = mask_dim
        self.mask_features = c2_conv(conv_dim, mask_dim, 1) if mask_dim > 0 else None

        self.num_outputs = num_outputs
        self.common_stride = common_stride
        # FPN levels between the finest encoder level and the mask-feature stride (1 for 1/8->1/4)
        self.num_fpn_levels = int(round(math.log2(min(enc_strides) / common_stride)))
        lateral_convs, output_convs = [], []
        for idx, in_channels in enumerate(self.feature_channels[: self.num_fpn_levels]):
            lateral = c2_conv(in_channels, conv_dim, 1, norm=norm)
            output = c2_conv(conv_dim, conv_dim, 3, norm=norm, activation=F.relu)
            self.add_module(f"adapter_{idx + 1}", lateral)
            self.add_module(f"layer_{idx + 1}", output)
            lateral_convs.append(lateral)
            output_convs.append(output)
        # top-down order (low -> high resolution); plain lists: the modules are registered above
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        m = cfg.MODEL.MSDEFORM_PIXEL_DECODER
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in m.IN_FEATURES},
            "conv_dim": m.CONVS_DIM,
            "mask_dim": m.MASK_DIM,
            "norm": m.NORM,
            "transformer_dropout": m.DROPOUT,
            "transformer_nheads": m.NHEADS,
            "transformer_dim_feedforward": m.ENC_DIM_FEEDFORWARD,
            "transformer_enc_layers": m.TRANSFORMER_ENC_LAYERS,
            "transformer_n_points": m.ENC_N_POINTS,
            "transformer_in_features": m.TRANSFORMER_IN_FEATURES,
            "common_stride": m.COMMON_STRIDE,
            "deform_attn_impl": m.DEFORM_ATTN_IMPL,
            "num_extra_levels": m.NUM_EXTRA_LEVELS,
            "pos_offset": m.POS_OFFSET,
            "fpn_autocast": m.FPN_AUTOCAST,
            "encoder_ffn_autocast": m.ENCODER_FFN_AUTOCAST,
        }

    def forward_features(self, features: Dict[str, torch.Tensor]):
        """
        Args:
            features: backbone outputs, name -> (N, C_in, H_s, W_s).

        Returns:
            mask_features (N, mask_dim, H/4, W/4), coarsest encoder output (N, C, H/32, W/32),
            list of ``num_outputs`` maps (N, C, H_l, W_l) from low to high resolution.
        """
        # The deformable encoder runs in float32 (sampling is not half-precision safe); the FPN
        # convs too, unless ``fpn_autocast`` (then they follow the enclosing autocast).
        device_type = next(iter(features.values())).device.type
        ffn_dtype = None
        if self.encoder_ffn_autocast and torch.is_autocast_enabled(device_type):
            ffn_dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type=device_type, enabled=False):
            enc_inputs = [features[name].float() for name in self.transformer_in_features[::-1]]
            srcs, pos = project_levels(
                enc_inputs, self.input_proj, self.pe_layer
            )  # low -> high resolution; the level embeddings are added to pos in the encoder
            if len(self.extra_proj) > 0:  # option: extra coarser levels, prepended
                extra, x = [], enc_inputs[0]
                for proj in self.extra_proj:
                    x = proj(x)
                    extra.append(x)
                srcs = extra[::-1] + srcs
                pos = [self.pe_layer(x) for x in extra[::-1]] + pos
            memory, spatial_shapes, level_start_index = self.transformer(
                srcs, pos, ffn_dtype=ffn_dtype
            )
            n = memory.shape[0]
            sizes = (spatial_shapes[:, 0] * spatial_shapes[:, 1]).tolist()
            outs = [
                z.transpose(1, 2).reshape(n, -1, int(h), int(w))
                for z, (h, w) in zip(torch.split(memory, sizes, dim=1), spatial_shapes.tolist())
            ]
        fpn_precision = (
            contextlib.nullcontext()
            if self.fpn_autocast
            else torch.autocast(device_type=device_type, enabled=False)
        )
        with fpn_precision:
            # FPN: add the higher-resolution backbone features not seen by the encoder
            for idx, name in enumerate(self.in_features[: self.num_fpn_levels][::-1]):
                feature = features[name] if self.fpn_autocast else features[name].float()
                lat = self.lateral_convs[idx](feature)
                up = F.interpolate(
                    outs[-1], size=lat.shape[-2:], mode="bilinear", align_corners=False
                )
                outs.append(self.output_convs[idx](lat + up))
            mask_features = None if self.mask_features is None else self.mask_features(outs[-1])
        if self.fpn_autocast:  # callers get float32, as with the official float32 decoder
            outs = [o.float() for o in outs]
            mask_features = None if mask_features is None else mask_features.float()
        return mask_features, outs[0], outs[: self.num_outputs]
