"""RegProxy's local pixel-token association: compiled op vs the unfold-based PyTorch version.

The PyTorch side is :func:`token_association_pytorch`, the official ProxyHead formula (masked
softmax over the 9 neighbours, ``F.unfold`` of the token logits, one batched matmul per token,
reshape to pixels). The op side is :func:`token_association` with ``impl="op"``
(``seg_methods._C`` CPU kernels). Shapes (ViT patch 16, output at 1/4 resolution, rh = rw = 4):

* ADE20K 512x512 crop: token grid 32 x 32, C = 150 classes, B = 1, output 150 x 128 x 128;
* Cityscapes 768x768 crop: token grid 48 x 48, C = 19 classes, B = 1, output 19 x 192 x 192.

Time: CPU time of the calling thread (``time.thread_time``) with one intra-op thread
(``torch.set_num_threads(1)``; the CPU autograd engine runs the backward in the calling thread),
so other processes on the machine barely affect it; both sides interleaved in one process, one
warm-up each, median of the repeats, float32. "fwd+bwd" is one forward with both inputs requiring
grad plus ``backward`` of a fixed random upstream gradient; "fwd" is one forward under
``torch.no_grad`` (inference). Wall times of the same runs are reported too.

Memory (benchmarks/common.py): peak extra CPU tensor memory of one call (torch.profiler allocation
events; includes the output and the input gradients), and the bytes autograd keeps between the
forward and the backward (saved tensors other than the inputs, via saved_tensors_hooks).

Run: .venv/bin/python benchmarks/token_association.py [--repeats 20]
Writes benchmarks/results/token_association.json and prints a markdown table.
"""

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # this checkout's seg_methods, not an installed one

from common import peak_memory_bytes, write_report  # noqa: E402  (benchmarks/common.py)
from seg_methods.layers.token_association import (  # noqa: E402
    token_association,
    token_association_pytorch,
)
from seg_methods.utils.ext import has_op  # noqa: E402

CONFIGS = [
    # name, B, C, h, w, (rh, rw)
    ("ADE20K 512x512", 1, 150, 32, 32, (4, 4)),
    ("Cityscapes 768x768", 1, 19, 48, 48, (4, 4)),
]
SIDES = ("op", "pytorch")


def make_inputs(B, C, h, w, region, seed=0):
    rh, rw = region
    g = torch.Generator().manual_seed(seed)
    affinity = torch.randn(B, 9 * rh * rw, h, w, generator=g)
    tokens = torch.randn(B, C, h, w, generator=g)
    grad = torch.randn(B, C, h * rh, w * rw, generator=g)
    return affinity, tokens, grad


def run(side, inputs, region, backward):
    affinity, tokens, grad = inputs
    fn = (
        (lambda a, t: token_association(a, t, region, impl="op"))
        if side == "op"
        else (lambda a, t: token_association_pytorch(a, t, region))
    )
    if not backward:
        with torch.no_grad():
            return fn(affinity, tokens), None, None
    a = affinity.detach().requires_grad_(True)
    t = tokens.detach().requires_grad_(True)
    out = fn(a, t)
    out.backward(grad)
    return out.detach(), a.grad, t.grad


def saved_for_backward_mib(side, inputs, region):
    """MiB autograd keeps from the forward until the backward, inputs excluded."""
    affinity, tokens, _ = inputs
    a = affinity.detach().requires_grad_(True)
    t = tokens.detach().requires_grad_(True)
    input_storages = {a.untyped_storage().data_ptr(), t.untyped_storage().data_ptr()}
    storages = {}

    def pack(x):
        storage = x.untyped_storage()
        if storage.data_ptr() not in input_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        if side == "op":
            out = token_association(a, t, region, impl="op")
        else:
            out = token_association_pytorch(a, t, region)
    del out
    return sum(storages.values()) / 2**20


