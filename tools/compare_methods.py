#!/usr/bin/env python
"""Train (or load) and evaluate every method's synthetic config in one run; write one table.

    python tools/compare_methods.py                       # every method, 10 min of training each
    python tools/compare_methods.py --budget-minutes 20 --methods Mask2Former,HLE
    python tools/compare_methods.py --reuse               # load output/compare_methods/<m>/model_final.pth
    python tools/compare_methods.py --weights HLE=path/to/model.pth   # evaluate given weights
    python tools/compare_methods.py --reuse-results       # keep rows already measured (same config)
    python tools/compare_methods.py --update-readme       # also replace the table in README.md

For each method (the table :data:`METHODS`: one synthetic config per method, on the embedded
dataset) one child process (``--one``, so a crash or a memory peak stays in that method):

1. **Training speed**: ``--probe-iters`` training steps of the config (model, optimizer, data
   loader and loss as ``train_net.py`` builds them, through ``seg_methods.engine.Trainer``); the
   median wall time of a step after ``--probe-warmup`` warm-up steps is "train s/it".
2. **Schedule within the budget**: every method trains with the schedule of its own config
   (``SOLVER.MAX_ITER``, ``STEPS``, warm-up), compressed to the same wall-clock budget when it
   does not fit: ``iters = min(MAX_ITER, budget / (s/it))``, and the LR steps and warm-up are
   scaled by ``iters / MAX_ITER``. The table gives the iterations run and the config's.
3. **Training + evaluation** through ``train_net.py``'s code path (``seg_methods.engine.train``,
   the config's test set and evaluators), ``SEED`` = ``--seed``; or, with ``--reuse`` /
   ``--weights``, evaluation of existing weights (``evaluate_checkpoint``).
4. **Inference**: ``DefaultPredictor`` (``seg_methods.engine.build_predictor``) on the same
   ``--size`` x ``--size`` image for every method (the first image of ``synthetic_val``, resized),
   ``--threads`` intra-op threads, median of ``--repeats`` calls after one warm-up: "ms/image".
5. **Parameters**: every parameter of the model, in millions.

``--reuse-results`` keeps a method's row from an earlier run (its ``compare.json``, written only
when the method finished) when the config and the measurement settings (budget, seed, threads,
sizes, repeats: :data:`SETTINGS`) are the same, so that one table can be completed method by
method; the caption then says so.

``--methods`` sets the order in which methods run (the table keeps the order of :data:`METHODS`);
``--jobs N`` runs N methods at a time (each child with ``--train-threads`` intra-op threads and
its log in ``<output>/<method>/compare.log``), for machines with more cores than one method uses;
the caption says so, since concurrent methods share the memory bandwidth and caches.

The parent collects the children's JSON (``<output>/<method>/compare.json``), prints the table,
writes ``<output>/table.md`` and, with ``--update-readme``, replaces the block between the
``compare_methods`` markers of README.md. The caption names the command, the machine (CPU model,
cores), the date, the budget and the thread counts.

Metrics (percent) as each task applies: panoptic PQ / PQ_th / PQ_st (``panoptic_seg``), mIoU
(``sem_seg``; for HSSN the leaf level), mask AP (``segm``); CRM (refinement) reports refined IoU
and mBA with the coarse masks' values in "other".
"""

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN = "<!-- compare_methods:begin -->"
END = "<!-- compare_methods:end -->"
# Arguments that change what a row measures: a row is reused only when they all match.
SETTINGS = (
    "budget_minutes",
    "seed",
    "train_threads",
    "threads",
    "size",
    "repeats",
    "probe_iters",
    "probe_warmup",
    "jobs",
)


@dataclass(frozen=True)
class Method:
    """One row: a method's synthetic config."""

    name: str
    family: str
    config: str  # relative to configs/


