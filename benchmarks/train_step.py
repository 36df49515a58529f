"""Seconds per training step of each method's synthetic config, with every speed option on and off.

For each method, one leaf config under configs/synthetic (:data:`METHOD_CONFIGS`) is built once
per variant from the same seed (same initial weights); every variant trains on the same fixed
batches of the real training loader (data loading is measured apart, see below). A step is what
the trainer does: forward (losses included), zero_grad, backward, optimizer step (with the
config's gradient clipping). Variants are run interleaved, one step each per round, after one
warm-up step each, so that the load of this shared machine affects every variant alike; the
median over the rounds is reported. The time measured is the CPU time of the calling thread
(``time.thread_time``), with ``torch.set_num_threads(1)``: it does not count the time another
process holds the core, so it is the stable measure on a shared machine (wall times are in the
JSON too).

Variants (``cfg.SPEED``, see seg_methods/config/speed.py):

* ``baseline``: every option off (float32, contiguous, eager, PyTorch's default optimizer
  implementation: the for-loop on the CPU);
* ``bf16``: ``SPEED.BF16_AUTOCAST`` (criteria and matcher stay float32);
* ``bf16_fpn`` (``--options``/``--official-options``): ``bf16`` plus
  ``MODEL.MSDEFORM_PIXEL_DECODER.FPN_AUTOCAST`` (the pixel decoder's FPN and mask-feature convs
  in bf16 too; the deformable encoder stays float32); ``bf16_fpn_ffn``: also the encoder layers'
  FFNs (``MODEL.MSDEFORM_PIXEL_DECODER.ENCODER_FFN_AUTOCAST``);
* ``channels_last``: ``SPEED.CHANNELS_LAST``;
* ``foreach``, ``fused``: ``SPEED.OPTIMIZER_IMPL``;
* ``compile`` (only with ``--compile``: compiling takes minutes on this machine):
  ``SPEED.COMPILE.ENABLED``; the first-step time minus the baseline's median is reported as the
  compile time;
* ``all``: every option above that is measured, together.

Data: the seconds (CPU time of this thread) the training loader (``DATALOADER.NUM_WORKERS = 0``,
so it runs in this thread) takes to produce one batch, against the baseline's step: a ratio
below 1 means one loader worker (the synthetic configs' ``NUM_WORKERS: 1``) keeps up with the
step when it has a core of its own.

``--against-official``: a training step of the paper's COCO panoptic R50 Mask2Former (batch 2,
512x512) here and in facebookresearch/Mask2Former (found as tools/compare_with_official_
mask2former.py finds it: ``MASK2FORMER_OFFICIAL_ROOT`` or PyPI's maskformer2), from the same
weights, interleaved; see :func:`against_official`.

Run (from the repository root):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_step.py [--methods mask2former clustseg]
        [--repeats 3] [--compile] [--against-official]
Writes benchmarks/results/train_step.json. The default run (14 methods x 6 variants x 4 steps)
needs about 16 CPU-minutes: the first nine configs took 10 (42 minutes of wall time on 2 cores
shared with other jobs at load ~14), the last five 6 (at load ~2.5). ``--methods`` picks some.
``--against-official`` adds ~15 steps of the R50 model at 512x512 (~4 CPU-minutes; 30 minutes of
wall time at load ~14).
"""

import argparse
import copy
import itertools
import os
import statistics
import sys
import time

import torch

from common import (  # benchmarks/common.py
    official_with_random_weights,
    parity_tool,
    write_report,
)

import seg_methods  # noqa: F401  (registers everything)
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from seg_methods.config import get_cfg
from seg_methods.data.build import build_train_loader
from seg_methods.engine.speed import TrainingAutocast, prepare_model_for_speed
from seg_methods.solver import build_optimizer

