#!/usr/bin/env python
"""Convert an official Swin Transformer ImageNet checkpoint (.pth) to detectron2's .pkl format.

Usage:
    python tools/convert_swin_imagenet_to_d2.py swin_tiny_patch4_window7_224.pth \\
        swin_tiny_patch4_window7_224.pkl

The output is ``{"model": {name: numpy array}, "__author__": ..., "matching_heuristics": True}``;
set ``MODEL.WEIGHTS`` to it (with ``INPUT.FORMAT: "RGB"`` and ImageNet RGB pixel mean/std, as the
Swin configs do). The names stay those of the ImageNet model (``patch_embed.*``, ``layers.*``);
detectron2's matching heuristics map them onto ``backbone.*`` of the segmentation model.

The input is read with ``torch.load(weights_only=True)`` (a file that needs anything else to
load is refused, naming it), and weights with NaN/Inf values are refused. The classifier (``head.*``), the final
classification LayerNorm (``norm.*``) and the ``attn_mask`` buffers are dropped by default
(``--keep-all`` keeps them): ``D2SwinTransformer`` never uses them (it has its own output norms
``norm0``..``norm3`` and recomputes masks for each input size), and dropping them prevents a
short name such as ``norm.weight`` from being matched by suffix to an unrelated head layer.
The script prints the ``MODEL.SWIN`` values the checkpoint implies.
"""

import argparse
import os
import pickle
import re
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from seg_methods.utils.checkpoint import (  # noqa: E402
    check_finite_weights,
    strip_common_prefix,
    torch_load_weights_only,
)

_DROPPED = (
    re.compile(r"^head\."),
    re.compile(r"^norm\.(weight|bias)$"),
    re.compile(r"\.attn_mask$"),
)


def find_state_dict(ckpt) -> Dict[str, torch.Tensor]:
    """The state dict inside a loaded Swin checkpoint (``model``, ``state_dict`` or the dict)."""
    if isinstance(ckpt, dict):
        for key in ("model", "state_dict"):
            if isinstance(ckpt.get(key), dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ValueError("no state dict of tensors found (expected a 'model' entry)")
    return strip_common_prefix(ckpt, "module.")


def convert(
    state: Dict[str, torch.Tensor], keep_all: bool = False
) -> Tuple[Dict[str, np.ndarray], List[str]]:
    """Convert a Swin ImageNet state dict to numpy arrays.

    Args:
        state (dict[str, Tensor]): the checkpoint's state dict.
        keep_all (bool): keep the classifier, final norm and attention-mask buffers.

    Returns:
        tuple: (name -> ndarray, names of dropped tensors).
    """
    if "patch_embed.proj.weight" not in state:
        raise ValueError("not a Swin checkpoint: 'patch_embed.proj.weight' is missing")
    if any(k.endswith(("logit_scale", "relative_coords_table")) or ".cpb_mlp." in k for k in state):
        raise ValueError("Swin V2 checkpoints are not supported by D2SwinTransformer (Swin V1)")
    out, dropped = {}, []
    for k, v in state.items():
        if not keep_all and any(p.search(k) for p in _DROPPED):
            dropped.append(k)
            continue
        v = v.detach().cpu()
        if v.dtype == torch.bfloat16:  # numpy has no bfloat16
            v = v.float()
        out[k] = v.numpy()
    return out, dropped


def implied_swin_config(state: Dict[str, torch.Tensor]) -> Dict[str, object]:
    """``MODEL.SWIN`` values implied by the tensor shapes of a Swin state dict."""
    proj = state["patch_embed.proj.weight"]
    depths, heads, window = [], [], None
    stage = 0
    while any(k.startswith(f"layers.{stage}.blocks.") for k in state):
        blocks = {int(k.split(".")[3]) for k in state if k.startswith(f"layers.{stage}.blocks.")}
        depths.append(max(blocks) + 1)
        table = state[f"layers.{stage}.blocks.0.attn.relative_position_bias_table"]
        heads.append(int(table.shape[1]))
        window = (int(round(table.shape[0] ** 0.5)) + 1) // 2
        stage += 1
    return {
        "PATCH_SIZE": int(proj.shape[-1]),
        "EMBED_DIM": int(proj.shape[0]),
        "DEPTHS": depths,
        "NUM_HEADS": heads,
        "WINDOW_SIZE": window,
        "APE": "absolute_pos_embed" in state,
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("input", help="official Swin ImageNet checkpoint (.pth)")
    parser.add_argument("output", help="detectron2 weights file to write (.pkl)")
    parser.add_argument(
        "--keep-all", action="store_true", help="keep head.*, norm.* and attn_mask tensors"
    )
    args = parser.parse_args(argv)
    if not args.output.endswith(".pkl"):
        parser.error("the output must end with .pkl (detectron2 reads numpy pickles by extension)")

    state = find_state_dict(torch_load_weights_only(args.input))
    check_finite_weights(state, args.input)
    arrays, dropped = convert(state, keep_all=args.keep_all)
    res = {
        "model": arrays,
        "__author__": "third_party (Swin ImageNet, converted by seg_methods)",
        "matching_heuristics": True,
    }
    with open(args.output, "wb") as f:
        pickle.dump(res, f, protocol=4)
    n_params = sum(int(a.size) for a in arrays.values())
    print(f"Wrote {len(arrays)} tensors ({n_params} values) to {args.output}")
    if dropped:
        print(f"Dropped {len(dropped)} tensors not used by D2SwinTransformer: {sorted(dropped)}")
    print(
        "Implied config: "
        + ", ".join(f"MODEL.SWIN.{k}={v}" for k, v in implied_swin_config(state).items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