METHODS = (
    Method("Mask2Former", "panoptic", "synthetic/panoptic-segmentation/mask2former/mask2former_R18_bs8_600it.yaml"),
    Method("CMT-DeepLab", "panoptic", "synthetic/panoptic-segmentation/cmt_deeplab/cmt_deeplab_R18_bs8_1k.yaml"),
    Method("ClustSeg", "panoptic", "synthetic/panoptic-segmentation/clustseg/clustseg_R18_bs8_1k.yaml"),
    Method("HLE", "panoptic", "synthetic/panoptic-segmentation/hle/hle_R18_bs8_1k.yaml"),
    Method("Panoptic SegFormer", "panoptic", "synthetic/panoptic-segmentation/panoptic_segformer/panoptic_segformer_R18_bs8_600it.yaml"),
    Method("Dense instance affinity (Unifying T&I)", "panoptic", "synthetic/panoptic-segmentation/dense_affinity_panoptic/dense_affinity_panoptic_R18_bs8_1k.yaml"),
    Method("PISR (Panoptic-FPN base)", "panoptic", "synthetic/panoptic-segmentation/pisr/pisr_R18_bs8_1k_panoptic_fpn.yaml"),
    Method("DeepLabV3+ (baseline)", "semantic", "synthetic/semantic-segmentation/deeplabv3plus/deeplabv3plus_R18_bs8_1k.yaml"),
    Method("HSSN", "semantic", "synthetic/semantic-segmentation/hssn/hssn_R18_bs8_1k.yaml"),
    Method("ProtoSeg", "semantic", "synthetic/semantic-segmentation/protoseg/protoseg_R18_bs8_1k.yaml"),
    Method("RegProxy", "semantic", "synthetic/semantic-segmentation/regproxy/regproxy_vit_t16_bs8_1k.yaml"),
    Method("CRM", "refinement", "synthetic/refinement-segmentation/crm/crm_R18_small_bs4_128_1k.yaml"),
)  # fmt: skip


def method_slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def find_method(name: str) -> Method:
    for m in METHODS:
        if name in (m.name, method_slug(m.name)):
            return m
    raise SystemExit(
        f"--methods: unknown method {name!r}; known: {', '.join(m.name for m in METHODS)}"
    )


# ----------------------------------------------------------------------------------------------
# child: one method
# ----------------------------------------------------------------------------------------------
def load_cfg(config: str, opts: List[str]):
    from seg_methods.config import get_cfg
    from seg_methods.engine import resolve_device

    path = os.path.join(ROOT, "configs", config)
    if not os.path.isfile(path):
        raise SystemExit(f"compare_methods: config file {path} does not exist")
    cfg = get_cfg()
    cfg.merge_from_file(path, allow_unsafe=False)
    cfg.merge_from_list(opts)
    resolve_device(cfg)
    return cfg


def probe_step_seconds(cfg, iters: int, warmup: int) -> float:
    """Median wall time of one training step (data loading included) after ``warmup`` steps."""
    import tempfile

    from detectron2.utils.events import EventStorage

    from seg_methods.engine.trainer import Trainer

    cfg = cfg.clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = tempfile.mkdtemp(prefix="compare_methods_probe_")
    cfg.SOLVER.MAX_ITER = max(cfg.SOLVER.MAX_ITER, iters + warmup)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    times = []
    with EventStorage(0) as storage:
        trainer.storage = storage
        for i in range(warmup + iters):
            trainer.iter = storage.iter = i
            start = time.perf_counter()
            trainer.run_step()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    del trainer
    return statistics.median(times)


def scaled_schedule(cfg, iters: int) -> List[str]:
    """Config overrides running the config's schedule compressed to ``iters`` iterations."""
    total = cfg.SOLVER.MAX_ITER
    if iters >= total:
        return []
    f = iters / total
    steps = tuple(max(1, int(round(s * f))) for s in cfg.SOLVER.STEPS if s < total)
    opts = ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", str(steps)]
    opts += ["SOLVER.WARMUP_ITERS", str(int(round(cfg.SOLVER.WARMUP_ITERS * f)))]
    if cfg.SOLVER.CHECKPOINT_PERIOD > iters:
        opts += ["SOLVER.CHECKPOINT_PERIOD", str(iters)]
    if cfg.TEST.EVAL_PERIOD > iters:
        opts += ["TEST.EVAL_PERIOD", "0"]
    return opts


