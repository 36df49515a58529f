#!/usr/bin/env python
"""ClustSeg ablation on the embedded dataset (ClustSeg Table 4, issue 3), two seeds per variant.

Each variant trains the synthetic panoptic ClustSeg config with ``train_net.py`` (one process per
run, CPU), evaluates it on ``synthetic_panoptic_val`` and measures, in the same process family,

* training speed: mean seconds per iteration over the logged iterations after warm-up
  (``training_metrics.json``, detectron2's ``time`` field), reported as iterations per second;
* inference speed: images per second of the evaluation (detectron2's inference log line).

Variants (``--variants``, default all):

  t1, t3                 recurrent cross-attention with T = 1 / T = 3 (Table 4d)
  free, dreamy           free-parameter queries vs dreamy-start (Table 4b rows #1 / #5), T = 3
  vanilla, kmeans, recurrent
                         cross-attention variants (Table 4c); vanilla and k-means use T = 1
                         ("without any recursive process"), recurrent uses T = 3

Results go to ``OUTPUT/ablation.json`` and a markdown table on stdout (mean and both seeds of PQ,
PQ_th, PQ_st, training it/s and inference img/s, plus speed ratios to the recurrent variant, next
to Table 4c's hours/epoch and fps ratios).

Example (what the README reports as "remaining"; about 2 x 7 runs)::

    OMP_NUM_THREADS=1 python tools/clustseg_ablation.py --iters 1000 --seeds 0 1 \
        --output output/clustseg_ablation
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/synthetic/panoptic-segmentation/clustseg/clustseg_R18_bs8_1k.yaml"

VARIANTS: Dict[str, List[str]] = {
    "t1": ["MODEL.CLUSTSEG.NUM_ITERATIONS", "1"],
    "t3": ["MODEL.CLUSTSEG.NUM_ITERATIONS", "3"],
    "free": [
        "MODEL.CLUSTSEG.THING_QUERY_INIT",
        "free",
        "MODEL.CLUSTSEG.STUFF_QUERY_INIT",
        "free",
    ],
    "dreamy": [],
    "vanilla": ["MODEL.CLUSTSEG.CROSS_ATTENTION", "vanilla", "MODEL.CLUSTSEG.NUM_ITERATIONS", "1"],
    "kmeans": ["MODEL.CLUSTSEG.CROSS_ATTENTION", "kmeans", "MODEL.CLUSTSEG.NUM_ITERATIONS", "1"],
    "recurrent": [],
}
# Table 4c of the paper (COCO, R50): training hours/epoch and inference fps.
PAPER_4C = {"vanilla": (1.89, 5.88), "kmeans": (1.58, 7.81), "recurrent": (1.62, 7.59)}


def run(variant: str, seed: int, args) -> Dict:
    out = os.path.join(args.output, f"{variant}_seed{seed}")
    metrics = os.path.join(out, "metrics.json")
    if not (args.skip_existing and os.path.exists(metrics)):
        cmd = (
            [
                sys.executable,
                "train_net.py",
                "--config-file",
                args.config,
                "SEED",
                str(seed),
                "OUTPUT_DIR",
                out,
                "SOLVER.MAX_ITER",
                str(args.iters),
                "SOLVER.CHECKPOINT_PERIOD",
                str(10**9),
                "TEST.NUM_VIS_IMAGES",
                "0",
            ]
            + VARIANTS[variant]
            + args.opts
        )
        os.makedirs(out, exist_ok=True)
        t0 = time.time()
        with open(os.path.join(out, "ablation_stdout.log"), "w") as log:
            subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
        print(f"[{variant} seed {seed}] {time.time() - t0:.0f} s", flush=True)
    with open(metrics) as f:
        res = json.load(f)
    times = []
    with open(os.path.join(out, "training_metrics.json")) as f:
        for line in f:
            row = json.loads(line)
            if "time" in row and row.get("iteration", 0) >= args.warmup:
                times.append(row["time"])
    fps = None
    with open(os.path.join(out, "log.txt")) as f:
        for line in f:
            m = re.search(
                r"Total inference pure compute time: .*\(([\d.]+) s / iter per device", line
            )
            if m:
                fps = 1.0 / float(m.group(1))
    pan = res.get("panoptic_seg", {})
    return {
        "PQ": pan.get("PQ"),
        "PQ_th": pan.get("PQ_th"),
        "PQ_st": pan.get("PQ_st"),
        "train_it_per_s": (len(times) / sum(times)) if times else None,
        "infer_img_per_s": fps,
    }


def _fmt(v, nd=1):
    return "-" if v is None else f"{v:.{nd}f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=20, help="iterations left out of the speed")
    p.add_argument("--output", default="output/clustseg_ablation")
    p.add_argument("--skip-existing", action="store_true", help="reuse finished runs")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="extra config overrides")
    args = p.parse_args(argv)
    results = {v: {s: run(v, s, args) for s in args.seeds} for v in args.variants}
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "ablation.json"), "w") as f:
        json.dump({"iters": args.iters, "config": args.config, "results": results}, f, indent=2)

    keys = ["PQ", "PQ_th", "PQ_st", "train_it_per_s", "infer_img_per_s"]
    print(f"\n{args.iters} iterations, seeds {args.seeds}, {args.config}\n")
    print("| variant | " + " | ".join(keys) + " | train / recurrent | infer / recurrent |")
    print("|---" * (len(keys) + 3) + "|")
    means = {}
    for v, per_seed in results.items():
        row = {}
        for k in keys:
            vals = [r[k] for r in per_seed.values() if r[k] is not None]
            row[k] = sum(vals) / len(vals) if vals else None
        means[v] = row
    ref = means.get("recurrent") or means.get("t3")
    for v, row in means.items():
        cells = []
        for k in keys:
            seeds = ", ".join(_fmt(per[k], 2) for per in results[v].values())
            cells.append(f"{_fmt(row[k], 2)} ({seeds})")
        tr = (
            (row["train_it_per_s"] / ref["train_it_per_s"])
            if ref and row["train_it_per_s"] and ref["train_it_per_s"]
            else None
        )
        inf = (
            (row["infer_img_per_s"] / ref["infer_img_per_s"])
            if ref and row["infer_img_per_s"] and ref["infer_img_per_s"]
            else None
        )
        print(f"| {v} | " + " | ".join(cells) + f" | {_fmt(tr, 2)} | {_fmt(inf, 2)} |")
    print(
        "\nTable 4c (paper, COCO R50), speed relative to recurrent: "
        + ", ".join(
            f"{v}: train {PAPER_4C['recurrent'][0] / h:.2f}, infer "
            f"{fps / PAPER_4C['recurrent'][1]:.2f}"
            for v, (h, fps) in PAPER_4C.items()
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
