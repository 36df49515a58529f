"""Benchmark of the low-rank dense affinity apply (Unifying Training and Inference, Eq. 3-4), CPU.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dense_affinity.py`` (about 2-4 minutes on
our loaded 2-core machine). Writes ``benchmarks/results/dense_affinity.json`` and prints markdown
tables. ``--full`` adds forward + backward at 4 megapixels (about 11 GB of RAM); ``--quick``
runs small sizes only (a smoke run).

Sides, all float32, torch threads = 1, N = 50 channels (detections + stuff), C = 128 (the paper):

* ``op``: ``dense_affinity_apply(impl="ext")``, compiled op, ATen GEMM backend (the default);
* ``op-direct``: the compiled op with the hand-written ``direct`` kernels;
* ``factored``: ``dense_affinity_apply_pytorch`` (plain PyTorch autograd, right to left, Eq. 3);
* ``naive``: ``dense_affinity_apply_pytorch(naive=True)``, the (HW x HW) affinity (small HW).

Memory: peak extra CPU tensor memory during the call (``peak_memory_bytes`` of
benchmarks/common.py: the c10 allocator's running total recorded by ``torch.profiler``), inputs
excluded, outputs included (P for a forward; P and the three input gradients for forward +
backward). Reported per megapixel of the feature map (MB = 2^20 bytes), and as "beyond outputs":
the peak minus the bytes of the tensors the call must return. Forward runs with inputs that
require grad (training), so what autograd keeps is included.

Time: forward + backward, sides interleaved in this process, one warm-up, median of the repeats.
"""

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from common import interleaved_medians, peak_memory_bytes, write_report  # noqa: E402
from seg_methods.layers.dense_affinity import (  # noqa: E402
    dense_affinity_apply,
    dense_affinity_apply_pytorch,
)
from seg_methods.utils.ext import has_op  # noqa: E402

THREADS = 1
N_CHANNELS = 50
C_EMBED = 128
MB = 2.0**20

SIDES = {
    "op": lambda p, f0, f1: dense_affinity_apply(p, f0, f1, impl="ext"),
    "op-direct": lambda p, f0, f1: dense_affinity_apply(p, f0, f1, impl="ext", backend="direct"),
    "factored": lambda p, f0, f1: dense_affinity_apply_pytorch(p, f0, f1),
    "naive": lambda p, f0, f1: dense_affinity_apply_pytorch(p, f0, f1, naive=True),
}