def inference_ms(
    cfg, weights: str, size: int, threads: int, repeats: int, family: str = ""
) -> float:
    """Median milliseconds of one inference on a ``size`` x ``size`` image: ``DefaultPredictor``,
    or, for the refinement family (whose input is an image and a coarse mask, which
    ``DefaultPredictor`` cannot pass), the predictor's model called on the image and a coarse
    mask (a centred disc) the way the predictor calls it (no_grad, one image)."""
    import numpy as np
    import torch
    from detectron2.data.detection_utils import read_image
    from PIL import Image

    from seg_methods.engine import build_predictor

    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = weights
    cfg.INPUT.MIN_SIZE_TEST = size
    cfg.INPUT.MAX_SIZE_TEST = size
    predictor = build_predictor(cfg)
    path = os.path.join(ROOT, "datasets", "synthetic", "val", "000000.jpg")
    image = read_image(path, format="BGR")
    image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    torch.set_num_threads(threads)
    run = lambda: predictor(image)  # noqa: E731
    if family == "refinement":
        if cfg.INPUT.FORMAT == "RGB":
            image = image[:, :, ::-1]
        chw = torch.as_tensor(np.ascontiguousarray(image.astype("float32").transpose(2, 0, 1)))
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        disc = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 3) ** 2).float()
        inputs = [{"image": chw, "coarse_mask": disc, "height": size, "width": size}]

        def run():
            with torch.no_grad():
                predictor.model(inputs)

    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def run_one(args) -> Dict:
    import torch
    from detectron2.modeling import build_model

    from seg_methods.engine import evaluate_checkpoint, train

    method = find_method(args.one)
    out_dir = os.path.join(args.output, method_slug(method.name))
    os.makedirs(out_dir, exist_ok=True)
    base_opts = ["SEED", str(args.seed), "OUTPUT_DIR", out_dir]
    cfg = load_cfg(method.config, base_opts)
    torch.set_num_threads(args.train_threads)
    row = {"method": method.name, "family": method.family, "config": method.config}
    row["settings"] = settings_of(args)
    row["config_iters"] = cfg.SOLVER.MAX_ITER
    row["params_m"] = sum(p.numel() for p in build_model(cfg).parameters()) / 1e6
    row["train_s_per_iter"] = probe_step_seconds(cfg, args.probe_iters, args.probe_warmup)

    weights = args.weights.get(method.name) or args.weights.get(method_slug(method.name))
    final = os.path.join(out_dir, "model_final.pth")
    if weights is None and args.reuse and os.path.isfile(final):
        weights = final
    start = time.perf_counter()
    if weights is not None:  # evaluate given weights
        row["iters"], row["trained"] = None, f"loaded {os.path.relpath(weights, ROOT)}"
        cfg = load_cfg(method.config, base_opts + ["MODEL.WEIGHTS", weights])
        results = evaluate_checkpoint(cfg)
    else:
        budget_iters = max(1, int(args.budget_minutes * 60 / row["train_s_per_iter"]))
        iters = min(cfg.SOLVER.MAX_ITER, budget_iters)
        cfg = load_cfg(method.config, base_opts + scaled_schedule(cfg, iters))
        row["iters"], row["trained"] = iters, "trained"
        results = train(cfg)
        weights = final
    row["train_eval_minutes"] = (time.perf_counter() - start) / 60
    with open(os.path.join(out_dir, "metrics.json")) as f:
        row["metrics"] = json.load(f)
    row["infer_ms"] = inference_ms(
        cfg, weights, args.size, args.threads, args.repeats, method.family
    )
    del results
    with open(os.path.join(out_dir, "compare.json"), "w") as f:
        json.dump(row, f, indent=2)
    return row


# ----------------------------------------------------------------------------------------------
# parent: every method, the table
# ----------------------------------------------------------------------------------------------
def _get(metrics: Dict, task: str, key: str) -> Optional[float]:
    for name, values in metrics.items():
        if name == task or name.endswith("/" + task):
            return values.get(key)
    return None


