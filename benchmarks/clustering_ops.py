"""Benchmark of the fused clustering ops against their pure-PyTorch references (CPU).

Run: ``.venv/bin/python benchmarks/clustering_ops.py`` (about 3-5 minutes with 2 threads).
Writes ``benchmarks/results/clustering_ops.json`` and prints a markdown table.

What is measured (torch threads = 2, float32, one run of this script):

* ``soft_cluster`` (fused E-step + M-step, ``return_logits=False``) vs ``soft_cluster_pytorch``
  (bmm, softmax over K, bmm), forward + backward with gradients for q, k and v, at ClustSeg's
  stride-4 feature map of a 1024x1024 crop (HW = 256 * 256 = 65536) with K = 128 queries
  (ClustSeg App. A.1: 75 thing + 53 stuff) and D = Dv = 256 (single head), the same with 8 heads
  folded into the batch (B = 8, D = Dv = 32), and a 2048x2048 crop (HW = 512 * 512).
* ``hard_cluster`` (argmax + per-cluster sum, "sum" as kMaX) vs ``hard_cluster_pytorch``
  (argmax, one-hot (B, K, HW), bmm), forward + backward (gradient for v).

Peak memory: each side runs in a fresh subprocess (so neither side's allocator state or cached
pages affect the other), with glibc's mmap threshold pinned to 64 KiB
(``MALLOC_MMAP_THRESHOLD_``) so every tensor buffer is its own mapping, returned to the OS when
freed; resident memory then follows live tensors. The child builds the inputs, runs both
implementations once on tiny inputs (loads code pages, BLAS buffers), resets the kernel's
high-water mark of resident memory (``echo 5 > /proc/self/clear_refs``), records VmRSS, runs one
forward + backward and reads VmHWM. The reported peak is VmHWM - VmRSS(before): all memory the
step needed on top of its inputs, including the gradients it returns (dq, dk, dv). A second number
excludes those gradients (the "working" memory beyond the unavoidable outputs).

Time: both sides in this process, interleaved, one warm-up each, median of the repeats.
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from seg_methods.layers.clustering import (  # noqa: E402
    hard_cluster,
    hard_cluster_pytorch,
    soft_cluster,
    soft_cluster_pytorch,
)
from seg_methods.utils.ext import has_op  # noqa: E402

THREADS = 2
K_QUERIES = 128  # ClustSeg App. A.1: 75 thing + 53 stuff cluster seeds

SOFT_CONFIGS = [
    # name, B, K, HW, D (= Dv), repeats
    ("1024x1024 stride 4, 1 head", 1, K_QUERIES, 256 * 256, 256, 5),
    ("1024x1024 stride 4, 8 heads", 8, K_QUERIES, 256 * 256, 32, 5),
    ("2048x2048 stride 4, 1 head", 1, K_QUERIES, 512 * 512, 256, 3),
]
HARD_CONFIGS = [
    ("1024x1024 stride 4", 1, K_QUERIES, 256 * 256, 256, 7),
    ("2048x2048 stride 4", 1, K_QUERIES, 512 * 512, 256, 5),
]


# ----------------------------------------------------------------------------------------------
# one forward + backward step of each side
# ----------------------------------------------------------------------------------------------
def make_soft_inputs(B, K, HW, D):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, K, D, generator=g).requires_grad_(True)
    k = torch.randn(B, HW, D, generator=g).requires_grad_(True)
    v = torch.randn(B, HW, D, generator=g).requires_grad_(True)
    grad = torch.randn(B, K, D, generator=g)
    return q, k, v, grad


def soft_step(side, q, k, v, grad):
    if side == "fused":
        update = soft_cluster(q, k, v, impl="ext")
    else:
        update = soft_cluster_pytorch(q, k, v)
    update.backward(grad)


def make_hard_inputs(B, K, HW, D):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, K, HW, generator=g)
    v = torch.randn(B, HW, D, generator=g).requires_grad_(True)
    grad = torch.randn(B, K, D, generator=g)
    return logits, v, grad


def hard_step(side, logits, v, grad):
    if side == "fused":
        update, _, _ = hard_cluster(logits, v, "sum", impl="ext")
    else:
        update, _, _ = hard_cluster_pytorch(logits, v, "sum")
    update.backward(grad)


def forward_only(op, side, inputs):
    if op == "soft":
        q, k, v, _ = inputs
        return (
            soft_cluster(q, k, v, impl="ext") if side == "fused" else soft_cluster_pytorch(q, k, v)
        )
    logits, v, _ = inputs
    fn = hard_cluster if side == "fused" else hard_cluster_pytorch
    return fn(logits, v, "sum", **({"impl": "ext"} if side == "fused" else {}))[0]


def saved_for_backward_mib(op, side, inputs):
    """MiB that autograd keeps from the forward until the backward, inputs excluded.

    This is what stays alive per call in a network's forward pass (ClustSeg runs the soft step
    6 decoders x T = 3 times per image), measured exactly with saved_tensors_hooks.
    """
    input_storages = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in input_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward_only(op, side, inputs)
    del out
    return sum(storages.values()) / 2**20


def clear_grads(tensors):
    for t in tensors:
        if isinstance(t, torch.Tensor):
            t.grad = None


# ----------------------------------------------------------------------------------------------
# peak memory in a fresh subprocess
# ----------------------------------------------------------------------------------------------
def _status_kib(key):
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+)", f.read()).group(1))


def child_memory(op, side, B, K, HW, D):
    """Runs in the subprocess: peak resident memory (MiB) of one forward + backward."""
    torch.set_num_threads(THREADS)
    make, step = (make_soft_inputs, soft_step) if op == "soft" else (make_hard_inputs, hard_step)
    for s in ("fused", "reference"):  # warm-up on tiny inputs: code pages, BLAS/OpenMP buffers
        tiny = make(1, 4, 64, 8)
        step(s, *tiny)
    inputs = make(B, K, HW, D)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    before = _status_kib("VmRSS")
    step(side, *inputs)
    peak = _status_kib("VmHWM")
    grads = sum(t.grad.numel() * t.grad.element_size() for t in inputs if _has_grad(t))
    return {
        "peak_mib": (peak - before) / 1024.0,
        "grad_outputs_mib": grads / 2**20,
        "working_mib": (peak - before) / 1024.0 - grads / 2**20,
    }


def _has_grad(t):
    return isinstance(t, torch.Tensor) and t.grad is not None


def measure_memory(op, side, B, K, HW, D):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    env["OMP_NUM_THREADS"] = str(THREADS)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", op, side] + [
        str(x) for x in (B, K, HW, D)
    ]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# time, both sides in this process
# ----------------------------------------------------------------------------------------------
def measure_time(step, inputs, repeats):
    times = {"fused": [], "reference": []}
    for side in ("fused", "reference"):  # warm-up
        step(side, *inputs)
        clear_grads(inputs)
    for _ in range(repeats):
        for side in ("reference", "fused"):
            t0 = time.perf_counter()
            step(side, *inputs)
            times[side].append(time.perf_counter() - t0)
            clear_grads(inputs)
    return {side: statistics.median(ts) for side, ts in times.items()}, times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", nargs=6, metavar=("OP", "SIDE", "B", "K", "HW", "D"))
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args()
    if args.child:
        op, side, *dims = args.child
        print(json.dumps(child_memory(op, side, *[int(x) for x in dims])))
        return

    torch.set_num_threads(THREADS)
    for name in ("soft_cluster_forward", "hard_cluster_argmax", "hard_cluster_reduce"):
        if not has_op(name):
            sys.exit(f"seg_methods._C has no op {name}: build the extension first")
    soft_configs, hard_configs = SOFT_CONFIGS, HARD_CONFIGS
    if args.quick:
        soft_configs = [
            ("quick " + n, B, K, HW // 16, D, 2) for n, B, K, HW, D, _ in SOFT_CONFIGS[:2]
        ]
        hard_configs = [
            ("quick " + n, B, K, HW // 16, D, 2) for n, B, K, HW, D, _ in HARD_CONFIGS[:1]
        ]

    results = {"soft_cluster": [], "hard_cluster": []}
    for op, configs, make, step in (
        ("soft", soft_configs, make_soft_inputs, soft_step),
        ("hard", hard_configs, make_hard_inputs, hard_step),
    ):
        for name, B, K, HW, D, repeats in configs:
            print(f"[{op}] {name}: B={B} K={K} HW={HW} D={D} ...", file=sys.stderr, flush=True)
            mem = {side: measure_memory(op, side, B, K, HW, D) for side in ("fused", "reference")}
            inputs = make(B, K, HW, D)
            med, raw = measure_time(step, inputs, repeats)
            saved = {s: saved_for_backward_mib(op, s, inputs) for s in ("fused", "reference")}
            del inputs
            row = {
                "config": name,
                "B": B,
                "K": K,
                "HW": HW,
                "D": D,
                "time_s": med,
                "time_all_s": raw,
                "time_ratio_ref_over_fused": med["reference"] / med["fused"],
                "peak_mib": {s: mem[s]["peak_mib"] for s in mem},
                "working_mib": {s: mem[s]["working_mib"] for s in mem},
                "peak_ratio_fused_over_ref": mem["fused"]["peak_mib"]
                / mem["reference"]["peak_mib"],
                "working_ratio_fused_over_ref": mem["fused"]["working_mib"]
                / mem["reference"]["working_mib"],
                "saved_for_backward_mib": saved,
            }
            results["soft_cluster" if op == "soft" else "hard_cluster"].append(row)

    lines = [
        "| op | config | B | K | HW | D | time ref / fused (s) | speed-up | "
        "peak ref / fused (MiB) | fused/ref peak | working ref / fused (MiB) | fused/ref working | "
        "saved for backward ref / fused (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for op, rows in results.items():
        for r in rows:
            lines.append(
                f"| {op} | {r['config']} | {r['B']} | {r['K']} | {r['HW']} | {r['D']} | "
                f"{r['time_s']['reference']:.3f} / {r['time_s']['fused']:.3f} | "
                f"{r['time_ratio_ref_over_fused']:.2f}x | "
                f"{r['peak_mib']['reference']:.0f} / {r['peak_mib']['fused']:.0f} | "
                f"{r['peak_ratio_fused_over_ref']:.2f} | "
                f"{r['working_mib']['reference']:.0f} / {r['working_mib']['fused']:.0f} | "
                f"{r['working_ratio_fused_over_ref']:.3f} | "
                f"{r['saved_for_backward_mib']['reference']:.1f} / "
                f"{r['saved_for_backward_mib']['fused']:.2f} |"
            )
    table = "\n".join(lines)
    print(table)

    report = {
        "command": "python benchmarks/clustering_ops.py" + (" --quick" if args.quick else ""),
        "torch": torch.__version__,
        "threads": THREADS,
        "cpu": platform.processor() or platform.machine(),
        "dtype": "float32",
        "time": "forward + backward, median of repeats, both sides interleaved in one process",
        "memory": "VmHWM - VmRSS around one forward + backward in a fresh subprocess per side "
        "(MALLOC_MMAP_THRESHOLD_=65536, high-water mark reset via /proc/self/clear_refs); "
        "'working' excludes the returned input gradients; 'saved for backward' = bytes autograd "
        "keeps between forward and backward (inputs excluded), via saved_tensors_hooks",
        "goals": {
            "soft_peak_ratio_fused_over_ref": "<= 0.5",
            "soft_time_ratio_ref_over_fused": ">= 1.0",
            "hard_time_ratio_ref_over_fused": ">= 2.0",
        },
        "results": results,
        "table": table,
    }
    if not args.quick:
        out = os.path.join(ROOT, "benchmarks", "results", "clustering_ops.json")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
