"""Compiled multi-scale deformable attention op vs the pure-PyTorch (grid_sample) reference.

Shapes are those of Mask2Former's R50 pixel-decoder encoder on a 512x512 image: levels 64x64,
32x32 and 16x16 (strides 8, 16, 32), every pixel is a query (S = Lq = 5376), M = 8 heads, D = 32
channels per head, P = 4 points per level. Both implementations run in this process, on the CPU,
with two threads, through the public ``ms_deform_attn(..., impl=...)`` (so wrapper overhead is
included); op and reference runs are interleaved and the median of the repeats is reported.

Sampling locations come in two flavours:
  - "encoder": each query's reference point (its own pixel centre) plus Deformable DETR's initial
    offset pattern (head m looks in direction 2*pi*m/M, point p at distance p + 1 pixels) plus
    N(0, 1) pixel noise, as in a (partly) trained encoder: neighbouring queries read neighbouring
    pixels, so memory accesses have locality.
  - "uniform": uniform in [0, 1], the cache-unfriendly stress case.

Peak memory: measured with ``torch.profiler`` (``profile_memory=True``), which records every
allocation and free made through c10's CPU allocator during the call (all tensor storage,
including temporaries inside grid_sample and autograd buffers) with the running total of the
memory allocated since profiling started. The reported peak is the maximum of that running
total, i.e. the peak extra memory of the call on top of its inputs. Allocations outside the
tensor allocator (thread stacks, small std::vector buffers) are not counted. Memory is measured
in a separate, untimed call.

Run: .venv/bin/python benchmarks/ms_deform_attn_op.py [--repeats 7] [--batch 1 2]
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

from common import peak_memory_bytes, timed  # noqa: E402  (benchmarks/common.py)
from seg_methods.layers.ms_deform_attn import ms_deform_attn
from seg_methods.utils.ext import has_op

LEVELS = [(64, 64), (32, 32), (16, 16)]
HEADS, DIM, POINTS = 8, 32, 4


def make_inputs(batch, locations, seed=0):
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(LEVELS, dtype=torch.int64)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    s = int(sizes.sum())
    num_levels = len(LEVELS)
    value = torch.randn(batch, s, HEADS, DIM, generator=g)
    shape = (batch, s, HEADS, num_levels, POINTS)
    if locations == "uniform":
        loc = torch.rand(*shape, 2, generator=g)
    else:
        # Reference point of each query: its own pixel centre, normalized (x, y).
        refs = []
        for h, w in LEVELS:
            ys, xs = torch.meshgrid(
                (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij"
            )
            refs.append(torch.stack([xs.flatten(), ys.flatten()], -1))
        ref = torch.cat(refs)  # (S, 2)
        theta = torch.arange(HEADS) * (2 * math.pi / HEADS)
        direction = torch.stack([theta.cos(), theta.sin()], -1)  # (M, 2)
        direction = direction / direction.abs().max(-1, keepdim=True).values
        init = direction[:, None, :] * (torch.arange(POINTS) + 1.0)[None, :, None]  # (M, P, 2)
        offsets = init[None, None, :, None] + torch.randn(*shape, 2, generator=g)  # pixels
        wh = spatial_shapes.flip(1).to(torch.float32)  # (L, 2) as (W, H)
        loc = ref[None, :, None, None, None, :] + offsets / wh[None, None, None, :, None, :]
    attn = torch.randn(*shape, generator=g).flatten(-2).softmax(-1).view(shape)
    grad_out = torch.randn(batch, s, HEADS * DIM, generator=g)
    return value, spatial_shapes, level_start_index, loc.contiguous(), attn, grad_out


def run_forward(inputs, impl):
    value, ss, lsi, loc, attn, _ = inputs
    with torch.no_grad():
        return ms_deform_attn(value, ss, lsi, loc, attn, impl=impl)


def run_forward_backward(inputs, impl):
    value, ss, lsi, loc, attn, grad_out = inputs
    leaves = [t.detach().requires_grad_(True) for t in (value, loc, attn)]
    out = ms_deform_attn(leaves[0], ss, lsi, leaves[1], leaves[2], impl=impl)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]


def bench_case(batch, locations, repeats):
    inputs = make_inputs(batch, locations)
    # Accuracy (same inputs, same upstream gradient).
    out_op, grads_op = run_forward_backward(inputs, "op")
    out_ref, grads_ref = run_forward_backward(inputs, "pytorch")
    # Ground truth: the reference in float64. Both float32 results are compared with it.
    inputs64 = [t.double() if t.is_floating_point() else t for t in inputs]
    out_64, grads_64 = run_forward_backward(inputs64, "pytorch")
    names = ("output", "grad_value", "grad_loc", "grad_attn")
    op_all, ref_all, truth = [out_op, *grads_op], [out_ref, *grads_ref], [out_64, *grads_64]
    diffs = {k: (a - b).abs().max().item() for k, a, b in zip(names, op_all, ref_all)}
    scales = {k: t.abs().max().item() for k, t in zip(names, truth)}
    op_err = {k: (a.double() - t).abs().max().item() for k, a, t in zip(names, op_all, truth)}
    ref_err = {k: (a.double() - t).abs().max().item() for k, a, t in zip(names, ref_all, truth)}

    times = {k: [] for k in ("op_fwd", "ref_fwd", "op_fwdbwd", "ref_fwdbwd")}
    for fn in (run_forward, run_forward_backward):  # warm-up
        fn(inputs, "op")
        fn(inputs, "pytorch")
    for _ in range(repeats):
        times["op_fwd"].append(timed(lambda: run_forward(inputs, "op")))
        times["ref_fwd"].append(timed(lambda: run_forward(inputs, "pytorch")))
        times["op_fwdbwd"].append(timed(lambda: run_forward_backward(inputs, "op")))
        times["ref_fwdbwd"].append(timed(lambda: run_forward_backward(inputs, "pytorch")))
    median_ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}

    memory = {
        "op_fwd": peak_memory_bytes(lambda: run_forward(inputs, "op")),
        "ref_fwd": peak_memory_bytes(lambda: run_forward(inputs, "pytorch")),
        "op_fwdbwd": peak_memory_bytes(lambda: run_forward_backward(inputs, "op")),
        "ref_fwdbwd": peak_memory_bytes(lambda: run_forward_backward(inputs, "pytorch")),
    }
    return {
        "batch": batch,
        "locations": locations,
        "median_ms": median_ms,
        "all_ms": {k: [1e3 * t for t in v] for k, v in times.items()},
        "speedup_fwd": median_ms["ref_fwd"] / median_ms["op_fwd"],
        "speedup_fwdbwd": median_ms["ref_fwdbwd"] / median_ms["op_fwdbwd"],
        "max_abs_diff": diffs,
        "max_abs_value_float64": scales,
        "op_float32_max_abs_err_vs_float64": op_err,
        "ref_float32_max_abs_err_vs_float64": ref_err,
        "peak_mem_mib": {k: v / 2**20 for k, v in memory.items()},
        "mem_ratio_fwd": memory["ref_fwd"] / max(memory["op_fwd"], 1),
        "mem_ratio_fwdbwd": memory["ref_fwdbwd"] / max(memory["op_fwdbwd"], 1),
    }


def markdown(results):
    lines = [
        "| N | locations | fwd op / ref (ms) | fwd speed-up | fwd+bwd op / ref (ms) "
        "| fwd+bwd speed-up | peak MiB fwd op / ref | peak MiB fwd+bwd op / ref "
        "| max abs diff op-ref: out / g_value / g_loc / g_attn "
        "| max abs err vs float64, op; ref: out / g_loc |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        t, m, d = r["median_ms"], r["peak_mem_mib"], r["max_abs_diff"]
        eo, er = r["op_float32_max_abs_err_vs_float64"], r["ref_float32_max_abs_err_vs_float64"]
        lines.append(
            f"| {r['batch']} | {r['locations']} "
            f"| {t['op_fwd']:.1f} / {t['ref_fwd']:.1f} | {r['speedup_fwd']:.1f}x "
            f"| {t['op_fwdbwd']:.1f} / {t['ref_fwdbwd']:.1f} | {r['speedup_fwdbwd']:.1f}x "
            f"| {m['op_fwd']:.1f} / {m['ref_fwd']:.1f} | {m['op_fwdbwd']:.1f} / {m['ref_fwdbwd']:.1f} "
            f"| {d['output']:.1e} / {d['grad_value']:.1e} / {d['grad_loc']:.1e} "
            f"/ {d['grad_attn']:.1e} "
            f"| {eo['output']:.1e} / {eo['grad_loc']:.1e}; {er['output']:.1e} / {er['grad_loc']:.1e} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--locations", nargs="+", default=["encoder", "uniform"])
    parser.add_argument(
        "--output",
        default=os.path.join(os.path.dirname(__file__), "results", "ms_deform_attn_op.json"),
    )
    args = parser.parse_args()
    if not has_op("ms_deform_attn_forward"):
        sys.exit("seg_methods._C with ms_deform_attn is not built: run setup.py build_ext first")
    torch.set_num_threads(2)

    load_before = os.getloadavg()
    results = [
        bench_case(batch, locations, args.repeats)
        for batch in args.batch
        for locations in args.locations
    ]
    load_after = os.getloadavg()
    table = markdown(results)
    print(
        f"ms_deform_attn: C++ op vs PyTorch reference, CPU, {torch.get_num_threads()} threads, "
        f"levels {LEVELS}, M={HEADS}, D={DIM}, P={POINTS}, median of {args.repeats}\n"
    )
    print(table)
    print(f"\nload average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}")
    report = {
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "levels": LEVELS,
        "heads": HEADS,
        "dim_per_head": DIM,
        "points": POINTS,
        "repeats": args.repeats,
        "load_average_1min_before_after": [load_before[0], load_after[0]],
        "memory_method": "torch.profiler profile_memory: max running total of c10 CPU allocator "
        "bytes allocated during the call (peak extra memory over the inputs)",
        "results": results,
        "markdown": table,
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
