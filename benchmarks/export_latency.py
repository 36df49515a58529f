"""CPU latency of the exported (TorchScript) Mask2Former against eager inference.

The paper's COCO panoptic R50 model (configs/coco/panoptic-segmentation/mask2former/
mask2former_R50_bs16_50ep.yaml: 133 classes, 100 queries, 6 encoder and 9 decoder layers),
random weights, one 512x512 image, exported by :func:`seg_methods.export.export_model` (the
graph calls the compiled deformable-attention op). Both sides compute the same output, the
semantic scores "sem_seg" (panoptic merging is not exported, see seg_methods/export/), so the
eager model runs with TEST.PANOPTIC_ON / INSTANCE_ON off. Runs are interleaved in one process,
after two warm-up calls each (TorchScript's profiling executor optimises the graph on its first
calls); medians over --repeats, for 1 and 2 threads (benchmarks/common.py).

Run: .venv/bin/python benchmarks/export_latency.py [--repeats 5] [--size 512]
"""

import argparse
import os
import tempfile

import torch

from common import interleaved_medians, write_report  # benchmarks/common.py

import seg_methods  # noqa: F401  (registers the model)
from detectron2.modeling import build_model
from seg_methods.config import get_cfg
from seg_methods.export import export_model, output_differences

CONFIG = "configs/coco/panoptic-segmentation/mask2former/mask2former_R50_bs16_50ep.yaml"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--output",
        default=os.path.join(os.path.dirname(__file__), "results", "export_latency.json"),
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = get_cfg()
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(
        ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "TEST.PANOPTIC_ON", False,
         "TEST.INSTANCE_ON", False]
    )  # fmt: skip
    model = build_model(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    size = (args.size, args.size)
    image = torch.randint(0, 256, (3, *size), generator=gen, dtype=torch.uint8)
    other = torch.randint(0, 256, (3, *size), generator=gen, dtype=torch.uint8)

    torch.set_num_threads(max(args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        result = export_model(cfg, model, "torchscript", tmp, sample_image=image)
        exported = torch.jit.load(result.path)
    print(f"exported {result.output_names}; ops in the graph: {result.ops}")
    print(f"max |TorchScript - eager|: {result.max_abs_diff}")

    def eager(x):
        def fn():
            with torch.no_grad():
                return model([{"image": x}])[0]["sem_seg"]

        return fn

    def scripted(x):
        def fn():
            with torch.no_grad():
                return exported(x)[0]

        return fn

    for _ in range(2):  # warm-up, and the graph optimisation of the profiling executor
        scripted(image)()
        eager(image)()
    # a third image, neither traced nor used by the export's own verification
    third_diff = output_differences([scripted(other)()], [eager(other)()], ["sem_seg"])["sem_seg"]
    print(f"max |TorchScript - eager| on a third image: {third_diff:.2e}")

    per_threads, rows = {}, []
    for threads in args.threads:
        torch.set_num_threads(threads)
        medians, runs = interleaved_medians(
            {"eager": eager(image), "torchscript": scripted(image)}, args.repeats
        )
        speedup = medians["eager"] / medians["torchscript"]
        per_threads[str(threads)] = {"median_s": medians, "all_s": runs, "speedup": speedup}
        rows.append((threads, medians["eager"], medians["torchscript"], speedup))
    table = "| threads | eager, s/image | TorchScript, s/image | eager / TorchScript |\n"
    table += "|---|---|---|---|\n"
    table += "\n".join(f"| {t} | {e:.3f} | {s:.3f} | {r:.2f}x |" for t, e, s, r in rows)
    print(
        f"Mask2Former R50 (COCO panoptic config, sem_seg output), one {args.size}x{args.size} "
        f"image, CPU, median of {args.repeats}\n\n{table}"
    )
    write_report(
        args.output,
        {
            "config": CONFIG,
            "image_size": args.size,
            "repeats": args.repeats,
            "outputs": result.output_names,
            "ops_in_graph": result.ops,
            "export_max_abs_diff": result.max_abs_diff,
            "third_image_max_abs_diff": third_diff,
            "per_threads": per_threads,
            "markdown": table,
        },
    )


if __name__ == "__main__":
    main()
