"""Whole-model Mask2Former CPU inference: compiled deformable-attention op vs PyTorch reference.

The paper's COCO panoptic R50 model (configs/coco/panoptic-segmentation/mask2former/
mask2former_R50_bs16_50ep.yaml: 133 classes, 100 queries, 6 encoder layers, 9 decoder layers,
semantic + instance + panoptic inference), random weights, one 512x512 image, eval mode. The
same model runs both ways: every MSDeformAttn module's ``impl`` is switched between "op" and
"pytorch". Runs are interleaved; medians are reported. Peak memory: see benchmarks/common.py.

Run: .venv/bin/python benchmarks/mask2former_inference.py [--repeats 5] [--size 512]

``--against-official ROOT`` (a facebookresearch/Mask2Former checkout, as for
tools/compare_with_official_mask2former.py) instead compares whole-model inference with the
official code on the same random weights (the parity tool's official-format checkpoint): the
official model (its CPU deformable-attention fallback), ours with the defaults, and ours with the
eval-only option ``MODEL.MASK2FORMER.EVAL_LEVEL_SIZE_ATTENTION_MASKS`` (``--fast-opts``), all in
float32, one ``--size`` image whose outputs are asked at that size (semantic + panoptic +
instance). Before timing, the parity tool's eval comparison runs with those options (its
tolerances; exit status 1 when it fails). Timing: CPU time of ``--threads`` threads (default 1
in this mode) and wall time, interleaved, medians.
"""
import argparse
import os
import statistics
import sys
import time

import torch

from common import (  # benchmarks/common.py
    interleaved_medians,
    official_with_random_weights,
    parity_tool,
    peak_memory_bytes,
    write_report,
)

import seg_methods  # noqa: F401  (registers the model)
from detectron2.modeling import build_model
from seg_methods.config import get_cfg
from seg_methods.layers.deform_attn import MSDeformAttn

CONFIG = "configs/coco/panoptic-segmentation/mask2former/mask2former_R50_bs16_50ep.yaml"


def set_impl(model, impl):
    for m in model.modules():
        if isinstance(m, MSDeformAttn):
            m.impl = impl


def pixel_decoder_fn(model, inputs, impl):
    """A callable running the pixel decoder alone (where the op is used) with ``impl``."""
    with torch.no_grad():
        feats = model.backbone(model.preprocess_images(inputs).tensor)

    def fn():
        set_impl(model, impl)  # set at call time: the callables are interleaved
        with torch.no_grad():
            return model.sem_seg_head.pixel_decoder.forward_features(feats)

    return fn


FAST_OPTS = ["MODEL.MASK2FORMER.EVAL_LEVEL_SIZE_ATTENTION_MASKS", "True"]


