"""CRM on the CPU: time and peak memory of refining one S x S image, chunked vs unchunked queries.

Run (from the repository root):

    .venv/bin/python benchmarks/crm_chunked_query.py --size 4096            # the issue's case
    .venv/bin/python benchmarks/crm_chunked_query.py --size 512 --threads 1 # what fits here

Writes ``benchmarks/results/crm_chunked_query_<S>.json`` and prints a table.

Model: the official network
(configs/synthetic/refinement-segmentation/crm/Base-Synthetic-RefinementSegmentation-CRM.yaml:
ResNet-50 at output stride 8, 256-channel latent map at stride 2, MLP 32-32-32-32), random
weights, eval mode, float32, the full 4-scale cascade (0.125, 0.25, 0.5, 1; reflect padding 32)
of ``CRM.refine`` on a random image with a blob coarse mask; output at the input size, so the
last scale decodes (S + 64)^2 points.

Two measurements per setting (``--chunk`` queries per decoder call, and 0 = every query of a
scale at once):

* ``cascade``: the whole ``refine`` call (encoder at 4 scales + decoding);
* ``decode``: the decoding of the last scale alone (its latent map computed beforehand), the part
  chunking changes.

Time: wall time of one call (after a warm-up on a small image), ``--threads`` intra-op threads.
Peak memory: ``torch.profiler`` CPU memory (benchmarks/common.py ``peak_memory_bytes``): the peak of
tensor memory allocated during the call on top of what existed before it (a second call, so the
profiler's overhead is not in the time). Allocations outside torch's CPU allocator are not counted.

The unchunked decoder's memory grows linearly with the number of queries: when its estimate
(bytes per query measured on a 256 x 256 output, times the queries) exceeds ``--max-gb`` the
unchunked run is skipped and the estimate is reported, marked as an extrapolation.
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import peak_memory_bytes, timed, write_report  # noqa: E402  benchmarks/common.py

CONFIG = (
    "configs/synthetic/refinement-segmentation/crm/Base-Synthetic-RefinementSegmentation-CRM.yaml"
)


def build(config: str):
    from detectron2.modeling import build_model

    from seg_methods.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(config)
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    return build_model(cfg).eval()


def inputs(size: int):
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
    blob = F.interpolate(torch.rand(1, 1, 8, 8, generator=g), size=(size, size), mode="bilinear")
    return image, (blob[0, 0] > 0.5).float()


def decode_fn(model, size: int, chunk: int):
    """The last scale's decoding of ``refine`` (latent map precomputed), as a closure."""
    from seg_methods.modeling.refinement.crm import axis_coords, query_chunked

    image, mask = inputs(size)
    pad = min(model.test_pad, size - 1)
    im = F.pad(model.normalize(image)[None], (pad,) * 4, mode="reflect")
    seg = F.pad(((mask - 0.5) * 2)[None, None], (pad,) * 4, mode="reflect")
    with torch.no_grad():
        latent = model.encode(im, seg)
    rows, _, cell = axis_coords(size, pad, size)

    def run():
        with torch.no_grad():
            query_chunked(model, latent, rows, rows, (cell, cell), chunk)

    return run


def cascade_fn(model, size: int, chunk: int):
    image, mask = inputs(size)

    def run():
        model.query_chunk = chunk
        with torch.no_grad():
            model.refine(image, mask)

    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=65536)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-gb", type=float, default=8.0, help="skip unchunked runs above this")
    parser.add_argument(
        "--fusion-tile-rows",
        type=int,
        default=None,
        help="MODEL.CRM.FUSION_TILE_ROWS for the runs (default: the config's, 512)",
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=("decode", "cascade"),
        default=["decode", "cascade"],
        help="which measurements to run (decode alone keeps the unchunked 4096 case within 16 GB)",
    )
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build(args.config)
    if args.fusion_tile_rows is not None:
        model.fusion_tile_rows = args.fusion_tile_rows
    cascade_fn(model, 64, args.chunk)()  # warm-up

    # bytes per query of the unchunked decoder, measured on a 256 x 256 output
    probe = 256
    n_probe = (probe + 2 * min(model.test_pad, probe - 1)) ** 2
    per_query = peak_memory_bytes(decode_fn(model, probe, 0)) / n_probe
    n_queries = (args.size + 2 * min(model.test_pad, args.size - 1)) ** 2
    unchunked_estimate = per_query * n_queries

    rows = []
    for label, chunk in (("chunked", args.chunk), ("unchunked", 0)):
        for part, make in (("decode", decode_fn), ("cascade", cascade_fn)):
            if part not in args.parts:
                continue
            if chunk == 0 and unchunked_estimate > args.max_gb * 2**30:
                rows.append(
                    {
                        "mode": label,
                        "part": part,
                        "chunk": chunk,
                        "seconds": None,
                        "peak_mb": None,
                        "decode_peak_mb_extrapolated": unchunked_estimate / 2**20,
                    }
                )
                continue
            fn = make(model, args.size, chunk)
            seconds = timed(fn)
            peak = peak_memory_bytes(fn)
            rows.append(
                {
                    "mode": label,
                    "part": part,
                    "chunk": chunk,
                    "seconds": seconds,
                    "peak_mb": peak / 2**20,
                }
            )
            print(rows[-1], flush=True)

    by = {(r["mode"], r["part"]): r for r in rows}
    ratios = {}
    for part in args.parts:
        c, u = by[("chunked", part)], by[("unchunked", part)]
        if u["peak_mb"] is not None:
            ratios[part] = {
                "time_unchunked_over_chunked": u["seconds"] / c["seconds"],
                "peak_unchunked_over_chunked": u["peak_mb"] / c["peak_mb"],
            }
    report = {
        "size": args.size,
        "queries_last_scale": n_queries,
        "threads": args.threads,
        "parts": list(args.parts),
        "fusion_tile_rows": model.fusion_tile_rows,
        "unchunked_decoder_bytes_per_query": per_query,
        "unchunked_decode_peak_mb_estimate": unchunked_estimate / 2**20,
        "rows": rows,
        "ratios": ratios,
    }
    out = args.output or os.path.join(
        "benchmarks", "results", f"crm_chunked_query_{args.size}.json"
    )
    write_report(out, report)
    print(
        f"\nCRM refine of a {args.size} x {args.size} image, {args.threads} thread(s), CPU, "
        f"fusion strips of {model.fusion_tile_rows} rows (0: whole map)"
    )
    print("| mode | part | chunk | time (s) | peak tensor memory (MB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        if r["seconds"] is None:
            print(
                f"| {r['mode']} | {r['part']} | {r['chunk']} | skipped | "
                f"~{r['decode_peak_mb_extrapolated']:.0f} (extrapolated decode) |"
            )
        else:
            cells = f"{r['seconds']:.2f} | {r['peak_mb']:.0f}"
            print(f"| {r['mode']} | {r['part']} | {r['chunk']} | {cells} |")
    for part, v in ratios.items():
        print(
            f"{part}: unchunked / chunked time {v['time_unchunked_over_chunked']:.2f}, "
            f"peak memory {v['peak_unchunked_over_chunked']:.2f}"
        )
    print(
        f"unchunked decoder: {per_query:.0f} bytes per query -> "
        f"{unchunked_estimate / 2**20:.0f} MB at {args.size} x {args.size} (estimate)"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