SYN = "configs/synthetic"
# method -> its synthetic leaf config (one per method)
METHOD_CONFIGS = {
    "mask2former": f"{SYN}/panoptic-segmentation/mask2former/mask2former_R18_bs8_600it.yaml",
    "cmt_deeplab": f"{SYN}/panoptic-segmentation/cmt_deeplab/cmt_deeplab_R18_bs8_1k.yaml",
    "clustseg": f"{SYN}/panoptic-segmentation/clustseg/clustseg_R18_bs8_1k.yaml",
    "hle": f"{SYN}/panoptic-segmentation/hle/hle_R18_bs8_1k.yaml",
    "deeplabv3plus": f"{SYN}/semantic-segmentation/deeplabv3plus/deeplabv3plus_R18_bs8_1k.yaml",
    "hssn": f"{SYN}/semantic-segmentation/hssn/hssn_R18_bs8_1k.yaml",
    "protoseg": f"{SYN}/semantic-segmentation/protoseg/protoseg_R18_bs8_1k.yaml",
    "regproxy": f"{SYN}/semantic-segmentation/regproxy/regproxy_vit_t16_bs8_1k.yaml",
    "crm": f"{SYN}/refinement-segmentation/crm/crm_R18_small_bs4_128_1k.yaml",
    "panoptic_segformer": (
        f"{SYN}/panoptic-segmentation/panoptic_segformer/panoptic_segformer_R18_bs8_600it.yaml"
    ),
    "dense_affinity_panoptic": f"{SYN}/panoptic-segmentation/dense_affinity_panoptic/"
    "dense_affinity_panoptic_R18_bs8_1k.yaml",
    "pisr_panoptic_fpn": f"{SYN}/panoptic-segmentation/pisr/pisr_R18_bs8_1k_panoptic_fpn.yaml",
    "pisr_panoptic_deeplab": (
        f"{SYN}/panoptic-segmentation/pisr/pisr_R18_bs8_1k_panoptic_deeplab.yaml"
    ),
    "pisr_mask2former": f"{SYN}/panoptic-segmentation/pisr/pisr_R18_bs8_1k_mask2former.yaml",
}

# option -> config overrides turning it on
OPTIONS = {
    "bf16": ["SPEED.BF16_AUTOCAST", True],
    # bf16 in the backbone only / in the backbone and the pixel decoder (outputs cast back)
    "bf16_backbone": ["SPEED.BF16_AUTOCAST", True, "SPEED.BF16_AUTOCAST_MODULES", ["backbone"]],
    "bf16_encoder": [
        "SPEED.BF16_AUTOCAST",
        True,
        "SPEED.BF16_AUTOCAST_MODULES",
        ["backbone", "sem_seg_head.pixel_decoder"],
    ],
    # bf16 with the pixel decoder's FPN / mask-feature convs in bf16 too (MSDeformAttn decoders)
    "bf16_fpn": ["SPEED.BF16_AUTOCAST", True, "MODEL.MSDEFORM_PIXEL_DECODER.FPN_AUTOCAST", True],
    # ... and the deformable encoder's FFNs in bf16 too (the deformable attention stays float32)
    "bf16_fpn_ffn": [
        "SPEED.BF16_AUTOCAST",
        True,
        "MODEL.MSDEFORM_PIXEL_DECODER.FPN_AUTOCAST",
        True,
        "MODEL.MSDEFORM_PIXEL_DECODER.ENCODER_FFN_AUTOCAST",
        True,
    ],
    "channels_last": ["SPEED.CHANNELS_LAST", True],
    "foreach": ["SPEED.OPTIMIZER_IMPL", "foreach"],
    "fused": ["SPEED.OPTIMIZER_IMPL", "fused"],
    "compile": ["SPEED.COMPILE.ENABLED", True],
}


# every option off (the config default of SPEED.OPTIMIZER_IMPL is "fused")
ALL_OFF = ["SPEED.OPTIMIZER_IMPL", "default", "SPEED.BF16_AUTOCAST", False]
ALL_OFF += ["SPEED.CHANNELS_LAST", False, "SPEED.COMPILE.ENABLED", False]


def method_cfg(config_file, overrides=()):
    """``config_file`` on the CPU, no weights, loader in this thread, every speed option off,
    then ``overrides``."""
    cfg = get_cfg()
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "DATALOADER.NUM_WORKERS", 0])
    cfg.merge_from_list(ALL_OFF)
    cfg.merge_from_list(list(overrides))
    return cfg


