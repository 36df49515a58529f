"""Why the compiled deformable-attention op changes Mask2Former's training losses.

Our COCO panoptic R50 Mask2Former (``benchmarks/train_step.py``'s ``OFFICIAL_CONFIG``), batch 2 of
random 512x512 images with random panoptic ground truth (the Mask2Former parity tool's
``make_inputs``), one fp32 training forward from the same seed with the compiled op and with the
PyTorch reference of ``MSDeformAttn``: relative loss differences, and which matcher calls
(final layer first, then the auxiliary layers) get another assignment. Both with the config's
importance sampling of the point loss and with uniform random points
(``IMPORTANCE_SAMPLE_RATIO`` 0, ``OVERSAMPLE_RATIO`` 1), and with two initialisations: our own
(``build_model``) and the parity tool's random official state (``--official-root``, the weights
``train_step.py --against-official`` uses).

    OMP_NUM_THREADS=1 python benchmarks/deform_attn_loss_diff.py [--official-root PATH]
"""

import argparse
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import parity_tool, write_report  # noqa: E402  benchmarks/common.py
from train_step import (  # noqa: E402
    OFFICIAL_CONFIG,
    deform_attn_op_vs_pytorch,
    method_cfg,
)

parity = parity_tool()  # tools/compare_with_official_mask2former.py


def initial_states(base, official_root):
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    states = {"ours": build_model(base).state_dict()}
    if official_root:
        official = parity.OfficialCode(official_root)
        off_model = official.build_model(parity.official_cfg_from_ours(official, base))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "weights.pkl")
            parity.save_official_pkl(parity.random_official_state(off_model, 0), path, 0)
            model = build_model(base)
            parity.load_our_weights(model, path)
        states["official_random"] = model.state_dict()
    return states


def compare(cfg, state, inputs):
    from detectron2.modeling import build_model

    model = build_model(cfg)
    model.load_state_dict(state)
    return deform_attn_op_vs_pytorch(model, inputs, 0)[0]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--official-root",
        default=os.environ.get("MASK2FORMER_OFFICIAL_ROOT", "/work/ref/Mask2Former"),
        help="facebookresearch/Mask2Former checkout for its random weights ('' to skip)",
    )
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--output", default=os.path.join(HERE, "results", "deform_attn_loss_diff.json"))
    args = p.parse_args()
    if args.official_root and not os.path.isdir(args.official_root):
        p.error(f"--official-root {args.official_root} is not a directory")
    base = method_cfg(OFFICIAL_CONFIG)
    base.INPUT.MIN_SIZE_TRAIN = (args.size,)
    inputs = parity.make_inputs(
        [(args.size, args.size)] * 2, base.MODEL.SEM_SEG_HEAD.NUM_CLASSES, 0, with_gt=True
    )
    for x in inputs:  # training inputs carry no output size
        x.pop("height", None), x.pop("width", None)
    report = {"config": OFFICIAL_CONFIG, "size": args.size, "batch": 2, "results": {}}
    for init, state in initial_states(base, args.official_root).items():
        for sampling in ("importance", "uniform"):
            cfg = base.clone()
            cfg.defrost()
            if sampling == "uniform":
                cfg.MODEL.MASK_CLS.IMPORTANCE_SAMPLE_RATIO = 0.0
                cfg.MODEL.MASK_CLS.OVERSAMPLE_RATIO = 1.0
            r = compare(cfg, state, inputs)
            report["results"][f"{init}/{sampling}"] = r
            worst = sorted(r["rel_loss_diff"].items(), key=lambda kv: -kv[1])[:3]
            print(
                f"init {init}, {sampling} points: max rel loss diff {r['max_rel_loss_diff']:.2e} "
                f"(worst {', '.join(f'{k} {v:.1e}' for k, v in worst)}); matcher calls with "
                f"another assignment: {r['matcher_calls_differing']} of {r['matcher_calls']}",
                flush=True,
            )
    write_report(args.output, report)


if __name__ == "__main__":
    main()
