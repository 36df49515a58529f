#!/usr/bin/env python
"""Convert an official CRM checkpoint to a .pth seg_methods' CRM loads with MODEL.WEIGHTS.

Usage:
    python tools/convert_crm_weights.py crm_official.pth crm_r50_converted.pth
    # check the result against another CRM config than the default R50 one:
    python tools/convert_crm_weights.py IN.pth OUT.pth --config-file CONFIG.yaml

The official checkpoint (dvlab-research/Entity ``High-Quality-Segmention``, ``train.py``) is the
state dict of ``nn.DataParallel(CRMNet(backend="resnet50"))``: ``module.feats.*`` (ResNet-50 with a
4-channel stem), ``module.aspp_.*`` (``ASPP_no4level``) and ``module.imnet.*`` (the MLP). It is
read safely (``torch.load(weights_only=True)`` through seg_methods' checkpoint reader; NaN/Inf
weights are refused). Renames (our layout: ``seg_methods.modeling.meta_arch.crm.CRM``):

=====================================  ==========================================
official                               seg_methods
=====================================  ==========================================
feats.<resnet key>                     backbone.model.<resnet key> (timm names)
feats.layer4.*                         dropped: computed but unused by the official forward
aspp_.aspp1_{128,256,1024}.atrous_conv fusion.branches.{0,1,2}.conv
aspp_.aspp1_{128,256,1024}.bn          fusion.branches.{0,1,2}.norm1
aspp_.bn1_{128,256,1024}               fusion.branches.{0,1,2}.norm2
aspp_.last_conv.{0,1}                  fusion.project.{0,1}
imnet.layers.<i>                       decoder.mlp.layers.<i>
=====================================  ==========================================

Any other key is refused (listed), and so is a key the model needs that the file lacks (only
BatchNorm ``num_batches_tracked`` counters may be absent: older PyTorch did not save them; they
are set to 0). Every converted tensor's shape is checked against the model built from
``--config-file`` (default: the official R50 network,
configs/synthetic/refinement-segmentation/crm/Base-Synthetic-RefinementSegmentation-CRM.yaml).
The output is ``torch.save({"model": {name: Tensor}, "__author__": ...,
"matching_heuristics": False})``.
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

DEFAULT_CONFIG = (
    "configs/synthetic/refinement-segmentation/crm/Base-Synthetic-RefinementSegmentation-CRM.yaml"
)
_ASPP_LEVELS = {"128": 0, "256": 1, "1024": 2}

# (pattern on the official name, replacement); first match wins; None drops the key.
RENAMES: List[Tuple[str, Optional[str]]] = [
    (r"^feats\.layer4\.", None),
    (r"^feats\.", "backbone.model."),
    (r"^aspp_\.aspp1_(128|256|1024)\.atrous_conv\.", "fusion.branches.{level}.conv."),
    (r"^aspp_\.aspp1_(128|256|1024)\.bn\.", "fusion.branches.{level}.norm1."),
    (r"^aspp_\.bn1_(128|256|1024)\.", "fusion.branches.{level}.norm2."),
    (r"^aspp_\.last_conv\.([01])\.", "fusion.project.{index}."),
    (r"^imnet\.layers\.(\d+)\.", "decoder.mlp.layers.{index}."),
]


def rename(key: str) -> Tuple[bool, Optional[str]]:
    """Map one official key (without "module.").

    Returns:
        tuple: (known, new name or None when the key is dropped). Unknown keys give (False, None).
    """
    for pattern, repl in RENAMES:
        m = re.match(pattern, key)
        if not m:
            continue
        if repl is None:
            return True, None
        fields = {}
        if "{level}" in repl:
            fields["level"] = _ASPP_LEVELS[m.group(1)]
        if "{index}" in repl:
            fields["index"] = m.group(1)
        return True, repl.format(**fields) + key[m.end() :]
    return False, None


def convert(state: Dict[str, object]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Rename an official CRM state dict to our layout.

    Args:
        state (dict): official name (with or without DataParallel's "module.") -> Tensor/ndarray.

    Returns:
        tuple: (our name -> Tensor, the official keys dropped on purpose).

    Raises:
        ValueError: unknown keys (all listed), or a value that is not a tensor/array.
    """
    state = strip_common_prefix(state, "module.")
    out, dropped, unknown = {}, [], []
    for k, v in state.items():
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(np.ascontiguousarray(v))
        elif not isinstance(v, torch.Tensor):
            raise ValueError(f"'{k}' holds a {type(v).__name__}, not a tensor or array")
        known, new = rename(k)
        if not known:
            unknown.append(k)
        elif new is None:
            dropped.append(k)
        else:
            out[new] = v
    if unknown:
        raise ValueError(
            f"{len(unknown)} key(s) are not part of the official CRMNet (feats.*, aspp_.*, "
            f"imnet.*): {unknown[:20]}{' ...' if len(unknown) > 20 else ''}"
        )
    return out, dropped


def check_against_model(converted: Dict[str, torch.Tensor], config_file: str) -> Dict:
    """Compare the converted keys/shapes with the CRM built from ``config_file``.

    Missing ``num_batches_tracked`` counters are added (0); every other missing key, extra key or
    shape mismatch raises ``ValueError`` listing them.

    Returns:
        dict: the converted state, completed.
    """
    from detectron2.modeling import build_model

    from seg_methods.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(config_file)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.CRM.BASE_CONFIG = ""
    cfg.MODEL.CRM.BASE_WEIGHTS = ""
    if cfg.MODEL.META_ARCHITECTURE != "CRM":
        raise ValueError(f"--config-file {config_file} is not a CRM config")
    reference = {
        k: v
        for k, v in build_model(cfg).state_dict().items()
        if k not in ("pixel_mean", "pixel_std")
    }
    out = dict(converted)
    missing = [k for k in reference if k not in out]
    for k in [k for k in missing if k.endswith("num_batches_tracked")]:
        out[k] = torch.zeros((), dtype=torch.long)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    extra = [k for k in out if k not in reference]
    shapes = [
        (k, tuple(out[k].shape), tuple(reference[k].shape))
        for k in out
        if k in reference and tuple(out[k].shape) != tuple(reference[k].shape)
    ]
    if missing or extra or shapes:
        raise ValueError(
            f"the converted weights do not fit the CRM of {config_file}: "
            f"missing {missing[:20]}, unexpected {extra[:20]}, shape mismatches (key, file, "
            f"model) {shapes[:20]}"
        )
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("input", help="official checkpoint (.pth state dict)")
    parser.add_argument("output", help="converted .pth")
    parser.add_argument(
        "--config-file",
        default=DEFAULT_CONFIG,
        help=f"CRM config to check against ({DEFAULT_CONFIG})",
    )
    args = parser.parse_args(argv)
    data = load_checkpoint_file(args.input)
    converted, dropped = convert(data["model"])
    converted = check_against_model(converted, args.config_file)
    author = f"official CRM checkpoint {os.path.basename(args.input)} (converted)"
    save_converted_checkpoint(converted, args.output, author)
    print(
        f"wrote {args.output}: {len(converted)} tensors; dropped {len(dropped)} unused official "
        "key(s) (feats.layer4.*)"
    )


if __name__ == "__main__":
    main()
