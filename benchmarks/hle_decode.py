"""HLE decoding kernel (Hierarchical Lovász Embeddings Sec. 3.5): compiled op vs the PyTorch
reference, CPU, at the Cityscapes decoding size 1024 x 2048 with d = 12.

Sides (seg_methods/layers/hle_decode.py vs seg_methods/modeling/postprocessing/hle_decoding.py):

* ``full``: ``greedy_seed_clustering`` on the full-resolution map (P = 2,097,152 pixels): the
  reference computes one (P,) kernel row per kept seed with PyTorch tensor ops; the op
  (``hle_greedy_seed_clustering(impl="ext")``) selects the seeds over the candidates, then makes one
  pass over the thing pixels.
* ``fast`` (downsample 4, the paper's supplementary C): ``greedy_seed_clustering`` on the
  256 x 512 average-pooled map, then ``assign_pixels_to_seeds`` of every full-resolution thing
  pixel to the found seeds, as ``hle_panoptic_decode(downsample=4)`` does.
* ``decode``: the whole ``hle_panoptic_decode`` (semantic argmax, seed NMS, the above, painting of
  the segments), reference vs the same function with the two inner functions replaced by the op
  (monkeypatched here; what the ``use_op`` switch proposed for hle_decoding.py does), downsample 1
  and 4.

Input (synthetic, fixed seed): ``--instances`` objects (default 120) as ellipses of random sizes
on the lower two thirds of the image (cars and people of a street scene), about a quarter of the
pixels being thing pixels; each object has a random unit mean embedding, pixels add Gaussian
noise (0.15 per dimension) and are re-normalised; stuff pixels get one of 11 class embeddings.
Instance variances sigma = 0.35 +- 0.05, spatial_sigma = 0.5 and coord_scale = 1024
(MODEL.HLE.SPATIAL_SIGMA_INIT / COORD_SCALE), thresholds at the MODEL.HLE.DECODE defaults (0.5).
The seed map is one smooth bump per object plus a second one on a third of them (duplicate seeds
the suppression merges), so the kept seed count is about the number of objects (Cityscapes has
up to ~100-200 instances per image). ``--all-thing`` also times the full variant with every pixel
a thing pixel (no pixel skipped by the mask).

Time: CPU time of the calling thread (``time.thread_time``) with one intra-op thread
(``torch.set_num_threads(1)``), so other processes on the machine barely affect it; op and
reference runs interleaved (alternating which goes first), one warm-up each, median of the
repeats, float32. Wall times of the same runs are reported too. Memory: peak extra CPU tensor
memory of one call (benchmarks/common.py ``peak_memory_bytes``), full variant only.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hle_decode.py --all-thing [--repeats 3]``
(8 minutes of wall time on our shared 2-core machine at load average ~14, 2-3 minutes of CPU;
the reference dominates). Writes benchmarks/results/hle_decode.json and prints a markdown table.
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # this checkout's seg_methods, not an installed one

from common import peak_memory_bytes, write_report  # noqa: E402  (benchmarks/common.py)
from seg_methods.layers.hle_decode import (  # noqa: E402
    hle_assign_pixels_to_seeds,
    hle_greedy_seed_clustering,
)
from seg_methods.modeling.postprocessing import hle_decoding  # noqa: E402
from seg_methods.utils.ext import has_op  # noqa: E402

H, W, D = 1024, 2048, 12
COORD_SCALE = 1024.0
SPATIAL_SIGMA = 0.5
THRESH = dict(mask_threshold=0.5, merge_threshold=0.5, max_instances=200)
N_STUFF = 11  # Cityscapes: 11 stuff, 8 thing classes
SIDES = ("op", "pytorch")


def make_scene(n_inst, seed=0, all_thing=False):
    """(embedding (D, H, W), sigma (H, W), seed (H, W), sem_probs (C, H, W), thing mask (H, W))."""
    g = torch.Generator().manual_seed(seed)
    inst = torch.full((H, W), -1, dtype=torch.int64)
    seed_map = torch.zeros(H, W)
    for i in range(n_inst):
        cy = H / 3 + torch.rand(1, generator=g).item() * (2 * H / 3)
        cx = torch.rand(1, generator=g).item() * W
        ry = 10 + torch.rand(1, generator=g).item() * 50 * (cy / H)  # larger nearer the bottom
        rx = ry * (0.5 + 2 * torch.rand(1, generator=g).item())
        y0, y1 = max(0, int(cy - ry)), min(H, int(cy + ry) + 2)  # the ellipse's bounding box
        x0, x1 = max(0, int(cx - rx)), min(W, int(cx + rx) + 2)
        ys = torch.arange(y0, y1, dtype=torch.float32).view(-1, 1)
        xs = torch.arange(x0, x1, dtype=torch.float32).view(1, -1)
        inside = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1.0
        inst[y0:y1, x0:x1][inside] = i  # later objects occlude earlier ones
        seed_map[y0:y1, x0:x1][inside] = 0.0
        bumps = [(cy, cx, 0.6 + 0.4 * torch.rand(1, generator=g).item())]
        if i % 3 == 0:  # a second local maximum: a duplicate seed the suppression merges
            bumps.append((cy + 0.4 * ry, cx - 0.3 * rx, 0.55))
        for by, bx, score in bumps:
            r2 = ((ys - by) / ry) ** 2 + ((xs - bx) / rx) ** 2
            crop = seed_map[y0:y1, x0:x1]
            crop.copy_(torch.where(inside, torch.maximum(crop, score * torch.exp(-4 * r2)), crop))
    thing = inst >= 0
    means = F.normalize(torch.randn(n_inst + N_STUFF, D, generator=g), dim=1)
    stuff_cls = torch.randint(0, N_STUFF, (H, W), generator=g)
    owner = torch.where(thing, inst, n_inst + stuff_cls)
    emb = means[owner] + 0.15 * torch.randn(H, W, D, generator=g)
    emb = F.normalize(emb, dim=-1).permute(2, 0, 1).contiguous()  # (D, H, W)
    sigma = 0.35 + 0.05 * (2 * torch.rand(H, W, generator=g) - 1)
    # classes: 0 = thing (one thing class suffices for the decoding), 1..N_STUFF stuff
    sem = torch.where(thing, torch.zeros_like(stuff_cls), 1 + stuff_cls)
    if all_thing:
        sem = torch.zeros_like(sem)
    probs = F.one_hot(sem, 1 + N_STUFF).permute(2, 0, 1).float() * 0.8 + 0.2 / (1 + N_STUFF)
    return emb, sigma, seed_map, probs, sem == 0


def full_inputs(scene):
    emb, sigma, seed_map, _, thing = scene
    cand = hle_decoding.seed_candidates(seed_map, thing, 0.5)
    pos = hle_decoding._positions(H, W, COORD_SCALE, "cpu")
    flat = emb.reshape(D, -1).t()  # (P, D) view of the (D, H, W) map, as the decoding passes it
    return cand, flat, pos, sigma.reshape(-1), thing.reshape(-1)


def run_full(side, inputs):
    kw = dict(spatial_sigma=SPATIAL_SIGMA, **THRESH)
    if side == "op":
        return hle_greedy_seed_clustering(*inputs, impl="ext", **kw)
    return hle_decoding.greedy_seed_clustering(*inputs, **kw)


def fast_inputs(scene, f=4):
    """The fast variant's inputs exactly as hle_panoptic_decode(downsample=f) builds them."""
    emb, sigma, seed_map, probs, thing = scene
    emb_s = F.normalize(F.avg_pool2d(emb[None], f, ceil_mode=True)[0], dim=0)
    sig_s = F.avg_pool2d(sigma[None, None], f, ceil_mode=True)[0, 0]
    seed_s = F.avg_pool2d(seed_map[None, None], f, ceil_mode=True)[0, 0]
    thing_s = F.avg_pool2d(probs[None], f, ceil_mode=True)[0].argmax(dim=0) == 0  # class 0
    hs, ws = seed_s.shape
    cand = hle_decoding.seed_candidates(seed_s, thing_s, 0.5)
    pos_s = hle_decoding._positions(hs, ws, COORD_SCALE, "cpu", stride=float(f))
    small = (cand, emb_s.reshape(D, -1).t(), pos_s, sig_s.reshape(-1), thing_s.reshape(-1))
    pos = hle_decoding._positions(H, W, COORD_SCALE, "cpu")
    return small, (emb.reshape(D, -1).t(), pos, thing.reshape(-1))


