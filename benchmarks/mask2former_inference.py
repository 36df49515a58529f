"""Whole-model Mask2Former CPU inference: compiled deformable-attention op vs PyTorch reference.

The paper's COCO panoptic R50 model (configs/coco/panoptic-segmentation/mask2former/
mask2former_R50_bs16_50ep.yaml: 133 classes, 100 queries, 6 encoder layers, 9 decoder layers,
semantic + instance + panoptic inference), random weights, one 512x512 image, eval mode. The
same model runs both ways: every MSDeformAttn module's ``impl`` is switched between "op" and
"pytorch". Runs are interleaved; medians are reported. Peak memory: see benchmarks/common.py.

Run: .venv/bin/python benchmarks/mask2former_inference.py [--repeats 5] [--size 512]
"""
import argparse
import os

import torch

from common import interleaved_medians, peak_memory_bytes, write_report  # benchmarks/common.py

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--output",
        default=os.path.join(os.path.dirname(__file__), "results", "mask2former_inference.json"),
    )
    args = parser.parse_args()
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
    main()