def make_inputs(side_px, N=N_CHANNELS, C=C_EMBED):
    """psi (N, H, W), phi0 / phi1 (C, H, W) with H = W = side_px, uniform in [0, 1)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(N, side_px, side_px), (C, side_px, side_px), (C, side_px, side_px)]
    return [torch.rand(s, generator=g).requires_grad_(True) for s in shapes]


def clear_grads(tensors):
    for t in tensors:
        t.grad = None


def forward_step(side, inputs):
    SIDES[side](*inputs)


def train_step(side, inputs, grad):
    SIDES[side](*inputs).backward(grad)


def memory_row(side, side_px, backward):
    inputs = make_inputs(side_px)
    HW = side_px * side_px
    grad = torch.ones(N_CHANNELS, side_px, side_px) if backward else None
    fn = (
        (lambda: train_step(side, inputs, grad))
        if backward
        else (lambda: forward_step(side, inputs))
    )
    fn_tiny = make_inputs(8)  # warm-up on tiny inputs (code paths, BLAS buffers)
    train_step(side, fn_tiny, torch.ones(N_CHANNELS, 8, 8))
    peak = peak_memory_bytes(fn)
    out_bytes = N_CHANNELS * HW * 4
    returned = out_bytes + (sum(t.numel() * 4 for t in inputs) if backward else 0)
    del inputs, grad
    mp = HW / 1e6
    return {
        "side": side,
        "H": side_px,
        "W": side_px,
        "HW": HW,
        "megapixels": mp,
        "pass": "forward+backward" if backward else "forward",
        "peak_mb": peak / MB,
        "peak_mb_per_megapixel": peak / MB / mp,
        "returned_mb": returned / MB,
        "beyond_outputs_mb": (peak - returned) / MB,
    }


def time_rows(side_px, sides, repeats):
    inputs = make_inputs(side_px)
    grad = torch.ones(N_CHANNELS, side_px, side_px)
    fns = {}
    for side in sides:
        fns[side] = (lambda s: lambda: (train_step(s, inputs, grad), clear_grads(inputs)))(side)
        fns[side]()  # warm-up
    med, raw = interleaved_medians(fns, repeats)
    return {
        "H": side_px,
        "W": side_px,
        "HW": side_px * side_px,
        "time_s": med,
        "time_all_s": raw,
        "speedup_over": {s: med[s] / med["op"] for s in sides if s != "op"},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only (smoke run)")
    parser.add_argument("--full", action="store_true", help="also forward+backward at 4 MP")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    if not (has_op("dense_affinity_forward") and has_op("dense_affinity_backward")):
        sys.exit("seg_methods._C has no dense_affinity ops: build the extension first")

    # 0.25, 1 and 4 megapixels (2^18, 2^20, 2^22 pixels): a 2048 x 2048 crop at stride 4 is 0.25
    # MP; the paper's 800 x 1300 example at stride 4 is 65,000 pixels.
    big = [256, 512] if args.quick else [512, 1024, 2048]
    big_backward = big if (args.full or args.quick) else big[:2]
    small = [32, 64] if args.quick else [64, 128]  # naive (HW x HW) still fits

    memory = []
    for side_px in small:
        for side in ("op", "factored", "naive"):
            for backward in (False, True):
                print(f"[memory] {side} {side_px}^2 backward={backward}", file=sys.stderr)
                memory.append(memory_row(side, side_px, backward))
    for side_px in big:
        for side in ("op", "factored"):
            for backward in (False, True):
                if backward and side_px not in big_backward:
                    continue
                print(f"[memory] {side} {side_px}^2 backward={backward}", file=sys.stderr)
                memory.append(memory_row(side, side_px, backward))
        if side_px == big[0]:
            print(f"[memory] op-direct {side_px}^2", file=sys.stderr)
            memory.append(memory_row("op-direct", side_px, True))

    timing = []
    for side_px, repeats in zip(small, (5, 3)):
        print(f"[time] {side_px}^2", file=sys.stderr)
        timing.append(time_rows(side_px, ["op", "op-direct", "factored", "naive"], repeats))
    for side_px in big[:2]:
        sides = ["op", "factored"] + (["op-direct"] if side_px == big[0] else [])
        print(f"[time] {side_px}^2", file=sys.stderr)
        timing.append(time_rows(side_px, sides, 3))

    lines = [
        "| side | H x W | MP | pass | peak (MB) | MB / MP | returned (MB) | beyond outputs (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in memory:
        lines.append(
            f"| {r['side']} | {r['H']}x{r['W']} | {r['megapixels']:.3f} | {r['pass']} | "
            f"{r['peak_mb']:.1f} | {r['peak_mb_per_megapixel']:.0f} | {r['returned_mb']:.1f} | "
            f"{r['beyond_outputs_mb']:.1f} |"
        )
    memory_table = "\n".join(lines)
    lines = [
        "| H x W | HW | op (s) | op-direct (s) | factored (s) | naive (s) | "
        "direct / op | factored / op | naive / op |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in timing:
        t, s = r["time_s"], r["speedup_over"]

        def fmt(d, k, spec):
            return format(d[k], spec) if k in d else "-"

        lines.append(
            f"| {r['H']}x{r['W']} | {r['HW']} | {t['op']:.4f} | {fmt(t, 'op-direct', '.4f')} | "
            f"{fmt(t, 'factored', '.4f')} | {fmt(t, 'naive', '.4f')} | "
            f"{fmt(s, 'op-direct', '.2f')} | {fmt(s, 'factored', '.2f')} | "
            f"{fmt(s, 'naive', '.2f')} |"
        )
    time_table = "\n".join(lines)
    print("\nPeak extra tensor memory (inputs excluded; N = 50, C = 128, float32)\n")
    print(memory_table)
    print("\nForward + backward time, median (1 thread)\n")
    print(time_table)

    extra = {
        "N": N_CHANNELS,
        "C": C_EMBED,
        "dtype": "float32",
        "memory_method": "torch.profiler allocator total (peak_memory_bytes, common.py), "
        "inputs excluded, outputs and returned gradients included",
        "time_method": "forward + backward, sides interleaved, one warm-up, median",
        "memory": memory,
        "timing": timing,
        "memory_table": memory_table,
        "time_table": time_table,
    }
    if not args.quick:
        write_report(os.path.join(ROOT, "benchmarks", "results", "dense_affinity.json"), extra)


if __name__ == "__main__":
    main()