def measure_times(inputs, region, repeats):
    """Per mode and side: (median CPU seconds, median wall seconds, all CPU seconds)."""
    results = {}
    for backward in (False, True):
        mode = "fwd+bwd" if backward else "fwd"
        cpu = {s: [] for s in SIDES}
        wall = {s: [] for s in SIDES}
        for side in SIDES:  # warm-up
            run(side, inputs, region, backward)
        for i in range(repeats):
            order = SIDES if i % 2 == 0 else SIDES[::-1]  # alternate which side goes first
            for side in order:
                c0, w0 = time.thread_time(), time.perf_counter()
                run(side, inputs, region, backward)
                cpu[side].append(time.thread_time() - c0)
                wall[side].append(time.perf_counter() - w0)
        results[mode] = {
            "cpu_s": {s: statistics.median(cpu[s]) for s in SIDES},
            "wall_s": {s: statistics.median(wall[s]) for s in SIDES},
            "cpu_all_s": cpu,
        }
        results[mode]["cpu_ratio_pytorch_over_op"] = (
            results[mode]["cpu_s"]["pytorch"] / results[mode]["cpu_s"]["op"]
        )
    return results


def bench(name, B, C, h, w, region, repeats):
    print(f"[token_association] {name}: B={B} C={C} grid {h}x{w} region {region}", flush=True)
    inputs = make_inputs(B, C, h, w, region)
    op = run("op", inputs, region, True)
    ref = run("pytorch", inputs, region, True)
    diffs = {
        k: (a - b).abs().max().item() for k, a, b in zip(("output", "grad_A", "grad_T"), op, ref)
    }
    times = measure_times(inputs, region, repeats)
    memory = {}
    for backward in (False, True):
        mode = "fwd+bwd" if backward else "fwd"
        memory[mode] = {
            s: peak_memory_bytes(lambda: run(s, inputs, region, backward)) / 2**20 for s in SIDES
        }
        memory[mode]["ratio_pytorch_over_op"] = memory[mode]["pytorch"] / memory[mode]["op"]
    saved = {s: saved_for_backward_mib(s, inputs, region) for s in SIDES}
    rh, rw = region
    return {
        "config": name,
        "B": B,
        "C": C,
        "grid": [h, w],
        "region_res": [rh, rw],
        "output_shape": [B, C, h * rh, w * rw],
        "times": times,
        "peak_mib": memory,
        "saved_for_backward_mib": saved,
        "max_abs_diff_op_vs_pytorch": diffs,
    }


def markdown(rows):
    lines = [
        "| shape | mode | CPU time op / PyTorch (ms) | speed-up | wall op / PyTorch (ms) "
        "| peak MiB op / PyTorch | PyTorch / op memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for mode in ("fwd", "fwd+bwd"):
            t, m = r["times"][mode], r["peak_mib"][mode]
            lines.append(
                f"| {r['config']} (C={r['C']}, {r['grid'][0]}x{r['grid'][1]} tokens) | {mode} "
                f"| {1e3 * t['cpu_s']['op']:.2f} / {1e3 * t['cpu_s']['pytorch']:.2f} "
                f"| {t['cpu_ratio_pytorch_over_op']:.2f}x "
                f"| {1e3 * t['wall_s']['op']:.2f} / {1e3 * t['wall_s']['pytorch']:.2f} "
                f"| {m['op']:.1f} / {m['pytorch']:.1f} | {m['ratio_pytorch_over_op']:.2f}x |"
            )
    lines.append("")
    lines.append("| shape | saved for backward op / PyTorch (MiB) | max abs diff out / dA / dT |")
    lines.append("|---|---|---|")
    for r in rows:
        s, d = r["saved_for_backward_mib"], r["max_abs_diff_op_vs_pytorch"]
        lines.append(
            f"| {r['config']} | {s['op']:.2f} / {s['pytorch']:.2f} "
            f"| {d['output']:.1e} / {d['grad_A']:.1e} / {d['grad_T']:.1e} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--output",
        default=os.path.join(os.path.dirname(__file__), "results", "token_association.json"),
    )
    args = parser.parse_args()
    if not (has_op("token_association_forward") and has_op("token_association_backward")):
        sys.exit("seg_methods._C has no token_association op: build the extension first")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = [bench(*cfg, args.repeats) for cfg in CONFIGS]
    table = markdown(rows)
    print(table)
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")
    write_report(
        args.output,
        {
            "dtype": "float32",
            "time": "median CPU time of the calling thread (time.thread_time), 1 intra-op "
            "thread, op and PyTorch runs interleaved (alternating order), one warm-up each",
            "memory": "peak extra CPU tensor memory of one call (torch.profiler allocation "
            "events, benchmarks/common.py); saved_for_backward = bytes of saved tensors other "
            "than the inputs (saved_tensors_hooks)",
            "repeats": args.repeats,
            "results": rows,
            "table": table,
        },
    )


if __name__ == "__main__":
    main()
