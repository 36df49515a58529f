#!/usr/bin/env python
"""Convert an official RegProxy checkpoint (YiF-Zhang/RegionProxy, mmseg 0.17) to our layout.

Usage::

    python tools/convert_regproxy_weights.py regproxy-s16-ade20k.pth regproxy_s16_ade20k.pth
    # then, e.g.
    python train_net.py --eval-only \\
        --config-file configs/ade20k/semantic-segmentation/regproxy/regproxy_vit_s16_bs16_160k.yaml \\
        MODEL.WEIGHTS regproxy_s16_ade20k.pth

The official checkpoint is an mmcv checkpoint whose ``state_dict`` holds the mmseg
``VisionTransformer`` (``backbone.*``) and the ``ProxyHead`` (``decode_head.*``). Keys are mapped
one-to-one (the inverse of the official ``utils/checkpoint.py::convert_vit``, which maps timm to
mmseg names), with no reshuffling of values (our head keeps the official channel layout)::

    backbone.patch_embed.projection.*        -> backbone.model.patch_embed.proj.*
    backbone.{cls_token,dist_token,pos_embed}-> backbone.model.{cls_token,dist_token,pos_embed}
    backbone.layers.i.ln1 / ln2              -> backbone.model.blocks.i.norm1 / norm2
    backbone.layers.i.attn.attn.in_proj_*    -> backbone.model.blocks.i.attn.qkv.*
    backbone.layers.i.attn.attn.out_proj.*   -> backbone.model.blocks.i.attn.proj.*
    backbone.layers.i.ffn.layers.0.0.*       -> backbone.model.blocks.i.mlp.fc1.*
    backbone.layers.i.ffn.layers.1.*         -> backbone.model.blocks.i.mlp.fc2.*
    backbone.ln1.*                           -> backbone.model.norm.*   (final norm)
    decode_head.affinity_head.0.depthwise_conv.{conv,bn}.* -> sem_seg_head.depthwise.{,norm.}*
    decode_head.affinity_head.0.pointwise_conv.{conv,bn}.* -> sem_seg_head.pointwise.{,norm.}*
    decode_head.affinity_head.1.conv.*       -> sem_seg_head.predictor.*
    decode_head.mlp.0.0.*                    -> sem_seg_head.classifier.*

The hybrid models (R26+ViT-S/32, R50+ViT-L/32; official ``VisionTransformerHybrid``) replace
``patch_embed`` by timm's ``HybridEmbed`` around timm's ResNetV2 (the official code builds it
with timm's own ``_resnetv2`` helper), so their stem already has timm's layout and keeps its
names under our timm model (``MODEL.TIMM.NAME`` ``vit_small_r26_s32_*`` /
``vit_large_r50_s32_*``); every other key is the plain ViT's above::

    backbone.patch_embed.backbone.stem.{conv,norm}.*
        -> backbone.model.patch_embed.backbone.stem.{conv,norm}.*
    backbone.patch_embed.backbone.stages.s.blocks.b.{conv1..3,norm1..3,downsample.{conv,norm}}.*
        -> backbone.model.patch_embed.backbone.stages.s.blocks.b.(same)
    backbone.patch_embed.proj.*  -> backbone.model.patch_embed.proj.*  (the 1x1 projection)

(The official ``use_origin=False`` variant, an mmseg ``ResNet`` stem that no official config
selects, has other keys and is refused.) Any other key is refused (listed), as is a key that
would be produced twice. ``--img-size H W`` resamples the position embedding (bicubic, as
mmseg's ``resize_pos_embed``) to the token grid of that training size (patch 16, or the hybrid
stem's reduction: 32 for the 4-stage ResNetV2), which must then equal ``MODEL.TIMM.EXTRA_ARGS``
``img_size``.

The input is read with ``torch.load(weights_only=True)`` (refused, naming the file, if it needs
anything else) and NaN/Inf weights are refused. The output is ``{"model": state_dict}`` for
``MODEL.WEIGHTS``.

What was checked: tools/compare_with_official_regproxy.py builds the official segmentor (mmseg
0.17, the official ``models/``) from each official ViT/16 config, gives it random weights, saves it
with mmcv's ``save_checkpoint``, converts that file with this script's ``main`` and loads it
strictly into our model from the matching config: tokens, logits and whole-image / sliding-window
predictions agree to float32 rounding (numbers in projects/RegProxy/README.md;
tests/modeling/test_regproxy_official_parity.py runs a small version when the official code is
available). tests/modeling/test_regproxy.py checks the key mapping round trip without it.
"""

