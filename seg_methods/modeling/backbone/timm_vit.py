"""A timm Vision Transformer as a detectron2 backbone that returns the tokens of chosen layers.

Registered in BACKBONE_REGISTRY as ``build_timm_vit_backbone``; config ``cfg.MODEL.TIMM``
(:mod:`seg_methods.config.timm_backbone`), shared with the generic ``build_timm_backbone``:
NAME (a timm ViT / DeiT, e.g. ``vit_small_patch16_224``, ``deit_base_distilled_patch16_224``,
or a hybrid ViT, e.g. ``vit_small_r26_s32_384``), PRETRAINED, IN_CHANS, EXTRA_ARGS (e.g.
``img_size=512``) and OUT_INDICES / OUT_FEATURES.

Hybrid ViTs (timm ``vision_transformer_hybrid``: ``vit_small_r26_s32_*`` = R26+ViT-S/32,
``vit_large_r50_s32_*`` = R50+ViT-L/32, ...) replace the patch projection by timm's
``HybridEmbed``: a ResNetV2 stem (weight-standardised convs, GroupNorm, TF "same" padding) whose
last feature map is projected by a 1x1 conv to the token width. Their token stride p is the
embedding's total reduction (the CNN's ``feature_info`` reduction times timm's
``patch_size`` of 1: 32 for the ``*_s32`` models); everything else (prefix tokens, position
embedding, blocks, norms) is the plain ViT's, so the same code serves both. Depth / width
overrides in EXTRA_ARGS (``depth=2``, ``embed_dim=64``, ``num_heads=2``) shrink the
transformer; the ResNet stem is fixed by the model name.

Layer indices follow mmsegmentation's ``VisionTransformer(out_indices=...)`` (the layout RegProxy
and other mmseg-based ViT methods publish their configs in), so official configs translate
directly:

* ``i`` in ``[0, depth - 1)``: the patch tokens after block ``i`` (no norm);
* ``depth - 1``: the patch tokens after the last block AND the final LayerNorm (mmseg
  ``final_norm=True``);
* ``-1``: the token embedding (patch embedding + position embedding), before any block; for a
  hybrid, the ResNet stem's 1x1-projected features + position embedding (RegProxy's
  "implicit-mid-n1" association features of R26+ViT-S/32 and R50+ViT-L/32).

Every output is a (B, D, H / p, W / p) map of the patch tokens (class / distillation tokens
dropped), p the patch size (the token stride). The position embedding is resampled to the
input's token grid at run time, so any input whose sides are multiples of p works; detectron2
pads inputs to ``size_divisibility`` = p, so an image smaller than one patch is padded, not
rejected. The resampling is mmseg's ``VisionTransformer.resize_pos_embed`` (bicubic,
align_corners=False, no antialiasing; prefix tokens' entries kept), so a model converted from an
mmseg checkpoint gives the official outputs at every input size (measured by
tools/compare_with_official_regproxy.py).
timm's own ``dynamic_img_size`` resampling is antialiased, which changes the values even when
upsampling (PyTorch's antialiased bicubic uses a = -0.5 instead of -0.75); it is available with
``pos_embed_antialias=True``.

State-dict layout: the timm model is the submodule ``model`` (``backbone.model.<timm key>``);
timm's classifier head is removed.
"""

from typing import Dict, Optional, Sequence

import timm
import torch
from detectron2.config import configurable
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, ShapeSpec
from timm.layers import HybridEmbed, resample_abs_pos_embed

from .timm_backbone import parse_timm_extra_args

__all__ = ["TimmViTBackbone", "build_timm_vit_backbone"]