def variant_overrides(options):
    """{variant: overrides}: baseline, one variant per option, and "all" (the options together;
    when several exclude each other, the first bf16 option and the fused optimizer stand for
    their kind)."""
    variants = {"baseline": []}
    for o in options:
        variants[o] = list(OPTIONS[o])
    bf16 = [o for o in options if o.startswith("bf16")][:1]
    combined = [
        o
        for o in options
        if not (o == "foreach" and "fused" in options)
        and not (o.startswith("bf16") and o not in bf16)
    ]
    if len(combined) > 1:
        variants["all"] = list(itertools.chain.from_iterable(OPTIONS[o] for o in combined))
    return variants


class TrainStep:
    """One variant: model + optimizer built from ``cfg`` with the trainer's speed options."""

    def __init__(self, cfg, seed=0):
        torch.manual_seed(seed)
        self.model = prepare_model_for_speed(cfg, build_model(cfg)).train()
        self.autocast = None
        if cfg.SPEED.BF16_AUTOCAST:
            self.autocast = TrainingAutocast(
                self.model, device_type="cpu", modules=cfg.SPEED.BF16_AUTOCAST_MODULES
            )
        self.optimizer = build_optimizer(cfg, self.model)
        self.last_losses = None

    def __call__(self, batch):
        loss_dict = self.model(batch)
        losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        losses.backward()
        self.optimizer.step()
        self.last_losses = {k: float(v.detach()) for k, v in loss_dict.items()}
        return losses


def cpu_and_wall(fn):
    t0, w0 = time.thread_time(), time.perf_counter()
    fn()
    return time.thread_time() - t0, time.perf_counter() - w0


def measure_method(name, config_file, options, repeats, num_batches):
    """Interleaved step times of every variant of one method, inside an ``EventStorage`` as in
    the trainer (detectron2's RPN logs its statistics there). Returns a dict (JSON-able)."""
    with EventStorage(0):
        return _measure_method(config_file, options, repeats, num_batches)


def _measure_method(config_file, options, repeats, num_batches):
    base_cfg = method_cfg(config_file)
    loader = iter(build_train_loader(base_cfg))
    data_cpu = []
    batches = []
    for _ in range(num_batches):
        t0 = time.thread_time()
        batches.append(next(loader))
        data_cpu.append(time.thread_time() - t0)
    variants = variant_overrides(options)
    steps, first = {}, {}
    for v, overrides in variants.items():
        steps[v] = TrainStep(method_cfg(config_file, overrides))
    cycle = itertools.cycle(batches)
    # warm-up: one step each on the same batch (the compile variant compiles here)
    warm = next(cycle)
    for v, step in steps.items():
        first[v] = cpu_and_wall(lambda: step(copy.copy(warm)))
    cpu = {v: [] for v in variants}
    wall = {v: [] for v in variants}
    for _ in range(repeats):
        batch = next(cycle)
        for v, step in steps.items():
            c, w = cpu_and_wall(lambda: step(copy.copy(batch)))
            cpu[v].append(c)
            wall[v].append(w)
    med = {v: statistics.median(x) for v, x in cpu.items()}
    result = {
        "config": config_file,
        "batch_size": base_cfg.SOLVER.IMS_PER_BATCH,
        "step_cpu_s_median": med,
        "step_cpu_s": cpu,
        "step_wall_s": wall,
        "first_step_cpu_s": {v: f[0] for v, f in first.items()},
        "first_step_wall_s": {v: f[1] for v, f in first.items()},
        "speedup_vs_baseline": {v: med["baseline"] / m for v, m in med.items()},
        "data_cpu_s_per_batch": statistics.median(data_cpu),
        "data_over_step": statistics.median(data_cpu) / med["baseline"],
        "total_loss_after_warmup": {
            v: sum(s.last_losses.values()) for v, s in steps.items() if s.last_losses
        },
    }
    if "compile" in variants:
        result["compile_s_estimate"] = first["compile"][1] - statistics.median(wall["baseline"])
    return result


OFFICIAL_CONFIG = "configs/coco/panoptic-segmentation/mask2former/mask2former_R50_bs16_50ep.yaml"