def _fmt(v, digits=1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table_rows(rows: List[Dict]) -> List[str]:
    head = (
        "| method | config (configs/…) | iterations run / config's | PQ | PQ_th | PQ_st | mIoU | AP "
        "| other | train s/it | inference ms/image | params (M) |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        m = r.get("metrics", {})
        miou = _get(m, "sem_seg", "mIoU")
        other = ""
        if _get(m, "refinement", "IoU") is not None:
            other = (
                f"IoU {_fmt(_get(m, 'refinement', 'IoU'))} / mBA {_fmt(_get(m, 'refinement', 'mBA'))}"
                f" (coarse {_fmt(_get(m, 'refinement', 'coarse_IoU'))} / "
                f"{_fmt(_get(m, 'refinement', 'coarse_mBA'))})"
            )
        if "error" in r:
            other = f"failed: {r['error']}"
        iters = r.get("iters")
        run = r.get("trained", "") if iters is None else f"{iters} / {r.get('config_iters')}"
        lines.append(
            f"| {r['method']} | `{r['config']}` | {run} | {_fmt(_get(m, 'panoptic_seg', 'PQ'))} "
            f"| {_fmt(_get(m, 'panoptic_seg', 'PQ_th'))} | {_fmt(_get(m, 'panoptic_seg', 'PQ_st'))} "
            f"| {_fmt(miou)} | {_fmt(_get(m, 'segm', 'AP'))} | {other} "
            f"| {_fmt(r.get('train_s_per_iter'), 2)} | {_fmt(r.get('infer_ms'), 0)} "
            f"| {_fmt(r.get('params_m'), 2)} |"
        )
    return lines


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, no GPU"


def caption(args, argv: List[str]) -> str:
    cmd = shlex.join(["python", "tools/compare_methods.py", *argv])
    return (
        f"Measured {time.strftime('%Y-%m-%d')} with `{cmd.strip()}` on {machine()}. Each method "
        f"trains its own config's schedule, compressed to the same {args.budget_minutes:g}-minute "
        f"training budget when it does not fit (LR steps and warm-up scaled), seed {args.seed}, "
        f"{args.train_threads} training thread(s); metrics on the config's test set of the "
        f"embedded dataset; training s/it = median of {args.probe_iters} steps; inference = "
        f"DefaultPredictor on one {args.size}x{args.size} image (CRM: its model on the image and a "
        f"coarse mask), {args.threads} thread(s), median of {args.repeats}."
        + (f" {args.jobs} methods ran at a time, sharing the machine." if args.jobs > 1 else "")
        + (
            " Rows measured by earlier runs are kept (--reuse-results)."
            if args.reuse_results
            else ""
        )
    )


def update_readme(text: str, path: str) -> None:
    with open(path) as f:
        readme = f.read()
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"{path}: the markers {BEGIN} / {END} are missing")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as f:
        f.write(head + BEGIN + "\n" + text + "\n" + END + tail)


def parse_weights(items: List[str]) -> Dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--weights expects METHOD=PATH, got {item!r}")
        name, path = item.split("=", 1)
        if not os.path.isfile(path):
            raise SystemExit(f"--weights {name}: file {path} does not exist")
        out[find_method(name).name] = os.path.abspath(path)
    return out


POLL_SECONDS = 2.0  # how often the parent looks at running children (--jobs > 1)


def start_child(cmd: List[str], log) -> subprocess.Popen:
    """One child process (``--one``), its output to ``log`` (None: this terminal)."""
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT if log else None)


def settings_of(args) -> Dict:
    return {k: getattr(args, k) for k in SETTINGS}


