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
PQ_th, PQ_st, mIoU, mask AP, training it/s and inference img/s, plus speed ratios to the
recurrent variant, next to Table 4c's hours/epoch and fps ratios).

Variants whose overrides are identical (``t3``, ``dreamy`` and ``recurrent`` are all the default
model: recurrent cross-attention, T = 3, dreamy-start) share one run, so the full ablation is
5 distinct models x seeds.

``--jobs N`` runs N trainings side by side, each with ``--threads`` torch/OpenMP threads (on the
2-core machine two 1-thread jobs train more iterations per hour than one 2-thread job, measured:
2.93 s/it each vs 1.8 s/it at batch 8); speeds are then per job under that sharing, the same for
every variant.

Example (the run reported in projects/ClustSeg/README.md)::

    python tools/clustseg_ablation.py --iters 900 --seeds 0 1 --jobs 2 --threads 1 \
        --output output/clustseg_ablation SOLVER.IMS_PER_BATCH 4 SOLVER.BASE_LR 1e-3 \
        MODEL.MASK_CLS.OBJECT_MASK_THRESHOLD 0.4 TEST.EVAL_PERIOD 450
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/synthetic/panoptic-segmentation/clustseg/clustseg_R18_bs8_1k.yaml"

VARIANTS: Dict[str, List[str]] = {
    "t1": ["MODEL.CLUSTSEG.NUM_ITERATIONS", "1"],
    "t3": [],  # T = 3 is the config default
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


def run_key(variant: str) -> Tuple[str, ...]:
    """Variants with the same overrides are the same model and share one run."""
    return tuple(VARIANTS[variant])


def run_name(variant: str) -> str:
    """Directory name of a variant's run: the first variant (in VARIANTS order) with its key."""
    key = run_key(variant)
    return next(v for v in VARIANTS if run_key(v) == key)


def train(name: str, seed: int, args) -> None:
    out = os.path.join(args.output, f"{name}_seed{seed}")
    # metrics.json is also written by the periodic evaluations: a run is finished when its
    # final checkpoint and metrics exist
    done = [os.path.join(out, f) for f in ("metrics.json", "model_final.pth")]
    if args.skip_existing and all(os.path.exists(f) for f in done):
        return
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
        + VARIANTS[name]
        + args.opts
    )
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    with open(os.path.join(out, "ablation_stdout.log"), "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} seed {seed} failed (exit {proc.returncode}); see {log.name}")
    print(f"[{name} seed {seed}] {time.time() - t0:.0f} s", flush=True)


def read(name: str, seed: int, args) -> Dict:
    out = os.path.join(args.output, f"{name}_seed{seed}")
    with open(os.path.join(out, "metrics.json")) as f:
        res = json.load(f)
    times = []
    with open(os.path.join(out, "training_metrics.json")) as f:
        for line in f:
            row = json.loads(line)
            if "time" in row and row.get("iteration", 0) >= args.warmup:
                times.append(row["time"])
    fps, pq_curve, header = None, [], None
    with open(os.path.join(out, "log.txt")) as f:
        for line in f:
            # detectron2's "copypaste" lines: a header of metric names, then their values
            if "copypaste: PQ,SQ,RQ" in line:
                header = line.split("copypaste: ")[1].strip().split(",")
            elif header is not None and "copypaste: " in line:
                values = line.split("copypaste: ")[1].strip().split(",")
                pq_curve.append(float(values[header.index("PQ")]))
                header = None
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
        "mIoU": res.get("sem_seg", {}).get("mIoU"),
        "AP": res.get("segm", {}).get("AP"),
        "train_it_per_s": (len(times) / sum(times)) if times else None,
        "infer_img_per_s": fps,
        "PQ_at_each_evaluation": pq_curve,  # TEST.EVAL_PERIOD evaluations, then the final one
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
    p.add_argument("--jobs", type=int, default=1, help="trainings run side by side")
    p.add_argument("--threads", type=int, default=0, help="OMP threads per job (0: inherit)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="extra config overrides")
    args = p.parse_args(argv)
    names = sorted({run_name(v) for v in args.variants}, key=list(VARIANTS).index)
    # seed by seed; within a seed the slow T = 3 runs first, so parallel jobs end together
    slow = [n for n in names if "NUM_ITERATIONS" not in " ".join(VARIANTS[n])]
    todo = [(n, s) for s in args.seeds for n in slow + [n for n in names if n not in slow]]
    print(f"{len(todo)} runs ({', '.join(names)} x seeds {args.seeds}), {args.jobs} at a time",
          flush=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for f in [pool.submit(train, n, s, args) for n, s in todo]:
            f.result()
    results = {v: {s: read(run_name(v), s, args) for s in args.seeds} for v in args.variants}
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "ablation.json"), "w") as f:
        json.dump({"iters": args.iters, "config": args.config, "results": results}, f, indent=2)

    keys = ["PQ", "PQ_th", "PQ_st", "mIoU", "AP", "train_it_per_s", "infer_img_per_s"]
    print(f"\n{args.iters} iterations, seeds {args.seeds}, {args.config} {' '.join(args.opts)}\n")
    print("shared runs: " + ", ".join(f"{v} = {run_name(v)}" for v in args.variants
                                      if run_name(v) != v) + "\n")
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
