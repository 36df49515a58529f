"""Print the environment seg_methods runs in: ``python -m seg_methods.collect_env``.

Versions of the main packages, how detectron2 was installed and which of its compiled ops are
available, and which kernels ``seg_methods._C`` holds (C++ CPU, CUDA) with its registered ops.
"""
import importlib
import os
import platform
import sys

from tabulate import tabulate

# detectron2 compiled ops we probe (module attribute or torch.ops name), by what uses them.
_D2_OPS = {
    "deform_conv_forward": "deformable convolution",
    "ROIAlignRotated_forward": "rotated RoIAlign",
    "COCOevalAccumulate": "fast COCO evaluation",
}


def _version(module_name):
    try:
        mod = importlib.import_module(module_name)
    except ImportError as e:
        return f"not installed ({e})"
    return getattr(mod, "__version__", "installed")


def _detectron2_rows():
    rows = []
    try:
        import detectron2
    except ImportError as e:
        return [("detectron2", f"not installed ({e})")]
    rows.append(("detectron2", f"{detectron2.__version__} @ {os.path.dirname(detectron2.__file__)}"))
    try:
        from detectron2 import _C as d2c
    except ImportError as e:
        return rows + [("detectron2._C", f"not importable ({e})")]
    if getattr(d2c, "SEG_METHODS_FALLBACK", False):
        rows.append(
            (
                "detectron2._C",
                "fallback (Python-only install): compiled detectron2 ops raise NotImplementedError",
            )
        )
        compiled = []
    else:
        rows.append(("detectron2._C", f"compiled ({d2c.__file__})"))
        compiled = [name for name in _D2_OPS if hasattr(d2c, name)]
    for name, use in _D2_OPS.items():
        rows.append((f"  d2 op {name}", ("compiled" if name in compiled else "missing") + f" ({use})"))
    return rows


def _seg_methods_rows():
    import torch  # noqa: F401  (loads libc10 before the extension)

    from seg_methods.utils.ext import extension_error, list_ops, load_extension

    ext = load_extension()
    if ext is None:
        return [("seg_methods._C", f"not built ({extension_error()}); PyTorch references are used")]
    kernels = "C++ CPU + CUDA" if ext.has_cuda() else "C++ CPU only"
    return [
        ("seg_methods._C", f"{kernels} @ {ext.__file__}"),
        ("  built with", f"{ext.get_compiler_version()}, CUDA {ext.get_cuda_version()}"),
        ("  ops", ", ".join(list_ops()) or "none"),
    ]


def collect_env_info() -> str:
    """Return the environment table as a string."""
    import numpy as np
    import torch

    rows = [
        ("sys.platform", sys.platform),
        ("Python", sys.version.replace("\n", " ")),
        ("machine", f"{platform.machine()}, {os.cpu_count()} CPUs"),
        ("numpy", np.__version__),
        ("torch", f"{torch.__version__} @ {os.path.dirname(torch.__file__)}"),
        ("torch threads", str(torch.get_num_threads())),
        ("CUDA available", str(torch.cuda.is_available())),
        ("torch built with CUDA", str(torch.version.cuda)),
        ("torchvision", _version("torchvision")),
    ]
    rows += _detectron2_rows()
    rows += _seg_methods_rows()
    for name in ("fvcore", "pycocotools", "panopticapi", "scipy", "cv2", "PIL"):
        rows.append((name, _version(name)))
    return tabulate(rows)


def main():
    print(collect_env_info())


if __name__ == "__main__":
    main()