def deform_attn_op_vs_pytorch(model, inputs, seed):
    """One fp32 training forward of ``model`` from ``seed`` with the compiled deformable-attention
    op and with its PyTorch reference (the parity tool's ``run_train``); each ``MSDeformAttn``
    keeps its own implementation afterwards.

    Returns:
        (dict, dict): relative loss differences (op vs reference) and the indices of the matcher
        calls that got another assignment; the two runs ({"op", "pytorch"}).
    """
    attn = [m for m in model.modules() if type(m).__name__ == "MSDeformAttn"]
    impls = {m: m.impl for m in attn}
    runs = {}
    try:
        for impl in ("op", "pytorch"):
            for m in attn:
                m.impl = impl
            runs[impl] = parity_tool().run_train(model, inputs, seed)
    finally:
        for m, impl in impls.items():
            m.impl = impl
    op, ref = runs["op"], runs["pytorch"]
    rel = {
        k: float(
            (op["losses"][k] - ref["losses"][k]).abs() / ref["losses"][k].abs().clamp(min=1e-12)
        )
        for k in sorted(ref["losses"])
    }
    flipped = [
        i
        for i, (a, b) in enumerate(zip(op["matchings"], ref["matchings"]))
        if any(not (torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])) for x, y in zip(a, b))
    ]
    result = {
        "max_rel_loss_diff": max(rel.values()),
        "rel_loss_diff": rel,
        "matcher_calls": len(ref["matchings"]),
        "matcher_calls_differing": flipped,
    }
    return result, runs


def against_official(official_root, repeats, fast_options, size=512, batch=2, seed=0):
    """A training step of the COCO panoptic R50 Mask2Former, ours vs the official code.

    Both models are built from :data:`OFFICIAL_CONFIG` (the official config derived from ours by
    tools/compare_with_official_mask2former.py), loaded with the same random weights (the parity
    tool's ``random_official_state``), fed the same ``batch`` random ``size`` x ``size`` images
    with random panoptic ground truth. First the fp32 losses of one forward from the same seed
    are compared (same points, same matching: the parity tool's check). Then steps (forward,
    backward, AdamW with full-model gradient clipping, as both recipes) are timed interleaved:
    the official model (its CPU deformable-attention fallback), ours with every speed option
    off (float32, the for-loop AdamW) and ours with ``fast_options``.

    Returns:
        dict: step CPU seconds (medians and all), speed-ups, loss differences (``repeats`` 0:
        the loss check only).
    """
    parity = parity_tool()
    ours_cfg = method_cfg(OFFICIAL_CONFIG)
    ours_cfg.INPUT.MIN_SIZE_TRAIN = (size,)
    with official_with_random_weights(official_root, ours_cfg, seed) as (
        official,
        official_model,
        weights,
    ):
        official_model.train()
        variants = {"ours_fp32": [], "ours_fast": [x for o in fast_options for x in OPTIONS[o]]}
        ours = {}
        for v, overrides in variants.items():
            ours[v] = TrainStep(method_cfg(OFFICIAL_CONFIG, overrides))
            parity.load_our_weights(ours[v].model, weights)
    num_classes = ours_cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    inputs = parity.make_inputs([(size, size)] * batch, num_classes, seed, with_gt=True)
    for x in inputs:  # training inputs carry no output size
        x.pop("height", None), x.pop("width", None)

    # fp32 losses of the same weights, points and seed, with our PyTorch deformable attention
    # (the same operations as the official CPU fallback: the parity tool's exact check), and the
    # same with our compiled op: its outputs differ from the reference by ~1e-6, which can flip a
    # near-tie of the Hungarian costs; such a flip changes that layer's losses at the 1e-3 level,
    # so the matchings are compared too
    t0 = time.perf_counter()
    ref = parity.run_train(official_model, inputs, seed)["losses"]
    op_vs_ref, runs = deform_attn_op_vs_pytorch(ours["ours_fp32"].model, inputs, seed)
    mine = runs["pytorch"]["losses"]
    op_rel, flipped = op_vs_ref["rel_loss_diff"], op_vs_ref["matcher_calls_differing"]
    print(f"ours, compiled op vs PyTorch deformable attention: max rel loss diff "
          f"{op_vs_ref['max_rel_loss_diff']:.2e}; matcher calls with another assignment: "
          f"{flipped} of {op_vs_ref['matcher_calls']}")  # fmt: skip
    loss_rel = {
        k: float((mine[k] - ref[k]).abs() / ref[k].abs().clamp(min=1e-12)) for k in sorted(ref)
    }
    print(f"official vs ours fp32 losses: max rel diff {max(loss_rel.values()):.2e} "
          f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip

    official_model.train()
    params = [p for p in official_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=ours_cfg.SOLVER.BASE_LR, weight_decay=0.05)
    clip = ours_cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE

    def official_step(batch_inputs):
        losses = sum(official_model(batch_inputs).values())
        opt.zero_grad()
        losses.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()

    result = {
        "config": OFFICIAL_CONFIG,
        "official_root": official_root,
        "official_patches": official.patches,
        "batch": batch,
        "size": size,
        "fp32_loss_rel_diff": loss_rel,
        "fp32_loss_max_rel_diff": max(loss_rel.values()),
        "op_vs_pytorch_loss_rel_diff": op_rel,
        "op_vs_pytorch_matcher_calls_differing": flipped,
        "matcher_calls": op_vs_ref["matcher_calls"],
    }
    if repeats <= 0:  # the loss check only
        return result
    for v in ours:
        ours[v].model.train()
    fns = {"official": official_step, **ours}
    cpu = {k: [] for k in fns}
    for r in range(repeats + 1):  # round 0: warm-up
        for k, fn in fns.items():
            c, _ = cpu_and_wall(lambda: fn([dict(x) for x in inputs]))
            if r:
                cpu[k].append(c)
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in cpu.items() if v and r))
    med = {k: statistics.median(v) for k, v in cpu.items()}
    result.update(
        {
            "fast_options": list(fast_options),
            "step_cpu_s_median": med,
            "step_cpu_s": cpu,
            "speedup_vs_official": {k: med["official"] / m for k, m in med.items()},
        }
    )
    return result