def run_fast(side, inputs):
    small, (flat, pos, thing) = inputs
    cand, emb_s, pos_s, sig_s, _ = small
    kw = dict(spatial_sigma=SPATIAL_SIGMA, mask_threshold=THRESH["mask_threshold"])
    if side == "op":
        _, seeds, _ = hle_greedy_seed_clustering(
            *small, impl="ext", spatial_sigma=SPATIAL_SIGMA, **THRESH
        )
        assign = lambda *a: hle_assign_pixels_to_seeds(*a, impl="ext", **kw)  # noqa: E731
    else:
        _, seeds, _ = hle_decoding.greedy_seed_clustering(
            *small, spatial_sigma=SPATIAL_SIGMA, **THRESH
        )
        assign = lambda *a: hle_decoding.assign_pixels_to_seeds(*a, **kw)  # noqa: E731
    labels = assign(emb_s[seeds], pos_s[seeds], sig_s[seeds], flat, pos, thing)
    return labels, seeds


def run_decode(side, scene, downsample):
    emb, sigma, seed_map, probs, _ = scene
    kw = dict(
        thing_ids=[0],
        spatial_sigma=SPATIAL_SIGMA,
        coord_scale=COORD_SCALE,
        downsample=downsample,
        **THRESH,
    )
    if side == "pytorch":
        return hle_decoding.hle_panoptic_decode(emb, sigma, seed_map, probs, **kw)
    saved = (hle_decoding.greedy_seed_clustering, hle_decoding.assign_pixels_to_seeds)
    hle_decoding.greedy_seed_clustering = lambda *a, **k: hle_greedy_seed_clustering(
        *a, impl="ext", **k
    )
    hle_decoding.assign_pixels_to_seeds = lambda *a, **k: hle_assign_pixels_to_seeds(
        *a, impl="ext", **k
    )
    try:
        return hle_decoding.hle_panoptic_decode(emb, sigma, seed_map, probs, **kw)
    finally:
        hle_decoding.greedy_seed_clustering, hle_decoding.assign_pixels_to_seeds = saved


