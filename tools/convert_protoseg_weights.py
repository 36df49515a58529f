#!/usr/bin/env python
"""Convert an official ProtoSeg HRNet-W48 checkpoint (openseg format) to seg_methods' layout.

Usage::

    python tools/convert_protoseg_weights.py hrnet_w48_proto_lr1x_hrnet_proto_80k_latest.pth \
        protoseg_hrnet_w48_cityscapes.pth
    # optionally check keys and shapes against the model a config builds:
    python tools/convert_protoseg_weights.py IN.pth OUT.pth --config-file \
        configs/cityscapes/semantic-segmentation/protoseg/protoseg_hrnet_w48_bs8_80k_official_weights.yaml

Input: what the official trainer saves (tfzhou/ProtoSeg ``segmentor/tools/module_runner.py``
``save_net``): ``{"config_dict": ..., "state_dict": model.state_dict()}`` of the DDP-wrapped
``HRNet_W48_Proto`` (keys prefixed ``module.``); a bare state dict or ``{"model": ...}`` is
accepted too. It is read with ``torch.load(weights_only=True)`` (``seg_methods.utils.checkpoint``);
a file that needs anything else to load, or holds NaN/Inf weights, is refused.

Mapping (official ``HRNet_W48_Proto`` -> our ``ProtoSeg`` with the timm HRNet backbone and
``HRNetV2Head``):

=================================  ====================================================
official                            ours
=================================  ====================================================
``backbone.<k>``                    ``backbone.model.<k>`` (timm's HRNet uses the same names)
``cls_head.0.{weight,bias}``        ``sem_seg_head.fuse.{weight,bias}`` (3x3 conv)
``cls_head.1.0.<bn>``               ``sem_seg_head.fuse.norm.<bn>`` (its BatchNorm)
``proj_head.proj.{0,2}.<p>``        ``projection.{0,2}.<p>``
``proj_head.mlp2.*``                dropped after checking it equals ``proj_head.proj.*``
                                    (the official module is registered under both names)
``feat_norm.*``                     ``feature_norm.*``
``mask_norm.*``                     ``logits_norm.*``
``prototypes``                      ``prototypes`` (L2-normalised over D, as the official
                                    forward does before using them)
=================================  ====================================================

Any other key (e.g. the ImageNet head ``backbone.incre_modules`` of ``keep_imagenet_head``, or a
model other than ``HRNet_W48_Proto``) is refused, as is a checkpoint missing one of the head keys.
With ``--config-file`` the converted keys and shapes must equal those of the built model exactly.

To reproduce the official logits, evaluate with
``configs/cityscapes/semantic-segmentation/protoseg/protoseg_hrnet_w48_bs8_80k_official_weights.yaml``
(projection L2 over the width, BGR input), see projects/ProtoSeg/README.md;
tools/compare_with_official_protoseg.py proves the mapping numerically.
"""

import argparse
import os
import re
import sys
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from seg_methods.config import get_cfg  # noqa: E402
from seg_methods.utils.checkpoint import (  # noqa: E402
    check_finite_weights,
    save_converted_checkpoint,
    strip_common_prefix,
    torch_load_weights_only,
)

__all__ = ["ConversionError", "convert", "load_official_state", "main"]

# (pattern on the official key, replacement); the first match wins.
RENAMES = [
    (r"^backbone\.(?!incre_modules\.|downsamp_modules\.|final_layer\.)", "backbone.model."),
    (r"^cls_head\.0\.(weight|bias)$", r"sem_seg_head.fuse.\1"),
    (
        r"^cls_head\.1\.0\.(weight|bias|running_mean|running_var|num_batches_tracked)$",
        r"sem_seg_head.fuse.norm.\1",
    ),
    (r"^proj_head\.proj\.([02])\.(weight|bias)$", r"projection.\1.\2"),
    (r"^feat_norm\.(weight|bias)$", r"feature_norm.\1"),
    (r"^mask_norm\.(weight|bias)$", r"logits_norm.\1"),
    (r"^prototypes$", "prototypes"),
]
ALIAS_PREFIX = ("proj_head.mlp2.", "proj_head.proj.")  # same module registered twice
REQUIRED = (
    "cls_head.0.weight",
    "cls_head.0.bias",
    "cls_head.1.0.weight",
    "cls_head.1.0.running_var",
    "proj_head.proj.0.weight",
    "proj_head.proj.2.weight",
    "feat_norm.weight",
    "mask_norm.weight",
    "prototypes",
    "backbone.conv1.weight",
)


class ConversionError(ValueError):
    """The checkpoint is not an official ProtoSeg HRNet checkpoint we can map."""