class TimmViTBackbone(Backbone):
    """Tokens of selected layers of a timm ViT, as feature maps (see the module docstring)."""

    @configurable
    def __init__(
        self,
        *,
        name: str,
        out_indices: Sequence[int],
        out_features: Sequence[str],
        pretrained: bool = False,
        in_chans: int = 3,
        extra_args: Optional[Dict] = None,
        pos_embed_antialias: bool = False,
    ):
        """
        Args:
            name (str): timm ViT model name.
            out_indices (list[int]): mmseg-style layer indices (-1 = embedding, depth - 1 =
                final normed tokens).
            out_features (list[str]): output names, one per index.
            pretrained (bool): load timm's pretrained weights (downloads; needs network).
            in_chans (int): input channels.
            extra_args (dict): further keyword arguments of ``timm.create_model``.
            pos_embed_antialias (bool): resample the position embedding to other token grids
                with antialiasing (timm's ``dynamic_img_size`` behaviour); False (default):
                mmseg's plain bicubic resampling, which official mmseg checkpoints expect.
        """
        super().__init__()
        if len(out_indices) != len(out_features):
            raise ValueError(
                f"MODEL.TIMM.OUT_INDICES {list(out_indices)} and MODEL.TIMM.OUT_FEATURES "
                f"{list(out_features)} must have the same length"
            )
        if len(set(out_features)) != len(out_features):
            raise ValueError(f"MODEL.TIMM.OUT_FEATURES {list(out_features)} has duplicates")
        if not timm.is_model(name):
            raise ValueError(
                f"MODEL.TIMM.NAME {name!r} is not a timm model (timm {timm.__version__})"
            )
        kwargs = {"dynamic_img_size": True, **(extra_args or {})}
        try:
            model = timm.create_model(
                name, pretrained=pretrained, in_chans=in_chans, num_classes=0, **kwargs
            )
        except TypeError as e:  # e.g. a CNN does not take dynamic_img_size
            raise ValueError(
                f"MODEL.TIMM.NAME {name!r} with MODEL.TIMM.EXTRA_ARGS {extra_args}: timm could not "
                f"build it as a ViT ({e}); for other timm models use MODEL.BACKBONE.NAME "
                "'build_timm_backbone'"
            ) from e
        for attr in ("blocks", "patch_embed", "norm", "_pos_embed"):
            if not hasattr(model, attr):
                raise ValueError(
                    f"MODEL.TIMM.NAME {name!r} is not a plain ViT (no '{attr}'); use "
                    "MODEL.BACKBONE.NAME 'build_timm_backbone' for other timm models"
                )
        depth = len(model.blocks)
        bad = [i for i in out_indices if not -1 <= int(i) < depth]
        if bad:
            raise ValueError(
                f"MODEL.TIMM.OUT_INDICES {list(out_indices)}: {bad} outside [-1, {depth - 1}] "
                f"for {name!r} ({depth} blocks; -1 = the token embedding, {depth - 1} = the "
                "last block + final norm)"
            )
        self.model = model
        self.pos_embed_antialias = bool(pos_embed_antialias)
        self._indices = [int(i) for i in out_indices]
        self._last_needed = max(self._indices)
        self._name = name
        self._patch = _token_stride(model.patch_embed, name)
        self._out_features = list(out_features)
        self._out_feature_channels = {n: int(model.embed_dim) for n in out_features}
        self._out_feature_strides = {n: self._patch for n in out_features}

    @classmethod
    def from_config(cls, cfg, input_shape: Optional[ShapeSpec] = None):
        t = cfg.MODEL.TIMM
        return {
            "name": t.NAME,
            "pretrained": t.PRETRAINED,
            "in_chans": t.IN_CHANS,
            "out_indices": list(t.OUT_INDICES),
            "out_features": list(t.OUT_FEATURES),
            "extra_args": parse_timm_extra_args(t.EXTRA_ARGS),
        }

    @property
    def size_divisibility(self) -> int:
        """The patch size (token stride; 32 for the hybrids): inputs are padded to a whole
        number of patches."""
        return self._patch

    @property
    def is_hybrid(self) -> bool:
        """True for a hybrid ViT (CNN stem + 1x1 projection as the token embedding)."""
        return isinstance(self.model.patch_embed, HybridEmbed)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x (Tensor): (B, IN_CHANS, H, W), H and W multiples of the patch size (token stride)
                p.

        Returns:
            dict[str, Tensor]: name -> (B, D, H / p, W / p) patch tokens of that layer.
        """
        if x.dim() != 4 or x.shape[-2] % self._patch or x.shape[-1] % self._patch:
            raise ValueError(
                f"TimmViTBackbone expects (B, C, H, W) with H, W multiples of the patch size "
                f"{self._patch}; got {tuple(x.shape)} (pad to size_divisibility)"
            )
        m = self.model
        b, h, w = x.shape[0], x.shape[-2] // self._patch, x.shape[-1] // self._patch
        prefix = int(getattr(m, "num_prefix_tokens", 0))
        emb = m.patch_embed(x)  # (B, h, w, D) (dynamic_img_size) or (B, h * w, D)
        if emb.shape[1:-1] not in ((h, w), (h * w,)):
            raise ValueError(
                f"MODEL.TIMM.NAME {self._name!r}: the token embedding of a "
                f"{tuple(x.shape[-2:])} input has {tuple(emb.shape[1:-1])} tokens, expected "
                f"{(h, w)} (token stride {self._patch})"
            )
        tokens = self._embed_positions(emb, h, w)  # (B, prefix + h * w, D)
        tokens = m.patch_drop(tokens)
        tokens = m.norm_pre(tokens)
        found = {}
        if -1 in self._indices:
            found[-1] = tokens
        last = len(m.blocks) - 1
        for i, block in enumerate(m.blocks):
            if i > self._last_needed:
                break
            tokens = block(tokens)
            if i in self._indices:
                found[i] = m.norm(tokens) if i == last else tokens
        out = {}
        for name, i in zip(self._out_features, self._indices):
            t = found[i][:, prefix:]  # (B, h * w, D) patch tokens
            out[name] = t.transpose(1, 2).reshape(b, t.shape[-1], h, w)
        return out

    def _embed_positions(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, h, w, D) or (B, h * w, D) patch embeddings -> (B, prefix + h * w, D) tokens: the
        class / distillation / register tokens prepended and the position embedding, resampled
        to the (h, w) grid (see the module docstring), added; as timm's ``_pos_embed`` otherwise.
        """
        m = self.model
        b, d = x.shape[0], x.shape[-1]
        x = x.reshape(b, h * w, d)
        prefix = [
            t.expand(b, -1, -1)
            for t in (
                getattr(m, "cls_token", None),
                getattr(m, "dist_token", None),  # DeiT distilled (cls, dist)
                getattr(m, "reg_token", None),  # ViT with registers (cls, reg)
            )
            if t is not None
        ]
        if m.pos_embed is None:
            return m.pos_drop(torch.cat(prefix + [x], dim=1))
        pos = resample_abs_pos_embed(
            m.pos_embed,
            new_size=(h, w),
            old_size=m.patch_embed.grid_size,
            num_prefix_tokens=0 if m.no_embed_class else m.num_prefix_tokens,
            interpolation="bicubic",
            antialias=self.pos_embed_antialias,
        )
        if m.no_embed_class:  # the embedding has no entries for the prefix tokens
            x = torch.cat(prefix + [x + pos], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + pos
        return m.pos_drop(x)

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            n: ShapeSpec(
                channels=self._out_feature_channels[n], stride=self._out_feature_strides[n]
            )
            for n in self._out_features
        }


