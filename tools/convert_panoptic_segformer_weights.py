#!/usr/bin/env python
"""Convert an official Panoptic SegFormer checkpoint (mmdet 2.12 .pth) to a .pth seg_methods loads.

Usage:
    python tools/convert_panoptic_segformer_weights.py panoptic_segformer_r50_2x.pth psf_r50.pth
    # check the result against the model a config builds (keys and shapes):
    C=configs/coco/panoptic-segmentation/panoptic_segformer/panoptic_segformer_R50_bs8_24ep.yaml
    python tools/convert_panoptic_segformer_weights.py IN.pth OUT.pth --config-file $C

The input is read safely (``torch.load(weights_only=True)``; NaN/Inf weights are refused). The
official names (``easymd/models/panformer/``, mmcv's transformer bricks, mmdet's ResNet and
ChannelMapper) are mapped to ours by :data:`RULES`; three kinds of tensors change besides names:

* **Level order.** The official encoder orders its 4 levels from fine to coarse (1/8 ... 1/64),
  the shared encoder from coarse to fine: ``level_embeds`` rows, and the level axis of every
  deformable attention's ``sampling_offsets`` / ``attention_weights`` (encoder and location
  decoder), are reversed, as are the ChannelMapper's input projections.
* **Projection biases.** The ChannelMapper's 1x1 convs have no bias (GroupNorm follows); our
  ``input_proj`` convs get a zero bias (identical outputs).
* **Dropped** (listed when converting): the mask decoder's ``reg_branches2`` and
  ``cls_thing_branches``, whose losses the official code multiplies by 0 and which inference
  never uses, and BatchNorm ``num_batches_tracked`` counters.

Backbones: mmdet ResNet -> detectron2 ResNet names; Swin keeps its names under ``backbone.``
(the official Swin has no output norm ``norm0`` for its unused first stage; an identity one is
added, since ours always has ``norm0``..``norm3``); PVTv2 (official ``pvt_v2.py``, the original PVT layout) goes through timm's own
``checkpoint_filter_fn`` to timm's names under ``backbone.model.``.
"""