def against_official(official_root, size, repeats, fast_opts, seed=0):
    """Whole-model inference, the official Mask2Former vs ours (module docstring).

    Returns:
        dict: the parity result (pass/fail, largest relative difference, failed rows), CPU
        seconds per image (medians and all runs) of "official", "ours" and "ours_fast", and the
        speed-ups over the official model.
    """
    parity = parity_tool()
    # 1. the parity tool's eval comparison, with the fast options (the default ones are
    #    checked by the tool's own runs and tests)
    report = parity.compare(
        official_root,
        CONFIG,
        opts=list(fast_opts),
        impls=("op",),
        sizes=((size, size),),
        train=False,
        seed=seed,
        log=lambda msg: print(f"  parity: {msg}", flush=True),
    )
    print(parity.format_report(report, verbose=False))
    floats = [r for r in report.rows if r.rel_diff is not None]
    worst = max(floats, key=lambda r: r.rel_diff)
    result = {
        "parity_ok": report.ok,
        "parity_rows": len(report.rows),
        "parity_largest_rel_diff": worst.rel_diff,
        "parity_largest_rel_diff_row": f"{worst.section} {worst.name}",
        "parity_failed_rows": [f"{r.section} {r.name}: {r.note}" for r in report.failed()],
        "fast_opts": list(fast_opts),
    }

    # 2. timing, same weights
    ours_cfg = parity.our_cfg(CONFIG, [], "op")
    with official_with_random_weights(official_root, ours_cfg, seed) as (_, official_model, weights):
        models = {"official": official_model}
        for name, opts in (("ours", []), ("ours_fast", list(fast_opts))):
            models[name] = build_model(parity.our_cfg(CONFIG, opts, "op"))
            parity.load_our_weights(models[name], weights)
    num_classes = ours_cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    inputs = parity.make_inputs([(size, size)], num_classes, seed, with_gt=False)
    inputs[0]["height"] = inputs[0]["width"] = size  # outputs at the input size
    cpu = {name: [] for name in models}
    wall = {name: [] for name in models}
    for r in range(repeats + 1):  # round 0: warm-up
        for name, model in models.items():
            model.eval()
            c0, w0 = time.process_time(), time.perf_counter()
            with torch.no_grad():
                model([dict(x) for x in inputs])
            if r:
                cpu[name].append(time.process_time() - c0)
                wall[name].append(time.perf_counter() - w0)
        if r:
            times = ", ".join(f"{k} {v[-1]:.2f}s" for k, v in cpu.items())
            print(f"round {r} (CPU time): {times}", flush=True)
    med = {k: statistics.median(v) for k, v in cpu.items()}
    wall_med = {k: statistics.median(v) for k, v in wall.items()}
    result.update(
        {
            "cpu_s_median": med,
            "cpu_s": cpu,
            "speedup_vs_official": {k: med["official"] / m for k, m in med.items()},
            "wall_s_median": wall_med,
            "wall_s": wall,
            "speedup_vs_official_wall": {
                k: wall_med["official"] / m for k, m in wall_med.items()
            },
        }
    )
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument(
        "--threads", type=int, default=None, help="default: 2; 1 with --against-official"
    )
    parser.add_argument("--against-official", metavar="ROOT", default=None)
    parser.add_argument("--fast-opts", nargs="*", default=FAST_OPTS)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    results = os.path.join(os.path.dirname(__file__), "results")
    if args.against_official:
        torch.set_num_threads(args.threads or 1)
        res = against_official(args.against_official, args.size, args.repeats, args.fast_opts)
        med, sp = res["cpu_s_median"], res["speedup_vs_official"]
        wmed, wsp = res["wall_s_median"], res["speedup_vs_official_wall"]
        table = (
            "| model | CPU s/image | official / model | wall s/image | official / model |\n"
            "|---|---|---|---|---|\n"
        ) + "\n".join(
            f"| {k} | {med[k]:.3f} | {sp[k]:.2f}x | {wmed[k]:.3f} | {wsp[k]:.2f}x |" for k in med
        )
        print(table)
        write_report(
            args.output or os.path.join(results, "mask2former_inference_official.json"),
            {"config": CONFIG, "image_size": args.size, "repeats": args.repeats, **res,
             "markdown": table},
        )
        return 0 if res["parity_ok"] else 1
    args.output = args.output or os.path.join(results, "mask2former_inference.json")
    args.threads = args.threads or 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = get_cfg()
    cfg.merge_from_file(CONFIG)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    model = build_model(cfg).eval()
    image = torch.randint(0, 256, (3, args.size, args.size), dtype=torch.uint8)
    inputs = [{"image": image, "height": args.size, "width": args.size}]

    def run(impl):
        def fn():
            set_impl(model, impl)
            with torch.no_grad():
                return model(inputs)

        return fn

    # warm-up and output agreement
    out_op, out_ref = run("op")(), run("pytorch")()
    sem_diff = (out_op[0]["sem_seg"] - out_ref[0]["sem_seg"]).abs().max().item()
    medians, runs = interleaved_medians({"op": run("op"), "pytorch": run("pytorch")}, args.repeats)
    pixel_decoder = {impl: pixel_decoder_fn(model, inputs, impl) for impl in ("op", "pytorch")}
    pd_medians, _ = interleaved_medians(pixel_decoder, args.repeats)
    peak = {impl: peak_memory_bytes(run(impl)) / 2**20 for impl in ("op", "pytorch")}
    pd_peak = {impl: peak_memory_bytes(fn) / 2**20 for impl, fn in pixel_decoder.items()}
    rows = [
        ("whole model, s/image", medians["op"], medians["pytorch"], medians["pytorch"] / medians["op"]),
        ("pixel decoder, s", pd_medians["op"], pd_medians["pytorch"], pd_medians["pytorch"] / pd_medians["op"]),
        ("peak extra memory, whole model, MiB", peak["op"], peak["pytorch"], peak["pytorch"] / peak["op"]),
        ("peak extra memory, pixel decoder, MiB", pd_peak["op"], pd_peak["pytorch"],
         pd_peak["pytorch"] / pd_peak["op"]),
    ]
    table = "| measure | op | PyTorch reference | reference / op |\n|---|---|---|---|\n"
    table += "\n".join(f"| {n} | {a:.3f} | {b:.3f} | {r:.2f}x |" for n, a, b, r in rows)
    print(
        f"Mask2Former R50 (COCO panoptic config), one {args.size}x{args.size} image, CPU, "
        f"{args.threads} threads, median of {args.repeats}\n\n{table}\n"
        f"max |sem_seg(op) - sem_seg(reference)| = {sem_diff:.2e}"
    )
    write_report(
        args.output,
        {
            "config": CONFIG,
            "image_size": args.size,
            "repeats": args.repeats,
            "median_s": medians,
            "all_s": runs,
            "pixel_decoder_median_s": pd_medians,
            "peak_extra_memory_mib": peak,
            "pixel_decoder_peak_extra_memory_mib": pd_peak,
            "speedup_whole_model": medians["pytorch"] / medians["op"],
            "sem_seg_max_abs_diff": sem_diff,
            "markdown": table,
        },
    )


if __name__ == "__main__":
    sys.exit(main())