def measure(fns, repeats):
    """fns: side -> callable. Median CPU / wall seconds per side, interleaved, one warm-up."""
    cpu = {s: [] for s in fns}
    wall = {s: [] for s in fns}
    outputs = {s: fns[s]() for s in fns}  # warm-up, kept for the parity check
    order = list(fns)
    for i in range(repeats):
        for side in order if i % 2 == 0 else order[::-1]:
            c0, w0 = time.thread_time(), time.perf_counter()
            fns[side]()
            cpu[side].append(time.thread_time() - c0)
            wall[side].append(time.perf_counter() - w0)
    res = {
        "cpu_s": {s: statistics.median(v) for s, v in cpu.items()},
        "wall_s": {s: statistics.median(v) for s, v in wall.items()},
        "cpu_all_s": cpu,
    }
    res["cpu_ratio_pytorch_over_op"] = res["cpu_s"]["pytorch"] / res["cpu_s"]["op"]
    return res, outputs


def bench_full(name, scene, repeats, memory=True):
    inputs = full_inputs(scene)
    print(f"[hle_decode] {name}: {inputs[0].numel()} candidates", flush=True)
    res, out = measure({s: (lambda s=s: run_full(s, inputs)) for s in SIDES}, repeats)
    (lab_o, seeds_o, best_o), (lab_r, seeds_r, best_r) = out["op"], out["pytorch"]
    res.update(
        variant=name,
        candidates=int(inputs[0].numel()),
        seeds=int(seeds_r.numel()),
        thing_pixels=int(inputs[4].sum()),
        seeds_identical=bool(torch.equal(seeds_o, seeds_r)),
        labels_differing=int((lab_o != lab_r).sum()),
        best_max_abs_diff=float((best_o - best_r).abs().max()),
    )
    if memory:
        res["peak_mib"] = {
            s: peak_memory_bytes(lambda s=s: run_full(s, inputs)) / 2**20 for s in SIDES
        }
    return res


