"""CMT-DeepLab decoder: Clustering Mask Transformer layers inside dual-path axial-transformer
blocks, the upsampling path and the output heads (Yu et al., CVPR 2022, Sec. 3.3-3.4).

One Clustering Mask Transformer (CMT) layer, with cluster centres C (N, D) and pixel features
F (HW, Dp):

1. Location-sensitive clustering (Eq. 11-12): C <- Conv(Concat(C, r^c)), F <- Conv(Concat(F, r^p))
   with r^c (N, 2M) the reference masks of the previous layer and r^p (HW, 2) the fixed pixel
   coordinates in [0, 1]. The convolutions are 1x1 (a linear layer on the centres), initialised
   to the identity on the feature channels (ours). Both streams are *replaced* by their
   coordinate-convolved versions C^, F^ at the start of the layer: every projection of the layer
   reads C^ / F^, and the residual updates of steps 3 and 4 are added to C^ and F^ (the centre
   and the pixel stream are treated alike; see projects/CMT-DeepLab/README.md, "Eq. 11-12").
2. Pixel-cluster assignment with the residual between layers (Eq. 6):
   Z = softmax_N(S + K~^p Q~^c^T), S = logits of the previous layer (resized bilinearly when the
   stride changes). Computed with :func:`seg_methods.layers.soft_cluster`, which also returns the
   clustering update Z^T V^p.
3. Centre update (Eq. 7): C <- C + softmax_HW(Q^c K^p^T) V^p + Z^T V^p. The first term is the
   usual multi-head cross-attention; the plain sum Z^T V^p grows with HW, so we LayerNorm it
   before adding (ours). Then a residual output projection + LayerNorm, self-attention among the
   centres and an FFN (post-norm, as the transformer layers of Mask2Former).
4. Pixel update (Eq. 8): F <- F^ + Z V^c, V^c a linear projection of the centres, followed by a
   BatchNorm whose scale starts at zero (ours, so a fresh layer outputs F^).
5. Reference mask (Eq. 9-10): e <- e + MLP(C), r^c = sigmoid(e), e carried to the next layer.

Every layer's assignment logits (B, N, h, w) and class logits of its centres are a prediction
supervised with the ground truth (Sec. 3.3 "further supervised by the ground-truths").

Shape shorthand:
    B: batch, N: cluster centres, D: centre channels, Dp: pixel channels of a stage,
    h, w: feature size of a stage, HW = h * w, M: reference points per centre, C: classes
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm

from ...layers.axial import AxialBlock, ConvBottleneck, get_activation_module
from ...layers.clustering import soft_cluster
from ...layers.transformer_layers import MLP, FFNLayer, SelfAttentionLayer
from ..build import MASK_CLS_HEAD_REGISTRY

__all__ = [
    "CMTLayer",
    "DualPathBlock",
    "CMTDeepLabDecoder",
    "pixel_coordinates",
]


def pixel_coordinates(h: int, w: int, device=None, dtype=torch.float32) -> Tensor:
    """r^p of Eq. 12: (2, h, w) pixel coordinates (row, column) normalised to [0, 1]."""
    ys = torch.linspace(0, 1, h, device=device, dtype=dtype) if h > 1 else torch.zeros(1)
    xs = torch.linspace(0, 1, w, device=device, dtype=dtype) if w > 1 else torch.zeros(1)
    grid_y, grid_x = torch.meshgrid(ys.to(device), xs.to(device), indexing="ij")
    return torch.stack([grid_y, grid_x])


class CMTLayer(nn.Module):
    """One Clustering Mask Transformer layer (module docstring, steps 1-5)."""

    def __init__(
        self,
        *,
        pixel_channels: int,
        hidden_dim: int,
        num_heads: int,
        dim_feedforward: int,
        num_ref_points: int = 8,
        clustering_update: bool = True,
        location_sensitive: bool = True,
        norm: str = "BN",
        cluster_impl: str = "auto",
    ):
        """
        Args:
            pixel_channels (int): Dp.
            hidden_dim (int): D.
            num_heads (int): heads of the cross-attention and self-attention.
            dim_feedforward (int): FFN width.
            num_ref_points (int): M.
            clustering_update (bool): Eq. 6-8; False gives the plain cross-attention (Eq. 3)
                with the assignment logits still predicted (and supervised) for the outputs.
            location_sensitive (bool): coord-conv and reference masks (Eq. 9-12).
            norm (str): norm of the pixel projections.
            cluster_impl (str): ``impl`` of :func:`soft_cluster`.
        """
        super().__init__()
        d, dp, m = hidden_dim, pixel_channels, num_ref_points
        self.hidden_dim, self.num_heads, self.num_ref_points = d, num_heads, m
        self.clustering_update = clustering_update
        self.location_sensitive = location_sensitive
        self.cluster_impl = cluster_impl
        if location_sensitive:
            self.center_coord_conv = nn.Linear(d + 2 * m, d)  # Eq. 11
            self.pixel_coord_conv = nn.Conv2d(dp + 2, dp, 1)  # Eq. 12
            with torch.no_grad():  # identity on the feature channels (ours)
                self.center_coord_conv.weight[:, :d].copy_(torch.eye(d))
                self.center_coord_conv.weight[:, d:].normal_(std=0.02)
                self.center_coord_conv.bias.zero_()
                self.pixel_coord_conv.weight[:, :dp, 0, 0].copy_(torch.eye(dp))
                self.pixel_coord_conv.weight[:, dp:].normal_(std=0.02)
                self.pixel_coord_conv.bias.zero_()
            self.ref_mlp = MLP(d, d, 2 * m, 3, activation="gelu")  # Eq. 9
        # pixel projections: K^p, V^p (cross-attention) and K~^p (clustering)
        self.pixel_kv = Conv2d(dp, 2 * d, 1, bias=not norm, norm=get_norm(norm, 2 * d))
        self.pixel_cluster_key = Conv2d(dp, d, 1, bias=not norm, norm=get_norm(norm, d))
        # centre projections: Q^c, Q~^c, V^c
        self.center_q = nn.Linear(d, d)
        self.center_cluster_query = nn.Linear(d, d)
        self.center_norm = nn.LayerNorm(d)
        self.cluster_update_norm = nn.LayerNorm(d)
        self.out_proj = nn.Linear(d, d)
        self.cross_norm = nn.LayerNorm(d)
        if clustering_update:
            self.center_value = nn.Linear(d, dp)  # V^c of Eq. 8
            self.pixel_update_norm = get_norm(norm, dp) or nn.Identity()
            if hasattr(self.pixel_update_norm, "weight"):
                nn.init.zeros_(self.pixel_update_norm.weight)
        self.self_attention = SelfAttentionLayer(d, num_heads)
        self.ffn = FFNLayer(d, dim_feedforward, activation="gelu")

    def forward(
        self,
        centers: Tensor,
        pixels: Tensor,
        prev_logits: Optional[Tensor],
        ref_embed: Optional[Tensor],
    ) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
        """
        Args:
            centers (Tensor): (B, N, D) cluster centres C.
            pixels (Tensor): (B, Dp, h, w) pixel features F.
            prev_logits (Tensor or None): (B, N, h', w') assignment logits S of the previous
                layer (resized to (h, w) here), None for the first layer.
            ref_embed (Tensor or None): (B, N, 2M) embedding e of the previous layer (Eq. 9).

        Returns:
            tuple: centres (B, N, D), pixels F^ + Z V^c (B, Dp, h, w) (F + Z V^c without
            location-sensitive clustering), assignment logits (B, N, h, w), reference masks r^c
            (B, N, 2M) or None, embedding e (B, N, 2M) or None.
        """
        b, _, h, w = pixels.shape
        n, d, g = centers.shape[1], self.hidden_dim, self.num_heads
        if self.location_sensitive:
            # Eq. 11-12: C^ and F^ replace C and F for the whole layer (module docstring, step 1)
            ref = ref_embed.sigmoid()  # r^c of the previous layer (Eq. 10)
            centers = self.center_coord_conv(torch.cat([centers, ref], dim=-1))  # Eq. 11
            coords = pixel_coordinates(h, w, pixels.device, pixels.dtype)
            coords = coords[None].expand(b, -1, -1, -1)
            pixels = self.pixel_coord_conv(torch.cat([pixels, coords], dim=1))  # Eq. 12
        k_p, v_p = self.pixel_kv(pixels).flatten(2).chunk(2, dim=1)  # (B, D, HW) each
        k_tilde = self.pixel_cluster_key(pixels).flatten(2).transpose(1, 2)  # (B, HW, D)
        c_norm = self.center_norm(centers)
        q_c = self.center_q(c_norm)  # (B, N, D)
        q_tilde = self.center_cluster_query(c_norm)  # (B, N, D)

        bias = None
        if prev_logits is not None:
            if prev_logits.shape[-2:] != (h, w):
                prev_logits = F.interpolate(
                    prev_logits, size=(h, w), mode="bilinear", align_corners=False
                )
            bias = prev_logits.flatten(2)  # S of Eq. 6: (B, N, HW)
        v_rows = v_p.transpose(1, 2)  # (B, HW, D)
        # Eq. 6 (and Z^T V^p of Eq. 7): logits (B, N, HW), assignment Z^T (B, N, HW)
        cluster_update, logits, assignment = soft_cluster(
            q_tilde,
            k_tilde,
            v_rows,
            bias,
            return_logits=True,
            impl=self.cluster_impl,
            return_assignment=True,
            scale=d**-0.5,  # ours: scaled dot product (the paper does not scale)
        )

        # Eq. 3 / first term of Eq. 7: multi-head softmax over HW
        dh = d // g
        qh = q_c.reshape(b, n, g, dh).transpose(1, 2)  # (B, G, N, dh)
        kh = k_p.reshape(b, g, dh, h * w)  # (B, G, dh, HW)
        vh = v_p.reshape(b, g, dh, h * w)  # (B, G, dh, HW)
        attn = torch.softmax(qh @ kh * dh**-0.5, dim=-1)  # (B, G, N, HW)
        cross = (attn @ vh.transpose(2, 3)).transpose(1, 2).reshape(b, n, d)  # (B, N, D)
        if self.clustering_update:
            cross = cross + self.cluster_update_norm(cluster_update)  # Eq. 7
        centers = self.cross_norm(centers + self.out_proj(cross))
        centers = centers.transpose(0, 1)  # (N, B, D) for the shared layers
        centers = self.ffn(self.self_attention(centers)).transpose(0, 1)  # (B, N, D)

        if self.clustering_update:
            v_c = self.center_value(c_norm)  # V^c: (B, N, Dp)
            update = torch.einsum("bnk,bnc->bck", assignment, v_c).reshape(b, -1, h, w)
            pixels = pixels + self.pixel_update_norm(update)  # Eq. 8: F^ + Z V^c

        ref_points, new_embed = None, None
        if self.location_sensitive:
            new_embed = ref_embed + self.ref_mlp(centers)  # Eq. 9
            ref_points = new_embed.sigmoid()  # Eq. 10
        return centers, pixels, logits.reshape(b, n, h, w), ref_points, new_embed


class DualPathBlock(nn.Module):
    """Dual-path axial-transformer block: pixel path = axial bottleneck (axial self-attention),
    centre path = CMT layer (clustering cross-attention, self-attention, FFN)."""

    def __init__(self, *, channels: int, axial_kwargs: Dict, cmt_kwargs: Dict):
        super().__init__()
        self.axial = AxialBlock(channels, channels, **axial_kwargs)
        self.cmt = CMTLayer(pixel_channels=channels, **cmt_kwargs)

    def forward(self, centers, pixels, prev_logits, ref_embed):
        """See :meth:`CMTLayer.forward`; the pixels first go through the axial block."""
        return self.cmt(centers, self.axial(pixels), prev_logits, ref_embed)


@MASK_CLS_HEAD_REGISTRY.register()
class CMTDeepLabDecoder(nn.Module):
    """Dual-path blocks on the coarse backbone features, upsampling path to stride 4, heads.

    Registered in MASK_CLS_HEAD_REGISTRY (``MODEL.CMT_DEEPLAB.HEAD_NAME``); built from
    ``cfg.MODEL.CMT_DEEPLAB`` by :meth:`from_config`. Returns a prediction dict (see
    :meth:`forward`).
    """

    @configurable
    def __init__(
        self,
        *,
        input_shape: Dict[str, ShapeSpec],
        num_classes: int,
        num_queries: int = 128,
        hidden_dim: int = 256,
        nheads: int = 8,
        dim_feedforward: int = 2048,
        dec_in_features: Sequence[str] = ("res5", "res4"),
        dec_blocks: Sequence[int] = (3, 3),
        axial_heads: int = 8,
        axial_span: int = 129,
        axial_bottleneck_ratio: int = 4,
        decoder_in_features: Sequence[str] = ("res3", "res2"),
        decoder_dim: int = 256,
        mask_dim: int = 128,
        norm: str = "BN",
        activation: str = "gelu",
        drop_path_rate: float = 0.2,
        clustering_update: bool = True,
        location_sensitive: bool = True,
        num_ref_points: int = 8,
        cluster_impl: str = "auto",
    ):
        """
        Args:
            input_shape (dict[str, ShapeSpec]): backbone output shapes.
            num_classes (int): C.
            num_queries (int): N.
            hidden_dim, nheads, dim_feedforward: centre path sizes.
            dec_in_features (sequence[str]): features the dual-path blocks run on, coarse first.
            dec_blocks (sequence[int]): dual-path blocks per feature.
            axial_heads, axial_span, axial_bottleneck_ratio: pixel-path axial blocks.
            decoder_in_features (sequence[str]): finer features of the upsampling path.
            decoder_dim (int): channels of the upsampling path.
            mask_dim (int): channels of the final pixel embedding and mask embeddings.
            norm, activation (str): norm and activation of the pixel path.
            drop_path_rate (float): stochastic depth of the last axial block (linear ramp).
            clustering_update, location_sensitive, num_ref_points, cluster_impl: see
                :class:`CMTLayer`.
        """
        super().__init__()
        if len(dec_in_features) != len(dec_blocks):
            raise ValueError(
                "MODEL.CMT_DEEPLAB.DEC_IN_FEATURES and DEC_BLOCKS must have the same length, got "
                f"{list(dec_in_features)} and {list(dec_blocks)}"
            )
        self.dec_in_features = list(dec_in_features)
        self.decoder_in_features = list(decoder_in_features)
        self.num_queries = num_queries
        self.location_sensitive = location_sensitive
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        if location_sensitive:
            self.ref_embed = nn.Linear(hidden_dim, 2 * num_ref_points)  # e of Eq. 9
        total = sum(dec_blocks)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        cmt_kwargs = dict(
            hidden_dim=hidden_dim,
            num_heads=nheads,
            dim_feedforward=dim_feedforward,
            num_ref_points=num_ref_points,
            clustering_update=clustering_update,
            location_sensitive=location_sensitive,
            norm=norm,
            cluster_impl=cluster_impl,
        )
        self.stage_fuse = nn.ModuleList()
        self.stages = nn.ModuleList()
        prev_channels, k = None, 0
        for name, num in zip(self.dec_in_features, dec_blocks):
            ch = input_shape[name].channels
            if prev_channels is None:
                self.stage_fuse.append(nn.Identity())
            else:
                self.stage_fuse.append(
                    Conv2d(prev_channels, ch, 1, bias=not norm, norm=get_norm(norm, ch))
                )
            blocks = []
            for _ in range(num):
                axial_kwargs = dict(
                    bottleneck_channels=ch // axial_bottleneck_ratio,
                    num_heads=axial_heads,
                    span=axial_span,
                    norm=norm,
                    activation=activation,
                    drop_path=rates[k],
                )
                blocks.append(
                    DualPathBlock(channels=ch, axial_kwargs=axial_kwargs, cmt_kwargs=cmt_kwargs)
                )
                k += 1
            self.stages.append(nn.ModuleList(blocks))
            prev_channels = ch
        self.act = get_activation_module(activation)
        # upsampling path (stride 8, 4)
        self.up_lateral = nn.ModuleList()
        self.up_in = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for name in self.decoder_in_features:
            ch = input_shape[name].channels
            self.up_in.append(
                Conv2d(
                    prev_channels, decoder_dim, 1, bias=not norm, norm=get_norm(norm, decoder_dim)
                )
            )
            self.up_lateral.append(
                Conv2d(ch, decoder_dim, 1, bias=not norm, norm=get_norm(norm, decoder_dim))
            )
            self.up_blocks.append(
                ConvBottleneck(decoder_dim, decoder_dim, norm=norm, activation=activation)
            )
            prev_channels = decoder_dim
        self.out_channels = prev_channels
        # heads
        self.pixel_embed = Conv2d(
            prev_channels, mask_dim, 1, bias=not norm, norm=get_norm(norm, mask_dim)
        )
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3, activation="gelu")
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.sem_seg_head = nn.Sequential(
            Conv2d(prev_channels, decoder_dim, 3, padding=1, bias=not norm,
                   norm=get_norm(norm, decoder_dim)),
            get_activation_module(activation),
            nn.Conv2d(decoder_dim, num_classes, 1),
        )  # fmt: skip
        self.mask_dim = mask_dim

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]) -> Dict:
        """Keyword arguments from ``cfg.MODEL.CMT_DEEPLAB`` (and the class count of
        ``cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES``)."""
        m = cfg.MODEL.CMT_DEEPLAB
        return {
            "input_shape": input_shape,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "num_queries": m.NUM_OBJECT_QUERIES,
            "hidden_dim": m.HIDDEN_DIM,
            "nheads": m.NHEADS,
            "dim_feedforward": m.DIM_FEEDFORWARD,
            "dec_in_features": m.DEC_IN_FEATURES,
            "dec_blocks": m.DEC_BLOCKS,
            "axial_heads": m.AXIAL_HEADS,
            "axial_span": m.AXIAL_SPAN,
            "axial_bottleneck_ratio": m.AXIAL_BOTTLENECK_RATIO,
            "decoder_in_features": m.DECODER_IN_FEATURES,
            "decoder_dim": m.DECODER_DIM,
            "mask_dim": m.MASK_DIM,
            "norm": m.NORM,
            "activation": m.ACTIVATION,
            "drop_path_rate": m.DROP_PATH_RATE,
            "clustering_update": m.CLUSTERING_UPDATE,
            "location_sensitive": m.LOCATION_SENSITIVE,
            "num_ref_points": m.NUM_REF_POINTS,
            "cluster_impl": m.CLUSTER_IMPL,
        }

    def forward_features(
        self, features: Dict[str, Tensor]
    ) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], List[Dict]]:
        """Dual-path blocks and upsampling path.

        Returns:
            tuple: stride-4 features (B, decoder_dim, h4, w4), centres (B, N, D), last
            assignment logits (B, N, h, w), last reference embedding (B, N, 2M) or None, and
            the per-layer predictions [{"pred_logits", "pred_masks", "ref_points"}].
        """
        first = features[self.dec_in_features[0]]
        b = first.shape[0]
        centers = self.query_feat.weight[None].expand(b, -1, -1)
        ref_embed = self.ref_embed(centers) if self.location_sensitive else None
        logits, pixels, layer_outputs = None, None, []
        for name, fuse, blocks in zip(self.dec_in_features, self.stage_fuse, self.stages):
            feat = features[name]
            if pixels is None:
                pixels = feat
            else:
                up = F.interpolate(
                    pixels, size=feat.shape[-2:], mode="bilinear", align_corners=False
                )
                pixels = self.act(fuse(up) + feat)
            for block in blocks:
                centers, pixels, logits, ref_points, ref_embed = block(
                    centers, pixels, logits, ref_embed
                )
                layer_outputs.append(
                    {
                        "pred_logits": self.class_embed(centers),
                        "pred_masks": logits,
                        "ref_points": ref_points,
                    }
                )
        for name, proj_in, lateral, block in zip(
            self.decoder_in_features, self.up_in, self.up_lateral, self.up_blocks
        ):
            feat = features[name]
            up = F.interpolate(
                proj_in(pixels), size=feat.shape[-2:], mode="bilinear", align_corners=False
            )
            pixels = block(self.act(up + lateral(feat)))
        return pixels, centers, logits, ref_embed, layer_outputs

    def predict(
        self, pixels: Tensor, centers: Tensor, prev_logits: Tensor, layer_outputs: List[Dict]
    ) -> Dict:
        """Final prediction from stride-4 features (Eq. 4 with the residual of Eq. 6).

        Returns:
            dict: "pred_logits" (B, N, C + 1), "pred_masks" (B, N, h4, w4) logits (softmax over
            N gives the masks), "ref_points" (B, N, 2M) or None, "pixel_feature" (B, mask_dim,
            h4, w4) L2-normalised, "sem_seg_logits" (B, C, h4, w4), "aux_outputs" (the per-layer
            predictions).
        """
        embed = self.pixel_embed(pixels)  # (B, E, h4, w4)
        mask_embed = self.mask_embed(centers)  # (B, N, E)
        logits = torch.einsum("bne,behw->bnhw", mask_embed, embed) * self.mask_dim**-0.5
        if prev_logits is not None:
            logits = logits + F.interpolate(
                prev_logits, size=logits.shape[-2:], mode="bilinear", align_corners=False
            )
        return {
            "pred_logits": self.class_embed(centers),
            "pred_masks": logits,
            "ref_points": layer_outputs[-1]["ref_points"] if layer_outputs else None,
            "pixel_feature": F.normalize(embed, dim=1),
            "sem_seg_logits": self.sem_seg_head(pixels),
            "aux_outputs": layer_outputs,
        }

    def forward(self, features: Dict[str, Tensor]) -> Dict:
        """
        Args:
            features (dict[str, Tensor]): backbone features (N, C_k, H / 2^k, W / 2^k).

        Returns:
            dict: see :meth:`predict`.
        """
        pixels, centers, logits, _, layer_outputs = self.forward_features(features)
        return self.predict(pixels, centers, logits, layer_outputs)