def markdown(results):
    lines = [
        "| method | option | s/step on | s/step off | off / on | data s/batch |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        med = r["step_cpu_s_median"]
        for v, m in med.items():
            if v == "baseline":
                continue
            lines.append(
                f"| {name} | {v} | {m:.3f} | {med['baseline']:.3f} | "
                f"{med['baseline'] / m:.2f}x | {r['data_cpu_s_per_batch']:.3f} |"
            )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--methods", nargs="*", default=list(METHOD_CONFIGS), help="none: only --against-official"
    )
    parser.add_argument(
        "--options", nargs="*", default=["bf16", "channels_last", "foreach", "fused"]
    )
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=2, help="distinct batches cycled")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--against-official", action="store_true")
    parser.add_argument(
        "--official-root",
        default=os.environ.get("MASK2FORMER_OFFICIAL_ROOT", "/work/ref/Mask2Former"),
        help="facebookresearch/Mask2Former checkout (or unpacked maskformer2 sdist)",
    )
    parser.add_argument(
        "--official-options",
        nargs="*",
        default=["bf16", "channels_last", "fused"],
        help="speed options of our fast variant in --against-official",
    )
    parser.add_argument("--size", type=int, default=512, help="--against-official image size")
    parser.add_argument(
        "--output", default=os.path.join(os.path.dirname(__file__), "results", "train_step.json")
    )
    args = parser.parse_args()
    unknown = sorted(set(args.methods) - set(METHOD_CONFIGS))
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {sorted(METHOD_CONFIGS)}")
    options = list(args.options) + (["compile"] if args.compile else [])
    torch.set_num_threads(args.threads)
    results = {}
    report = {"threads": args.threads, "repeats": args.repeats, "options": options}
    for name in args.methods:
        t0 = time.perf_counter()
        results[name] = measure_method(
            name, METHOD_CONFIGS[name], options, args.repeats, args.batches
        )
        medians = {k: round(v, 3) for k, v in results[name]["step_cpu_s_median"].items()}
        print(f"{name}: s/step {medians} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if results:
        table = markdown(results)
        print(table)
        report.update({"methods": results, "markdown": table})
    if args.against_official:
        report["against_official"] = against_official(
            args.official_root, args.repeats, args.official_options, args.size
        )
    write_report(args.output, report)


if __name__ == "__main__":
    main()