def bench_fast(scene, repeats):
    inputs = fast_inputs(scene)
    print(f"[hle_decode] fast (downsample 4): {inputs[0][0].numel()} candidates", flush=True)
    res, out = measure({s: (lambda s=s: run_fast(s, inputs)) for s in SIDES}, repeats)
    (lab_o, seeds_o), (lab_r, seeds_r) = out["op"], out["pytorch"]
    res.update(
        variant="fast (downsample 4): seeds on 256x512, assignment at 1024x2048",
        candidates=int(inputs[0][0].numel()),
        seeds=int(seeds_r.numel()),
        seeds_identical=bool(torch.equal(seeds_o, seeds_r)),
        labels_differing=int((lab_o != lab_r).sum()),
    )
    return res


def bench_decode(scene, downsample, repeats):
    print(f"[hle_decode] hle_panoptic_decode(downsample={downsample})", flush=True)
    res, out = measure({s: (lambda s=s: run_decode(s, scene, downsample)) for s in SIDES}, repeats)
    pan_o, pan_r = out["op"]["panoptic_seg"], out["pytorch"]["panoptic_seg"]
    res.update(
        variant=f"hle_panoptic_decode, downsample {downsample}",
        segments=len(out["pytorch"]["segments_info"]),
        panoptic_pixels_differing=int((pan_o != pan_r).sum()),
    )
    return res


def markdown(rows):
    lines = [
        "| variant | seeds | CPU time op / PyTorch (s) | speed-up | wall op / PyTorch (s) "
        "| labels differing |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["cpu_s"]
        w = r["wall_s"]
        diff = r.get("labels_differing", r.get("panoptic_pixels_differing"))
        lines.append(
            f"| {r['variant']} | {r.get('seeds', r.get('segments', ''))} "
            f"| {t['op']:.3f} / {t['pytorch']:.3f} | {r['cpu_ratio_pytorch_over_op']:.1f}x "
            f"| {w['op']:.3f} / {w['pytorch']:.3f} | {diff} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--instances", type=int, default=120)
    parser.add_argument("--all-thing", action="store_true", help="also time every pixel a thing")
    parser.add_argument("--no-decode", action="store_true", help="skip hle_panoptic_decode")
    parser.add_argument(
        "--output", default=os.path.join(os.path.dirname(__file__), "results", "hle_decode.json")
    )
    args = parser.parse_args()
    if not all(has_op(n) for n in ("hle_seed_clustering", "hle_assign_pixels")):
        sys.exit("seg_methods._C has no hle_decode ops: build the extension first")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    scene = make_scene(args.instances)
    thing_frac = float(scene[4].float().mean())
    print(f"[hle_decode] scene: {args.instances} objects, thing pixels {thing_frac:.1%}")
    rows = [bench_full("full resolution 1024x2048", scene, args.repeats)]
    if args.all_thing:
        rows.append(
            bench_full(
                "full resolution, every pixel a thing pixel",
                make_scene(args.instances, all_thing=True),
                args.repeats,
                memory=False,
            )
        )
    rows.append(bench_fast(scene, args.repeats))
    if not args.no_decode:
        rows += [bench_decode(scene, f, args.repeats) for f in (1, 4)]
    table = markdown(rows)
    print(table)
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")
    write_report(
        args.output,
        {
            "shape": {"H": H, "W": W, "D": D},
            "dtype": "float32",
            "instances": args.instances,
            "thing_pixel_fraction": thing_frac,
            "spatial_sigma": SPATIAL_SIGMA,
            "coord_scale": COORD_SCALE,
            "thresholds": THRESH,
            "time": "median CPU time of the calling thread (time.thread_time), 1 intra-op "
            "thread, op and PyTorch runs interleaved (alternating order), one warm-up each",
            "memory": "peak extra CPU tensor memory of one call (torch.profiler allocation "
            "events, benchmarks/common.py)",
            "repeats": args.repeats,
            "results": rows,
            "table": table,
        },
    )


if __name__ == "__main__":
    main()