import argparse
import os
import re
import sys
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from seg_methods.utils.checkpoint import (  # noqa: E402
    load_checkpoint_file,
    save_converted_checkpoint,
    strip_common_prefix,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from convert_mask2former_weights import (  # noqa: E402  (the shared key / shape check)
    build_model_from_config,
    compare_with_model,
)

_HEAD = "sem_seg_head.predictor."
_ENC = "sem_seg_head.pixel_decoder."

# (official-name pattern, our name). Applied in order; the first full match wins.
RULES: List[Tuple[str, str]] = [
    # ---- mmdet ResNet -> detectron2 ResNet
    (r"backbone\.conv1\.weight", r"backbone.stem.conv1.weight"),
    (r"backbone\.bn1\.(.+)", r"backbone.stem.conv1.norm.\1"),
    (r"backbone\.layer(\d)\.(\d+)\.conv(\d)\.weight", r"backbone.res<\1>.\2.conv\3.weight"),
    (r"backbone\.layer(\d)\.(\d+)\.bn(\d)\.(.+)", r"backbone.res<\1>.\2.conv\3.norm.\4"),
    (r"backbone\.layer(\d)\.(\d+)\.downsample\.0\.weight", r"backbone.res<\1>.\2.shortcut.weight"),
    (r"backbone\.layer(\d)\.(\d+)\.downsample\.1\.(.+)", r"backbone.res<\1>.\2.shortcut.norm.\3"),
    # ---- ChannelMapper -> the shared encoder's input projections (level index fixed later)
    (r"neck\.convs\.(\d+)\.conv\.weight", _ENC + r"input_proj.<L\1>.0.weight"),
    (r"neck\.convs\.(\d+)\.gn\.(weight|bias)", _ENC + r"input_proj.<L\1>.1.\2"),
    (r"neck\.extra_convs\.(\d+)\.conv\.(weight|bias)", _ENC + r"extra_proj.\1.0.\2"),
    (r"neck\.extra_convs\.(\d+)\.gn\.(weight|bias)", _ENC + r"extra_proj.\1.1.\2"),
    # ---- encoder (mmcv BaseTransformerLayer: self_attn, norm, ffn, norm)
    (r"bbox_head\.transformer\.level_embeds", _ENC + "transformer.level_embed"),
    (
        r"bbox_head\.transformer\.encoder\.layers\.(\d+)\.attentions\.0\.(.+)",
        _ENC + r"transformer.encoder.layers.\1.self_attn.\2",
    ),
    (
        r"bbox_head\.transformer\.encoder\.layers\.(\d+)\.norms\.(\d)\.(.+)",
        _ENC + r"transformer.encoder.layers.\1.norm<+\2>.\3",
    ),
    (
        r"bbox_head\.transformer\.encoder\.layers\.(\d+)\.ffns\.0\.layers\.0\.0\.(.+)",
        _ENC + r"transformer.encoder.layers.\1.linear1.\2",
    ),
    (
        r"bbox_head\.transformer\.encoder\.layers\.(\d+)\.ffns\.0\.layers\.1\.(.+)",
        _ENC + r"transformer.encoder.layers.\1.linear2.\2",
    ),
    # ---- location decoder (self_attn, norm, cross_attn, norm, ffn, norm)
    (r"bbox_head\.transformer\.reference_points\.(.+)", _HEAD + r"reference_points.\1"),
    (
        r"bbox_head\.transformer\.decoder\.layers\.(\d+)\.attentions\.0\.attn\.(.+)",
        _HEAD + r"layers.\1.self_attn.self_attn.\2",
    ),
    (
        r"bbox_head\.transformer\.decoder\.layers\.(\d+)\.attentions\.1\.(.+)",
        _HEAD + r"layers.\1.cross_attn.\2",
    ),
    (
        r"bbox_head\.transformer\.decoder\.layers\.(\d+)\.norms\.0\.(.+)",
        _HEAD + r"layers.\1.self_attn.norm.\2",
    ),
    (
        r"bbox_head\.transformer\.decoder\.layers\.(\d+)\.norms\.1\.(.+)",
        _HEAD + r"layers.\1.cross_norm.\2",
    ),
    (
        r"bbox_head\.transformer\.decoder\.layers\.(\d+)\.norms\.2\.(.+)",
        _HEAD + r"layers.\1.ffn.norm.\2",
    ),
    (
        r"bbox_head\.transformer\.decoder\.layers\.(\d+)\.ffns\.0\.layers\.0\.0\.(.+)",
        _HEAD + r"layers.\1.ffn.linear1.\2",
    ),
    (
        r"bbox_head\.transformer\.decoder\.layers\.(\d+)\.ffns\.0\.layers\.1\.(.+)",
        _HEAD + r"layers.\1.ffn.linear2.\2",
    ),
    # ---- queries and prediction branches
    (r"bbox_head\.query_embedding\.weight", _HEAD + "query_embed.weight"),
    (r"bbox_head\.stuff_query\.weight", _HEAD + "stuff_query.weight"),
    (r"bbox_head\.cls_branches\.(\d+)\.(.+)", _HEAD + r"class_embed.\1.\2"),
    (r"bbox_head\.reg_branches\.(\d+)\.(\d)\.(.+)", _HEAD + r"bbox_embed.\1.layers.<H\2>.\3"),
    (r"bbox_head\.cls_stuff_branches\.(\d+)\.(.+)", _HEAD + r"stuff_class_embed.\1.\2"),
    # ---- mask decoders (things_mask_head / stuff_mask_head)
    (r"bbox_head\.(things|stuff)_mask_head\.(.+)", r"<M\1>.\2"),
]

# mask-decoder sub-names (after the decoder prefix)
MASK_RULES: List[Tuple[str, str]] = [
    (r"blocks\.(\d+)\.attn\.q\.(.+)", r"blocks.\1.attn.q_proj.\2"),
    (r"blocks\.(\d+)\.attn\.k\.(.+)", r"blocks.\1.attn.k_proj.\2"),
    (r"blocks\.(\d+)\.attn\.v\.(.+)", r"blocks.\1.attn.v_proj.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(.+)", r"blocks.\1.attn.out_proj.\2"),
    (r"blocks\.(\d+)\.attn\.linear_l(\d)\.0\.(.+)", r"blocks.\1.attn.level_fc.<-\2>.\3"),
    (r"blocks\.(\d+)\.attn\.linear\.0\.(.+)", r"blocks.\1.attn.mask_fc.\2"),
    (r"blocks\.(\d+)\.head_norm1\.(.+)", r"blocks.\1.norm1.\2"),
    (r"blocks\.(\d+)\.head_norm2\.(.+)", r"blocks.\1.norm2.\2"),
    (r"blocks\.(\d+)\.norm3\.(.+)", r"blocks.\1.norm_self.\2"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(.+)", r"blocks.\1.mlp.layers.0.\2"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(.+)", r"blocks.\1.mlp.layers.1.\2"),
    (r"blocks\.(\d+)\.self_attention\.(qkv|proj)\.(.+)", r"blocks.\1.self_attn.\2.\3"),
    (r"attnen\.q\.(.+)", r"tail.q_proj.\1"),
    (r"attnen\.k\.(.+)", r"tail.k_proj.\1"),
    (r"attnen\.linear_l(\d)\.0\.(.+)", r"tail.level_fc.<-\1>.\2"),
    (r"attnen\.linear\.0\.(.+)", r"tail.mask_fc.\1"),
]

# official tensors that are deliberately not converted (module docstring)
DROPPED = [
    r"bbox_head\.reg_branches2\..+",
    r"bbox_head\.cls_thing_branches\..+",
    r".+\.num_batches_tracked",
]


def _resolve(name: str, num_inputs: int) -> str:
    """Apply the arithmetic placeholders the rules leave in ``name``."""
    name = re.sub(r"<(\d)>", lambda m: str(int(m.group(1)) + 1), name)  # layerN -> res(N+1)
    name = re.sub(r"<L(\d+)>", lambda m: str(num_inputs - 1 - int(m.group(1))), name)
    name = re.sub(r"<\+(\d)>", lambda m: str(int(m.group(1)) + 1), name)  # norms.i -> norm(i+1)
    name = re.sub(r"<H(\d)>", lambda m: str(int(m.group(1)) // 2), name)  # Sequential 0,2,4
    name = re.sub(r"<-(\d)>", lambda m: str(int(m.group(1)) - 1), name)  # linear_l1 -> 0
    name = name.replace("<Mthings>", _HEAD + "thing_mask_decoder")
    name = name.replace("<Mstuff>", _HEAD + "stuff_mask_decoder")
    return name


def convert_key(key: str, num_inputs: int = 3) -> Optional[str]:
    """Our name of an official (head / neck / ResNet / Swin) tensor, or None when dropped.

    Args:
        key (str): official name (``module.`` already stripped).
        num_inputs (int): backbone levels fed to the ChannelMapper (3).

    Raises:
        KeyError: an official name no rule knows.
    """
    if any(re.fullmatch(p, key) for p in DROPPED):
        return None
    for pattern, repl in RULES:
        m = re.fullmatch(pattern, key)
        if m is None:
            continue
        new = m.expand(repl)
        if new.startswith("<M"):
            prefix, rest = new.split(".", 1)
            for mp, mr in MASK_RULES:
                mm = re.fullmatch(mp, rest)
                if mm is not None:
                    return _resolve(prefix + "." + mm.expand(mr), num_inputs)
            raise KeyError(f"no rule for mask-decoder tensor {key!r}")
        return _resolve(new, num_inputs)
    if key.startswith("backbone."):  # Swin (same names as D2SwinTransformer)
        return key
    raise KeyError(f"no rule for official tensor {key!r}")


def _flip_levels(t: torch.Tensor, heads: int, levels: int, last: int) -> torch.Tensor:
    """Reverse the level axis of a (heads * levels * points * last [, C]) tensor."""
    shape = t.shape
    v = t.reshape(heads, levels, -1, last, *shape[1:])
    return v.flip(1).reshape(shape)


def level_transform(key: str, heads: int, levels: int) -> Optional[Callable]:
    """The tensor transform that reverses the level order of ``key`` (an involution), if any."""
    if key.endswith("level_embed"):
        return lambda t: t.flip(0)
    if ".sampling_offsets." in key:
        return lambda t: _flip_levels(t, heads, levels, 2)
    if ".attention_weights." in key:
        return lambda t: _flip_levels(t, heads, levels, 1)
    return None


def convert_state_dict(
    state: Dict[str, object], *, heads: int = 8, levels: int = 4, num_inputs: int = 3
) -> Tuple[Dict[str, torch.Tensor], Dict[str, str], List[str]]:
    """Official Panoptic SegFormer state dict -> ours.

    Args:
        state (dict): official name -> ndarray / Tensor.
        heads (int): heads of the deformable attentions (8).
        levels (int): encoder levels (4).
        num_inputs (int): backbone levels into the ChannelMapper (3).

    Returns:
        tuple: (our name -> Tensor, our name -> official name, dropped official names).
    """
    state = strip_common_prefix(state, "module.")
    if any(k.startswith("backbone.patch_embed1.") for k in state):  # PVTv2 (original layout)
        state = _pvt_to_timm(state)
    out: Dict[str, torch.Tensor] = {}
    origin: Dict[str, str] = {}
    dropped: List[str] = []
    for k, v in state.items():
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(np.ascontiguousarray(v))
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"'{k}' holds a {type(v).__name__}, not an array or tensor")
        new = k if k.startswith("backbone.model.") else convert_key(k, num_inputs)
        if new is None:
            dropped.append(k)
            continue
        if new in out:
            raise ValueError(f"official tensors {origin[new]!r} and {k!r} both map to {new!r}")
        fn = level_transform(new, heads, levels)
        out[new] = fn(v) if fn is not None else v
        origin[new] = k
    _add_unused_swin_norms(out)
    # zero biases of the bias-free ChannelMapper convs
    for name in list(out):
        m = re.fullmatch(re.escape(_ENC) + r"(input_proj|extra_proj)\.(\d+)\.0\.weight", name)
        if m and name[: -len("weight")] + "bias" not in out:
            out[name[: -len("weight")] + "bias"] = out[name].new_zeros(out[name].shape[0])
    return out, origin, dropped


def _add_unused_swin_norms(out: Dict[str, torch.Tensor]) -> None:
    """Identity LayerNorms ``backbone.norm{i}`` for Swin stages that are not outputs (in place).

    The official Swin builds an output norm only for its ``out_indices`` (1, 2, 3): no
    ``norm0``; our ``D2SwinTransformer`` always has ``norm0``..``norm3`` (checkpoint key set) and
    uses only those of ``OUT_FEATURES``, so the missing ones get weight 1, bias 0 (never used).
    """
    i = 0
    while f"backbone.layers.{i}.blocks.0.norm1.weight" in out:
        ch = out[f"backbone.layers.{i}.blocks.0.norm1.weight"].shape[0]
        ref = out[f"backbone.layers.{i}.blocks.0.norm1.weight"]
        if f"backbone.norm{i}.weight" not in out:
            out[f"backbone.norm{i}.weight"] = ref.new_ones(ch)
            out[f"backbone.norm{i}.bias"] = ref.new_zeros(ch)
        i += 1


def to_official(
    ours: Dict[str, torch.Tensor], origin: Dict[str, str], *, heads: int = 8, levels: int = 4
) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`convert_state_dict` on the converted tensors (for round-trip checks)."""
    out = {}
    for name, official in origin.items():
        fn = level_transform(name, heads, levels)
        out[official] = fn(ours[name]) if fn is not None else ours[name]
    return out


def _pvt_to_timm(state: Dict[str, object]) -> Dict[str, object]:
    """Official PVTv2 backbone tensors -> timm's names under ``backbone.model.`` (timm's own
    ``checkpoint_filter_fn``); the other tensors are returned unchanged."""
    from timm.models.pvt_v2 import checkpoint_filter_fn

    backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    rest = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    converted = checkpoint_filter_fn(
        {k: torch.as_tensor(v) for k, v in backbone.items()}, model=None
    )
    for k, v in converted.items():
        if k.startswith("head."):  # classifier: not part of the backbone
            continue
        # timm's features_only wrapper flattens ``stages.i`` into ``stages_i``
        rest["backbone.model." + re.sub(r"^stages\.(\d+)\.", r"stages_\1.", k)] = v
    return rest


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("input", help="official Panoptic SegFormer checkpoint (.pth)")
    parser.add_argument("output", help="file to write (.pth)")
    parser.add_argument("--config-file", default="", help="check keys/shapes against this model")
    parser.add_argument("opts", nargs="*", help="config overrides (KEY VALUE ...)")
    # intermixed: with a REMAINDER positional, a --config-file given after IN OUT (the usage
    # above) was swallowed into opts and the check silently skipped
    args = parser.parse_intermixed_args(argv)
    if not args.output.endswith(".pth"):
        parser.error("the output must end with .pth")
    data = load_checkpoint_file(args.input)
    state = data["model"]
    if isinstance(state.get("state_dict"), dict):  # mmcv checkpoint: {"meta", "state_dict", ...}
        state = state["state_dict"]
    ours, _, dropped = convert_state_dict(state)
    print(f"{len(ours)} tensors converted from {args.input}; {len(dropped)} dropped:")
    for k in dropped:
        print(f"  dropped: {k}")
    if args.config_file:
        model = build_model_from_config(args.config_file, args.opts)
        missing, unexpected, mismatched = compare_with_model(ours, model)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        print(f"{len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} mismatched")
        for k in missing + unexpected:
            print(f"  {'missing' if k in missing else 'unexpected'}: {k}")
        for k, a, b in mismatched:
            print(f"  shape mismatch: {k}: {a} in checkpoint, {b} in model")
        if missing or unexpected or mismatched:
            print(f"not writing {args.output}: the checkpoint does not fit the model")
            return 1
    author = f"Panoptic SegFormer (official) from {os.path.basename(args.input)}, converted"
    save_converted_checkpoint(ours, args.output, author)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
