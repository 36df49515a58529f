#!/usr/bin/env python
"""Convert an official Mask2Former checkpoint (.pkl or .pth) to a .pth seg_methods loads directly.

Usage:
    python tools/convert_mask2former_weights.py model_final_f07440.pkl m2f_r50_coco_panoptic.pth
    # optionally check the result against the model a config builds:
    python tools/convert_mask2former_weights.py IN.pkl OUT.pth --config-file CONFIG.yaml

The input is read safely (restricted unpickler for .pkl, ``torch.load(weights_only=True)`` for
.pth; a file that needs anything else to load, or holds NaN/Inf weights, is refused with an error
naming it). seg_methods' Mask2Former uses the official parameter names, so ``RENAMES`` is empty and
the conversion is a validated re-save: every value must be an array or tensor, the ``module.``
prefix of DDP is stripped, keys outside the known top-level modules are reported as unexpected,
and with ``--config-file`` the keys and shapes are compared with the built model. The output is
``torch.save({"model": {name: Tensor}, "__author__": ..., "matching_heuristics": False})``.

Loading the official file directly with ``SegCheckpointer`` works as well; this tool is for
shipping a checked .pth (and for any future renames).
"""

import argparse
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from seg_methods.utils.checkpoint import (  # noqa: E402
    load_checkpoint_file,
    save_converted_checkpoint,
    strip_common_prefix,
)

# (regular expression on the official name, replacement). Empty: our names are the official ones.
RENAMES: List[Tuple[str, str]] = []

# Top-level modules of the official Mask2Former state dict (criterion.empty_weight is a buffer).
KNOWN_PREFIXES = ("backbone.", "sem_seg_head.", "criterion.")


def convert(state: Dict[str, object]) -> Tuple[Dict[str, torch.Tensor], List[Tuple[str, str]]]:
    """Validate and rename an official Mask2Former state dict.

    Args:
        state (dict): name -> ndarray or Tensor.

    Returns:
        tuple: (name -> Tensor, list of (old name, new name) for renamed keys).
    """
    state = strip_common_prefix(state, "module.")
    out, renamed = {}, []
    for k, v in state.items():
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(np.ascontiguousarray(v))
        elif not isinstance(v, torch.Tensor):
            raise ValueError(f"'{k}' holds a {type(v).__name__}, not an array or tensor")
        new = k
        for pattern, repl in RENAMES:
            new = re.sub(pattern, repl, new)
        if new != k:
            renamed.append((k, new))
        if new in out:
            raise ValueError(f"two checkpoint tensors map to '{new}'")
        out[new] = v
    return out, renamed


def compare_with_model(state: Dict[str, torch.Tensor], model: torch.nn.Module):
    """Keys missing from ``state``, keys the model lacks, and shape mismatches.

    Returns:
        tuple: (missing, unexpected, [(key, checkpoint shape, model shape)]).
    """
    model_state = model.state_dict()
    missing = sorted(set(model_state) - set(state))
    unexpected = sorted(set(state) - set(model_state))
    mismatched = [
        (k, tuple(state[k].shape), tuple(model_state[k].shape))
        for k in sorted(set(state) & set(model_state))
        if tuple(state[k].shape) != tuple(model_state[k].shape)
    ]
    return missing, unexpected, mismatched


def build_model_from_config(config_file: str, opts: List[str]) -> torch.nn.Module:
    from detectron2.modeling import build_model

    from seg_methods.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return build_model(cfg)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("input", help="official Mask2Former checkpoint (.pkl or .pth)")
    parser.add_argument("output", help="file to write (.pth)")
    parser.add_argument("--config-file", default="", help="check keys/shapes against this model")
    parser.add_argument("opts", nargs="*", default=[], help="config overrides (KEY VALUE ...)")
    # intermixed: a REMAINDER positional swallowed a --config-file written after IN OUT (the
    # documented usage), so the key / shape check silently never ran
    args = parser.parse_intermixed_args(argv)
    if not args.output.endswith(".pth"):
        parser.error("the output must end with .pth")

    data = load_checkpoint_file(args.input)
    if data.get("matching_heuristics", False):
        print(
            f"warning: {args.input} asks for name-matching heuristics (an ImageNet backbone?); "
            "it is saved with exact names"
        )
    state, renamed = convert(data["model"])
    n_values = sum(v.numel() for v in state.values())
    print(f"{len(state)} tensors ({n_values} values) read from {args.input}")
    for old, new in renamed:
        print(f"renamed {old} -> {new}")
    unknown = sorted(k for k in state if not k.startswith(KNOWN_PREFIXES))
    print(f"{len(unknown)} unexpected keys (outside {', '.join(KNOWN_PREFIXES)})")
    for k in unknown:
        print(f"  unexpected: {k}")

    if args.config_file:
        model = build_model_from_config(args.config_file, args.opts)
        missing, unexpected, mismatched = compare_with_model(state, model)
        print(
            f"against {args.config_file}: {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(mismatched)} shape mismatches"
        )
        for k in missing:
            print(f"  missing: {k}")
        for k in unexpected:
            print(f"  unexpected: {k}")
        for k, c, m in mismatched:
            print(f"  shape mismatch: {k}: {c} in checkpoint, {m} in model")
        if missing or mismatched:
            print(f"not writing {args.output}: the checkpoint does not fit the model")
            return 1

    author = data.get("__author__", "unknown")
    author = f"Mask2Former ({author}) from {os.path.basename(args.input)}, converted by seg_methods"
    save_converted_checkpoint(state, args.output, author)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