def load_official_state(path: str) -> Dict[str, torch.Tensor]:
    """Read an official checkpoint safely and return its state dict (``module.`` stripped).

    Args:
        path (str): the official ``.pth``.

    Returns:
        dict[str, Tensor]: official key -> tensor.
    """
    loaded = torch_load_weights_only(path)
    if not isinstance(loaded, dict):
        raise ConversionError(f"'{path}' holds a {type(loaded).__name__}, expected a dict")
    for key in ("state_dict", "model"):
        if key in loaded and isinstance(loaded[key], dict):
            loaded = loaded[key]
            break
    state = strip_common_prefix(dict(loaded), "module.")
    for k, v in state.items():
        if isinstance(v, np.ndarray):
            state[k] = torch.from_numpy(np.ascontiguousarray(v))
        elif not isinstance(state[k], torch.Tensor):
            raise ConversionError(f"'{path}': '{k}' holds a {type(v).__name__}, not a tensor")
    check_finite_weights(state, path)
    return state


def convert(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map an official ``HRNet_W48_Proto`` state dict to our ``ProtoSeg`` keys.

    Args:
        state (dict[str, Tensor]): official keys (without ``module.``).

    Returns:
        dict[str, Tensor]: our keys (see the module docstring).

    Raises:
        ConversionError: unknown keys, missing head keys, or a mismatched alias.
    """
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise ConversionError(
            f"not an official ProtoSeg HRNet checkpoint: missing {missing} "
            f"(it has {len(state)} keys, e.g. {sorted(state)[:5]})"
        )
    out: Dict[str, torch.Tensor] = {}
    unknown: List[str] = []
    for k, v in state.items():
        if k.startswith(ALIAS_PREFIX[0]):
            twin = ALIAS_PREFIX[1] + k[len(ALIAS_PREFIX[0]) :]
            if twin not in state or not torch.equal(state[twin], v):
                raise ConversionError(f"'{k}' differs from (or lacks) its alias '{twin}'")
            continue
        new: Optional[str] = None
        for pattern, repl in RENAMES:
            if re.search(pattern, k):
                new = re.sub(pattern, repl, k)
                break
        if new is None:
            unknown.append(k)
            continue
        if new == "prototypes":
            if v.dim() != 3:
                raise ConversionError(
                    f"'prototypes' has shape {tuple(v.shape)}, expected (C, M, D)"
                )
            v = F.normalize(v.float(), dim=-1)
        if new in out:
            raise ConversionError(f"two official keys map to '{new}'")
        out[new] = v
    if unknown:
        raise ConversionError(
            f"{len(unknown)} official key(s) have no counterpart in our ProtoSeg HRNet model: "
            f"{unknown[:20]}{' ...' if len(unknown) > 20 else ''}"
        )
    return out


def check_against_config(converted: Dict[str, torch.Tensor], config_file: str, opts=()) -> None:
    """Build the model of ``config_file`` (random init, CPU) and require the same keys/shapes.

    Raises:
        ConversionError: listing the missing, unexpected and mis-shaped keys.
    """
    cfg = get_cfg()
    cfg.merge_from_file(config_file, allow_unsafe=False)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.TIMM.NORM = ""  # SyncBN and BN share their state-dict keys; build plain BN here
    cfg.MODEL.SEM_SEG_HEAD.NORM = "BN"
    ours = build_model(cfg).state_dict()
    ours = {k: v for k, v in ours.items() if k not in ("pixel_mean", "pixel_std")}
    missing = sorted(set(ours) - set(converted))
    unexpected = sorted(set(converted) - set(ours))
    shapes = [
        f"{k}: ours {tuple(ours[k].shape)} vs converted {tuple(converted[k].shape)}"
        for k in set(ours) & set(converted)
        if ours[k].shape != converted[k].shape
    ]
    if missing or unexpected or shapes:
        raise ConversionError(
            f"converted weights do not match the model of {config_file}: missing {missing[:20]}, "
            f"unexpected {unexpected[:20]}, shape mismatches {shapes[:20]}"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("input", help="official ProtoSeg checkpoint (.pth)")
    parser.add_argument("output", help="converted checkpoint (.pth) for MODEL.WEIGHTS")
    parser.add_argument("--config-file", help="check keys/shapes against this config's model")
    parser.add_argument("opts", nargs="*", default=[], help="config overrides (KEY VALUE ...)")
    # intermixed: a REMAINDER positional swallowed a --config-file written after IN OUT (the
    # documented usage), so the key / shape check silently never ran
    args = parser.parse_intermixed_args(argv)
    converted = convert(load_official_state(args.input))
    if args.config_file:
        check_against_config(converted, args.config_file, args.opts)
    save_converted_checkpoint(converted, args.output, "tfzhou/ProtoSeg (converted)")
    print(f"wrote {len(converted)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