import argparse
import os
import re
import sys
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from seg_methods.utils.checkpoint import (  # noqa: E402
    check_finite_weights,
    save_converted_checkpoint,
    strip_common_prefix,
    torch_load_weights_only,
)

__all__ = ["convert_key", "convert_state_dict", "resize_pos_embed", "token_stride", "main"]

_BLOCK_RULES = (
    (re.compile(r"^ln1\.(.+)$"), r"norm1.\1"),
    (re.compile(r"^ln2\.(.+)$"), r"norm2.\1"),
    (re.compile(r"^attn\.attn\.in_proj_(weight|bias)$"), r"attn.qkv.\1"),
    (re.compile(r"^attn\.attn\.out_proj\.(.+)$"), r"attn.proj.\1"),
    (re.compile(r"^ffn\.layers\.0\.0\.(.+)$"), r"mlp.fc1.\1"),
    (re.compile(r"^ffn\.layers\.1\.(.+)$"), r"mlp.fc2.\1"),
)
# timm ResNetV2 (non-pre-activation, as timm's _resnetv2 builds it for the hybrids) parameters
_HYBRID_STEM_KEY = re.compile(
    r"^patch_embed\.backbone\.(stem\.(conv|norm)\.(weight|bias)"
    r"|stages\.\d+\.blocks\.\d+\.(conv[123]|norm[123]|downsample\.(conv|norm))\.(weight|bias))$"
)
_HEAD_RULES = (
    (re.compile(r"^affinity_head\.0\.depthwise_conv\.conv\.(.+)$"), r"depthwise.\1"),
    (re.compile(r"^affinity_head\.0\.depthwise_conv\.bn\.(.+)$"), r"depthwise.norm.\1"),
    (re.compile(r"^affinity_head\.0\.pointwise_conv\.conv\.(.+)$"), r"pointwise.\1"),
    (re.compile(r"^affinity_head\.0\.pointwise_conv\.bn\.(.+)$"), r"pointwise.norm.\1"),
    (re.compile(r"^affinity_head\.1\.conv\.(.+)$"), r"predictor.\1"),
    (re.compile(r"^mlp\.0\.0\.(.+)$"), r"classifier.\1"),
)


def convert_key(key: str) -> Optional[str]:
    """Our name of one official key, or None if the key is not part of the known layout."""
    if key.startswith("backbone."):
        k = key[len("backbone.") :]
        if k in ("cls_token", "dist_token", "pos_embed"):
            return f"backbone.model.{k}"
        m = re.match(r"^patch_embed\.projection\.(weight|bias)$", k)
        if m:
            return f"backbone.model.patch_embed.proj.{m.group(1)}"
        # hybrid: timm's HybridEmbed (ResNetV2 + 1x1 projection) under the same names
        if _HYBRID_STEM_KEY.match(k) or re.match(r"^patch_embed\.proj\.(weight|bias)$", k):
            return f"backbone.model.{k}"
        m = re.match(r"^ln1\.(weight|bias)$", k)
        if m:
            return f"backbone.model.norm.{m.group(1)}"
        m = re.match(r"^layers\.(\d+)\.(.+)$", k)
        if m:
            for pattern, repl in _BLOCK_RULES:
                if pattern.match(m.group(2)):
                    return f"backbone.model.blocks.{m.group(1)}." + pattern.sub(repl, m.group(2))
        return None
    if key.startswith("decode_head."):
        k = key[len("decode_head.") :]
        for pattern, repl in _HEAD_RULES:
            if pattern.match(k):
                return "sem_seg_head." + pattern.sub(repl, k)
    return None


def resize_pos_embed(
    pos_embed: torch.Tensor, grid: Sequence[int], num_prefix_tokens: int
) -> torch.Tensor:
    """Resample a (1, prefix + h0 * w0, D) position embedding to ``grid`` (h, w), bicubic
    (align_corners=False, as mmseg's ``resize_pos_embed``), prefix tokens unchanged; the old grid
    must be square."""
    n = pos_embed.shape[1] - num_prefix_tokens
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"pos_embed holds {n} patch positions, not a square grid")
    prefix, patch = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    patch = patch.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch.float(), size=tuple(grid), mode="bicubic", align_corners=False)
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(pos_embed.dtype)
    return torch.cat([prefix, patch], dim=1)


