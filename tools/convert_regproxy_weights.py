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

Any other key is refused (listed), as is a key that would be produced twice. ``--img-size H W``
resamples the position embedding (bicubic, as mmseg's ``resize_pos_embed``) to the token grid of
that training size, which must then equal ``MODEL.TIMM.EXTRA_ARGS`` ``img_size``. The hybrid
models (R26+ViT-S/32, R50+ViT-L/32) are not supported (their ResNet stem has no counterpart in
``build_timm_vit_backbone`` yet).

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

__all__ = ["convert_key", "convert_state_dict", "resize_pos_embed", "main"]

_BLOCK_RULES = (
    (re.compile(r"^ln1\.(.+)$"), r"norm1.\1"),
    (re.compile(r"^ln2\.(.+)$"), r"norm2.\1"),
    (re.compile(r"^attn\.attn\.in_proj_(weight|bias)$"), r"attn.qkv.\1"),
    (re.compile(r"^attn\.attn\.out_proj\.(.+)$"), r"attn.proj.\1"),
    (re.compile(r"^ffn\.layers\.0\.0\.(.+)$"), r"mlp.fc1.\1"),
    (re.compile(r"^ffn\.layers\.1\.(.+)$"), r"mlp.fc2.\1"),
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


def convert_state_dict(
    state: Dict[str, torch.Tensor],
    *,
    source: str = "<checkpoint>",
    img_size: Optional[Sequence[int]] = None,
    patch_size: int = 16,
) -> Dict[str, torch.Tensor]:
    """Map an official RegProxy state dict to our names (see the module docstring)."""
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
            f"{source}: {len(unknown)} keys are not part of the RegProxy ViT/16 layout (hybrid "
            f"models are not supported): {unknown[:20]}"
        )
    for required in ("backbone.model.pos_embed", "sem_seg_head.classifier.weight"):
        if required not in out:
            raise ValueError(f"{source}: no {required!r} (is this a RegProxy checkpoint?)")
    if img_size is not None:
        prefix = 1 + int("backbone.model.dist_token" in out)
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
        help="resample the position embedding to this training size (multiples of 16)",
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
    print(
        f"wrote {args.output}: {len(out)} tensors; ViT width {dims[-1]}, {blocks} blocks, "
        f"{dims[1]} position embeddings; classes {out['sem_seg_head.classifier.weight'].shape[0]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
