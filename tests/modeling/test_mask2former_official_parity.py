"""Parity of our Mask2Former with the official implementation, on a tiny config.

Runs ``tools/compare_with_official_mask2former.py`` (see its docstring) when the official source
is available: ``MASK2FORMER_OFFICIAL_ROOT`` (a Mask2Former checkout or an unpacked
``maskformer2`` sdist), else ``/tmp/swinhelper/dl/maskformer2-0.1`` if it exists. Skipped
otherwise (CI has no third-party source); the README reports the full-size measurements.

The tiny config is the synthetic ResNet-18 model shrunk further; the settings the official code
hard-codes (encoder FFN 1024, 4 sampling points) keep their official values. Both of our
deformable-attention implementations are compared, on two odd-sized images, in eval and train
mode.
"""

import os
from pathlib import Path

import pytest
from repo_scripts import load_script

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OFFICIAL_ROOT = "/tmp/swinhelper/dl/maskformer2-0.1"
CONFIG = REPO / "configs/synthetic/panoptic-segmentation/mask2former/mask2former_R18_bs8_600it.yaml"
TINY_OPTS = [
    "MODEL.MASK2FORMER.HIDDEN_DIM", "32",
    "MODEL.MSDEFORM_PIXEL_DECODER.CONVS_DIM", "32",
    "MODEL.MSDEFORM_PIXEL_DECODER.MASK_DIM", "32",
    "MODEL.MSDEFORM_PIXEL_DECODER.NHEADS", "4",
    "MODEL.MASK2FORMER.NHEADS", "4",
    "MODEL.MASK2FORMER.NUM_OBJECT_QUERIES", "16",  # Q * C >= 100: the official top-k
    "MODEL.MASK2FORMER.DIM_FEEDFORWARD", "64",
    "MODEL.MSDEFORM_PIXEL_DECODER.ENC_DIM_FEEDFORWARD", "1024",
    "MODEL.MSDEFORM_PIXEL_DECODER.TRANSFORMER_ENC_LAYERS", "1",
    "MODEL.MASK2FORMER.DEC_LAYERS", "3",
    "MODEL.MASK_CLS.TRAIN_NUM_POINTS", "512",
]  # fmt: skip


def _official_root():
    root = os.environ.get("MASK2FORMER_OFFICIAL_ROOT")
    if root:
        return root
    return DEFAULT_OFFICIAL_ROOT if os.path.isdir(DEFAULT_OFFICIAL_ROOT) else None


def _load_tool():
    return load_script("tools/compare_with_official_mask2former.py")


@pytest.fixture(scope="module")
def report():
    root = _official_root()
    if root is None:
        pytest.skip(
            "official Mask2Former source not available: set MASK2FORMER_OFFICIAL_ROOT to a "
            "facebookresearch/Mask2Former checkout (or an unpacked maskformer2 sdist)"
        )
    tool = _load_tool()
    try:
        tool.find_official_package(root)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    import seg_methods  # noqa: F401  (registers our model and datasets)

    return tool.compare(
        root,
        str(CONFIG),
        opts=TINY_OPTS,
        impls=("op", "pytorch"),
        sizes=((48, 64), (45, 59)),
        seed=0,
        log=lambda msg: None,
    )


def _failed(report):
    return "\n".join(
        f"{r.section} | {r.name} | diff {r.abs_diff} rel {r.rel_diff} | {r.tol} | {r.note}"
        for r in report.failed()
    )


def test_every_row_within_tolerance(report):
    assert report.ok, "rows outside tolerance:\n" + _failed(report)


def test_report_covers_outputs_losses_and_random_draws(report):
    names = {(r.section, r.name) for r in report.rows}
    for impl in ("op", "pytorch"):
        for name in (
            "head.pred_logits",
            "head.pred_masks",
            "head.aux_outputs[2].pred_masks",
            "image1 sem_seg",
            "image0 panoptic_seg ids",
            "image0 segments_info",
            "image1 instances.pred_masks",
        ):
            assert (f"eval [{impl}]", name) in names, (impl, name)
        for name in (
            "torch.rand draws (order, shapes, values)",
            "RNG state after forward",
            "Hungarian matchings",
            "loss_ce",
            "loss_mask_2",
            "loss_dice_2",
        ):
            assert (f"train [{impl}]", name) in names, (impl, name)
    fallback = [r for r in report.rows if r.section == "official"]
    assert fallback and fallback[0].ok  # the official code ran its pure-PyTorch fallback


def test_pytorch_reference_is_bit_exact_in_eval(report):
    # Same operations in the same order as the official code: no rounding difference at all.
    rows = [r for r in report.rows if r.section == "eval [pytorch]" and r.rel_diff is not None]
    assert rows and max(r.abs_diff for r in rows) == 0.0
