"""Any timm model as a detectron2 backbone; registered in BACKBONE_REGISTRY as ``build_timm_backbone``.

The model is built with ``timm.create_model(name, features_only=True, out_indices=...)``, so its
forward returns the selected intermediate feature maps; their channels and strides come from timm's
``feature_info``. Config: ``cfg.MODEL.TIMM`` (:mod:`seg_methods.config.timm_backbone`).

State-dict layout: the timm model is the submodule ``model``, so a detectron2 model holds its
weights under ``backbone.model.<timm key>`` (timm's own key names, minus any classifier).
"""

import ast
from typing import Any, Dict, List, Optional, Sequence

import timm
import torch
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, ShapeSpec

__all__ = ["TimmBackbone", "build_timm_backbone", "parse_timm_extra_args", "set_upsample_mode"]

_NORMS = ("", "FrozenBN", "SyncBN")
_REMOTE_NAME_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")
UPSAMPLE_MODES = ("", "nearest", "bilinear", "bilinear_align_corners")


def set_upsample_mode(model: nn.Module, mode: str) -> int:
    """Set the interpolation of every ``nn.Upsample`` in ``model`` (in place).

    Args:
        model (nn.Module): e.g. a timm HRNet, whose branch fusion upsamples with nn.Upsample.
        mode (str): one of :data:`UPSAMPLE_MODES`; "" changes nothing.

    Returns:
        int: the number of layers changed.
    """
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"MODEL.TIMM.UPSAMPLE_MODE must be one of {UPSAMPLE_MODES}, got {mode!r}")
    if not mode:
        return 0
    count = 0
    for m in model.modules():
        if isinstance(m, nn.Upsample):
            if mode == "nearest":
                m.mode, m.align_corners = "nearest", None
            else:
                m.mode, m.align_corners = "bilinear", mode == "bilinear_align_corners"
            count += 1
    return count


def parse_timm_extra_args(items: Sequence[str]) -> Dict[str, Any]:
    """Parse ``MODEL.TIMM.EXTRA_ARGS`` ("key=value" strings) into keyword arguments.

    Args:
        items (list[str]): e.g. ``["feature_location=''", "drop_path_rate=0.1"]``.

    Returns:
        dict[str, Any]: values parsed with :func:`ast.literal_eval` (Python literals only).
    """
    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"MODEL.TIMM.EXTRA_ARGS entry {item!r} is not of the form key=value")
        try:
            kwargs[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError) as e:
            raise ValueError(
                f"MODEL.TIMM.EXTRA_ARGS entry {item!r}: value is not a Python literal ({e})"
            ) from e
    return kwargs