def reusable_row(path: str, method: Method, args) -> Optional[Dict]:
    """The row of an earlier run at ``path`` if it measured ``method``'s config with the same
    :data:`SETTINGS` as ``args``; None otherwise (the reason is printed)."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        row = json.load(f)
    if row.get("config") != method.config:
        print(f"{method.name}: {path} measured another config ({row.get('config')}): rerun")
        return None
    if row.get("settings") != settings_of(args):
        print(f"{method.name}: {path} measured other settings ({row.get('settings')}): rerun")
        return None
    return row


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="", help="comma-separated names (default: all)")
    p.add_argument("--budget-minutes", type=float, default=10.0, help="training budget per method")
    p.add_argument("--output", default=os.path.join(ROOT, "output", "compare_methods"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", action="store_true", help="evaluate <output>/<m>/model_final.pth")
    p.add_argument(
        "--reuse-results", action="store_true", help="keep rows of earlier runs (same config)"
    )
    p.add_argument("--weights", action="append", default=[], metavar="METHOD=PATH")
    p.add_argument("--size", type=int, default=256, help="inference image size")
    p.add_argument("--threads", type=int, default=1, help="inference intra-op threads")
    p.add_argument("--train-threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--probe-iters", type=int, default=5)
    p.add_argument("--probe-warmup", type=int, default=2)
    p.add_argument("--jobs", type=int, default=1, help="methods measured at the same time")
    p.add_argument("--update-readme", action="store_true")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child mode
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = get_parser().parse_args(argv)
    args.weights = parse_weights(args.weights)
    if args.one is not None:
        sys.path.insert(0, ROOT)
        run_one(args)
        return 0
    methods = [find_method(n.strip()) for n in args.methods.split(",") if n.strip()] or METHODS
    for m in methods:  # fail before hours of training, not after
        if not os.path.isfile(os.path.join(ROOT, "configs", m.config)):
            raise SystemExit(f"compare_methods: {m.name}: config configs/{m.config} is missing")
    args.output = os.path.abspath(args.output)
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    rows: List[Optional[Dict]] = [None] * len(methods)
    pending = []
    for i, m in enumerate(methods):
        result = os.path.join(args.output, method_slug(m.name), "compare.json")
        row = reusable_row(result, m, args) if args.reuse_results else None
        if row is not None:
            print(f"[{i + 1}/{len(methods)}] {m.name}: kept the row of {result}")
            rows[i] = row
        else:
            pending.append(i)
    running: Dict[int, tuple] = {}  # index -> (process, start time, log file or None)

    def finish(i: int, proc, start: float, log) -> None:
        m = methods[i]
        if log is not None:
            log.close()
        result = os.path.join(args.output, method_slug(m.name), "compare.json")
        if proc.returncode == 0 and os.path.isfile(result):
            with open(result) as f:
                rows[i] = json.load(f)
        else:
            where = f" (log: {log.name})" if log is not None else ""
            rows[i] = {
                "method": m.name,
                "config": m.config,
                "error": f"exit code {proc.returncode}{where}",
            }
        took = (time.perf_counter() - start) / 60
        print(f"[{i + 1}/{len(methods)}] {m.name}: done in {took:.1f} min", flush=True)

    while pending or running:
        while pending and len(running) < args.jobs:
            i = pending.pop(0)
            m = methods[i]
            print(f"[{i + 1}/{len(methods)}] {m.name}: configs/{m.config}", flush=True)
            out_dir = os.path.join(args.output, method_slug(m.name))
            os.makedirs(out_dir, exist_ok=True)
            result = os.path.join(out_dir, "compare.json")
            if os.path.isfile(result):
                os.remove(result)  # a failed child must not leave an old row behind
            child = [sys.executable, os.path.abspath(__file__), *argv]
            child += ["--output", args.output, "--one", m.name]
            log = open(os.path.join(out_dir, "compare.log"), "w") if args.jobs > 1 else None
            proc = start_child(child, log)
            running[i] = (proc, time.perf_counter(), log)
        if args.jobs == 1:
            ((i, (proc, start, log)),) = running.items()
            proc.wait()
        else:
            time.sleep(POLL_SECONDS)
        for i in [i for i, (proc, _, _) in running.items() if proc.poll() is not None]:
            finish(i, *running.pop(i))
    # the table in METHODS order whatever the run order (--methods can start long ones first)
    order = {m.name: k for k, m in enumerate(METHODS)}
    rows = [rows[i] for i in sorted(range(len(methods)), key=lambda i: order[methods[i].name])]
    shown = [a for a in argv if a not in ("--update-readme",)]
    text = "\n".join(table_rows(rows) + ["", caption(args, shown)])
    print(text)
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "table.md"), "w") as f:
        f.write(text + "\n")
    if args.update_readme:
        update_readme(text, os.path.join(ROOT, "README.md"))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
