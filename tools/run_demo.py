#!/usr/bin/env python
"""The main job of ``make demo``: train and evaluate the default Mask2Former on the embedded
dataset, on the CPU, and say where the results are.

Steps: generate the synthetic dataset if absent (about 30 s), train
``configs/synthetic/panoptic-segmentation/mask2former/mask2former_R18_dec3_bs8_2k_demo.yaml`` with
``train_net.py``'s code path, evaluate on ``synthetic_panoptic_val`` (PQ, mIoU, mask AP), write
``metrics.json``, TensorBoard events, checkpoints and pictures of validation images.

    python tools/run_demo.py [--config-file CFG] [--output DIR] [KEY VALUE ...]
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(
    ROOT, "configs", "synthetic", "panoptic-segmentation", "mask2former", "mask2former_R18_dec3_bs8_2k_demo.yaml"
)
HEADLINE = {
    "panoptic_seg": ["PQ", "SQ", "RQ", "PQ_th", "PQ_st"],
    "sem_seg": ["mIoU", "fwIoU", "mACC", "pACC"],
    "segm": ["AP", "AP50", "AP75"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config-file", default=DEFAULT_CONFIG)
    p.add_argument("--output", default=os.path.join(ROOT, "output", "mask2former_synthetic"))
    p.add_argument("opts", nargs=argparse.REMAINDER, help="extra config KEY VALUE pairs")
    return p.parse_args(argv)


def print_summary(output_dir, seconds):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        metrics = json.load(f)
    print("\n" + "=" * 72)
    minutes = seconds / 60
    print(f"Mask2Former on synthetic_panoptic_val: trained + evaluated on the CPU in {minutes:.1f} min")
    for task, keys in HEADLINE.items():
        if task in metrics:
            vals = "  ".join(
                f"{k} {metrics[task][k]:.1f}" for k in keys if metrics[task].get(k) is not None
            )
            print(f"  {task:13s} {vals}")
    vis_dir = os.path.join(output_dir, "vis")
    vis = sorted(os.listdir(vis_dir)) if os.path.isdir(vis_dir) else []
    events = [f for f in os.listdir(output_dir) if f.startswith("events.out.tfevents")]
    print(f"  metrics:      {os.path.join(output_dir, 'metrics.json')}")
    print(f"  pictures:     {vis_dir}/ ({len(vis)} PNGs: ground truth | panoptic | instances | semantic)")
    print(f"  tensorboard:  tensorboard --logdir {output_dir}  ({len(events)} event file(s))")
    print(f"  model:        {os.path.join(output_dir, 'model_final.pth')}")
    print("=" * 72)


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, ROOT)
    import torch
    from detectron2.engine import default_argument_parser

    from seg_methods.data.datasets.synthetic import generate_synthetic_dataset
    from seg_methods.engine import setup, train

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    root = os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "synthetic")
    t0 = time.time()
    print(f"[demo] embedded dataset: {os.path.abspath(root)} (generated on first use)", flush=True)
    generate_synthetic_dataset(root, verbose=True)
    d2_args = default_argument_parser().parse_args(
        ["--config-file", args.config_file, "OUTPUT_DIR", args.output] + list(args.opts)
    )
    cfg = setup(d2_args)
    print(f"[demo] training {os.path.relpath(args.config_file, ROOT)} for {cfg.SOLVER.MAX_ITER} "
          f"iterations on the CPU; logs with ETA follow", flush=True)
    t1 = time.time()
    train(cfg)
    print_summary(cfg.OUTPUT_DIR, time.time() - t1)
    print(f"[demo] total time {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