def _token_stride(patch_embed: torch.nn.Module, name: str) -> int:
    """Pixels per token along each side: the patch size of a plain ViT's ``PatchEmbed``; for a
    ``HybridEmbed``, the CNN's reduction (its ``feature_info``, e.g. 32 for ResNetV2 with 4
    stages) times the patch size. Must be one int (square)."""
    if isinstance(patch_embed, HybridEmbed):
        info = getattr(patch_embed.backbone, "feature_info", None)
        if info:
            # timm's own feat_ratio() is img_size // feature size of a dummy forward, which is
            # wrong when EXTRA_ARGS img_size is not a multiple of the reduction
            r = int(info[-1]["reduction"])
            stride = tuple(r * int(p) for p in patch_embed.patch_size)
        else:
            stride = patch_embed.feat_ratio(as_scalar=False)
    else:
        stride = patch_embed.patch_size
    stride = (stride, stride) if isinstance(stride, int) else tuple(int(s) for s in stride)
    if stride[0] != stride[1] or stride[0] < 1:
        raise ValueError(
            f"MODEL.TIMM.NAME {name!r}: token stride {stride} is not square (the backbone pads "
            "inputs to one size_divisibility)"
        )
    return stride[0]


@BACKBONE_REGISTRY.register()
def build_timm_vit_backbone(cfg, input_shape: Optional[ShapeSpec] = None) -> TimmViTBackbone:
    """detectron2 builder: ``MODEL.BACKBONE.NAME: "build_timm_vit_backbone"``."""
    return TimmViTBackbone(cfg, input_shape)