def token_stride(state: Dict[str, torch.Tensor]) -> int:
    """Pixels per token of a converted state dict: 16 for the plain ViT/16 (its patch
    projection's kernel), or for a hybrid the ResNetV2 stem's reduction (4 after the stem, x2
    per stage after the first) times the 1x1 projection's kernel."""
    proj = state["backbone.model.patch_embed.proj.weight"].shape[-1]
    stages = {
        int(k.split(".")[5])
        for k in state
        if k.startswith("backbone.model.patch_embed.backbone.stages.")
    }
    if not stages:
        return int(proj)
    return int(proj) * 4 * 2 ** (max(stages))


def convert_state_dict(
    state: Dict[str, torch.Tensor],
    *,
    source: str = "<checkpoint>",
    img_size: Optional[Sequence[int]] = None,
    patch_size: Optional[int] = None,
) -> Dict[str, torch.Tensor]:
    """Map an official RegProxy state dict to our names (see the module docstring).

    Args:
        state (dict): the official ``state_dict`` (``backbone.*``, ``decode_head.*``; a common
            ``module.`` prefix is stripped).
        source (str): name for error messages.
        img_size ((int, int)): if given, resample the position embedding to this training
            size's token grid.
        patch_size (int): pixels per token for ``img_size``; None: :func:`token_stride` (16
            for ViT/16, 32 for the R26 / R50 hybrids).

    Returns:
        dict: our state dict (``backbone.model.*``, ``sem_seg_head.*``).
    """
    state = strip_common_prefix(dict(state), "module.")
    out: Dict[str, torch.Tensor] = {}
    unknown: List[str] = []
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        new = convert_key(key)
        if new is None:
            unknown.append(key)
            continue
        if new in out:
            raise ValueError(f"{source}: two keys map to {new!r}")
        out[new] = value
    if unknown:
        raise ValueError(
            f"{source}: {len(unknown)} keys are not part of the RegProxy ViT/16 or hybrid "
            f"(timm ResNetV2 stem) layout: {unknown[:20]}"
        )
    required = (
        "backbone.model.pos_embed",
        "backbone.model.patch_embed.proj.weight",
        "sem_seg_head.classifier.weight",
    )
    for key in required:
        if key not in out:
            raise ValueError(f"{source}: no {key!r} (is this a RegProxy checkpoint?)")
    if img_size is not None:
        prefix = 1 + int("backbone.model.dist_token" in out)
        patch_size = patch_size or token_stride(out)
        grid = (int(img_size[0]) // patch_size, int(img_size[1]) // patch_size)
        out["backbone.model.pos_embed"] = resize_pos_embed(
            out["backbone.model.pos_embed"], grid, prefix
        )
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("input", help="official RegProxy checkpoint (.pth)")
    parser.add_argument("output", help="converted checkpoint for MODEL.WEIGHTS (.pth)")
    parser.add_argument(
        "--img-size", nargs=2, type=int, metavar=("H", "W"),
        help="resample the position embedding to this training size (multiples of the token "
        "stride: 16, or 32 for the R26 / R50 hybrids)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    ckpt = torch_load_weights_only(args.input)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise SystemExit(f"{args.input}: not a state dict or an mmcv checkpoint with 'state_dict'")
    check_finite_weights(state, args.input)
    out = convert_state_dict(state, source=args.input, img_size=args.img_size)
    save_converted_checkpoint(out, args.output, "YiF-Zhang/RegionProxy (converted)")
    dims = out["backbone.model.pos_embed"].shape
    blocks = 1 + max(int(k.split(".")[3]) for k in out if k.startswith("backbone.model.blocks."))
    stem = sum(k.startswith("backbone.model.patch_embed.backbone.") for k in out)
    kind = f"hybrid (ResNetV2 stem, {stem} tensors)" if stem else "plain ViT"
    print(
        f"wrote {args.output}: {len(out)} tensors; {kind}, token stride {token_stride(out)}, "
        f"ViT width {dims[-1]}, {blocks} blocks, {dims[1]} position embeddings; classes "
        f"{out['sem_seg_head.classifier.weight'].shape[0]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