class TimmBackbone(Backbone):
    """A timm ``features_only`` model with named outputs and detectron2 ``ShapeSpec`` s."""

    @configurable
    def __init__(
        self,
        *,
        name: str,
        out_indices: Sequence[int],
        out_features: Sequence[str],
        pretrained: bool = False,
        in_chans: int = 3,
        output_stride: int = 0,
        norm: str = "",
        extra_args: Optional[Dict[str, Any]] = None,
        upsample_mode: str = "",
    ):
        """
        Args:
            name (str): timm model name.
            out_indices (list[int]): indices into the model's ``feature_info``.
            out_features (list[str]): output names, one per index (same order).
            pretrained (bool): load timm's pretrained weights (downloads; needs network).
            in_chans (int): input channels.
            output_stride (int): 0 = model default; else passed to timm (e.g. 8, 16).
            norm (str): "" (timm's BatchNorm), "FrozenBN" or "SyncBN".
            extra_args (dict): further keyword arguments of ``timm.create_model``.
            upsample_mode (str): see :func:`set_upsample_mode`.
        """
        super().__init__()
        if len(out_indices) != len(out_features):
            raise ValueError(
                f"MODEL.TIMM.OUT_INDICES {list(out_indices)} and MODEL.TIMM.OUT_FEATURES "
                f"{list(out_features)} must have the same length"
            )
        if len(set(out_features)) != len(out_features):
            raise ValueError(f"MODEL.TIMM.OUT_FEATURES {list(out_features)} has duplicates")
        if upsample_mode not in UPSAMPLE_MODES:
            raise ValueError(
                f"MODEL.TIMM.UPSAMPLE_MODE must be one of {UPSAMPLE_MODES}, got {upsample_mode!r}"
            )
        if norm not in _NORMS:
            raise ValueError(f"MODEL.TIMM.NORM must be one of {_NORMS}, got {norm!r}")
        # "hf-hub:..." / "local-dir:..." names are resolved by timm itself (pretrained configs)
        if not (timm.is_model(name) or name.startswith(_REMOTE_NAME_PREFIXES)):
            raise ValueError(
                f"MODEL.TIMM.NAME {name!r} is not a timm model (timm {timm.__version__}; "
                "see timm.list_models())"
            )
        kwargs = dict(extra_args or {})
        if output_stride:
            kwargs["output_stride"] = int(output_stride)
        try:
            self.model = timm.create_model(
                name,
                pretrained=pretrained,
                features_only=True,
                out_indices=tuple(int(i) for i in out_indices),
                in_chans=in_chans,
                **kwargs,
            )
        except (TypeError, AssertionError) as e:  # timm's reaction to unsupported arguments
            raise ValueError(
                f"timm could not build MODEL.TIMM.NAME {name!r} with MODEL.TIMM.OUT_INDICES "
                f"{list(out_indices)}, IN_CHANS {in_chans} and the arguments {kwargs} "
                f"(MODEL.TIMM.OUTPUT_STRIDE / MODEL.TIMM.EXTRA_ARGS): {type(e).__name__}: {e}"
            ) from e
        if norm == "FrozenBN":
            self.model = timm.layers.freeze_batch_norm_2d(self.model)
        elif norm == "SyncBN":
            self.model = timm.layers.convert_sync_batchnorm(self.model)

        changed = set_upsample_mode(self.model, upsample_mode)
        if upsample_mode and not changed:
            raise ValueError(
                f"MODEL.TIMM.UPSAMPLE_MODE={upsample_mode!r} but timm model {name!r} has no "
                "nn.Upsample layer"
            )

        info = self.model.feature_info
        channels, reductions = info.channels(), info.reduction()
        if len(channels) != len(out_features):  # timm silently dedups / clips in some models
            raise ValueError(
                f"timm model {name!r} returned {len(channels)} features for MODEL.TIMM.OUT_INDICES "
                f"{list(out_indices)}"
            )
        self._out_features = list(out_features)
        self._out_feature_channels = dict(zip(self._out_features, channels))
        self._out_feature_strides = dict(zip(self._out_features, reductions))
        self._size_divisibility = max(reductions)

    @classmethod
    def from_config(cls, cfg, input_shape: Optional[ShapeSpec] = None):
        t = cfg.MODEL.TIMM
        in_chans = t.IN_CHANS
        return {
            "name": t.NAME,
            "pretrained": t.PRETRAINED,
            "in_chans": in_chans,
            "output_stride": t.OUTPUT_STRIDE,
            "out_indices": list(t.OUT_INDICES),
            "out_features": list(t.OUT_FEATURES),
            "norm": t.NORM,
            "extra_args": parse_timm_extra_args(t.EXTRA_ARGS),
            "upsample_mode": t.UPSAMPLE_MODE,
        }

    @property
    def size_divisibility(self) -> int:
        """Largest stride of the returned features (HRNet's fusion needs sizes divisible by it)."""
        return self._size_divisibility

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x (Tensor): (N, IN_CHANS, H, W); H and W multiples of ``size_divisibility`` for
                models (e.g. HRNet) whose branches must line up.

        Returns:
            dict[str, Tensor]: name -> (N, C_i, H / s_i, W / s_i), C_i and s_i as in
            :meth:`output_shape`.
        """
        if x.dim() != 4:
            raise ValueError(f"TimmBackbone expects (N, C, H, W) input, got {tuple(x.shape)}")
        feats: List[torch.Tensor] = self.model(x)
        return dict(zip(self._out_features, feats))

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }


@BACKBONE_REGISTRY.register()
def build_timm_backbone(cfg, input_shape: ShapeSpec) -> TimmBackbone:
    """Build ``cfg.MODEL.TIMM`` as a :class:`TimmBackbone`.

    ``input_shape.channels`` (from ``MODEL.PIXEL_MEAN``) must agree with ``MODEL.TIMM.IN_CHANS``.
    """
    if input_shape is not None and input_shape.channels != cfg.MODEL.TIMM.IN_CHANS:
        raise ValueError(
            f"MODEL.TIMM.IN_CHANS={cfg.MODEL.TIMM.IN_CHANS} but MODEL.PIXEL_MEAN has "
            f"{input_shape.channels} channels"
        )
    return TimmBackbone(cfg, input_shape)
