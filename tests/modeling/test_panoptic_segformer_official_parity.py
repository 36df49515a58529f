"""Parity of our Panoptic SegFormer with the official implementation (zhiqi-li/Panoptic-SegFormer).

Runs ``tools/compare_with_official_panoptic_segformer.py`` on a small official-layout model (R50,
2 encoder / 2 location-decoder / 2 + 2 mask-decoder layers, 50 queries, COCO's 80 + 53 classes,
random weights, one 128x160 image). Skipped unless the official code and its libraries are
available: PSF_OFFICIAL_ROOT (a zhiqi-li/Panoptic-SegFormer checkout), PSF_MM_SITE (mmcv 1.3.x
"lite" + einops, e.g. /work/ref/mm017/site) and PSF_MMDET_SITE (pure-Python mmdet 2.12.0 +
terminaltables + six). See projects/PanopticSegFormer/README.md for the exact commands.
"""

import os

import pytest
import torch
from repo_scripts import load_script

_ENV = ("PSF_OFFICIAL_ROOT", "PSF_MM_SITE", "PSF_MMDET_SITE")

pytestmark = pytest.mark.skipif(
    not all(os.environ.get(k) for k in _ENV),
    reason="official Panoptic SegFormer not available (set " + ", ".join(_ENV) + ")",
)


@pytest.fixture(scope="module")
def tool_and_official():
    torch.set_num_threads(1)
    tool = load_script("tools/compare_with_official_panoptic_segformer.py")
    return tool, tool.OfficialCode(*tool.find_official(None, None, None))


def test_matches_official_without_pos_offset(tool_and_official):
    """With the encoding's offset set to 0 on both sides, every stage agrees to float32
    precision and the panoptic maps are identical."""
    tool, official = tool_and_official
    report = tool.compare(
        official, pos_offset=0.0, our_pos_offset=0.0, mask_bias=-1.0, log=lambda s: None
    )
    print(report.format())
    assert report.ok, [r.name for r in report.failed()]
    assert not any("info" in r.name for r in report.rows)
    for name in (
        "encoder output",
        "location decoder layer 1: class",
        "thing mask decoder",
        "stuff mask decoder",
        "stuff scores",
    ):
        row = report.row(name)
        assert row.ref_max > 0.1, f"{name}: official output is (near) zero, nothing compared"
        assert row.rel_diff < 1e-5, f"{name}: {row.rel_diff}"
    # the panoptic comparison is not vacuous: the official map has a thing and a stuff segment
    assert report.row("panoptic: number of segments").ref_max >= 2
    assert report.row("backbone res5").abs_diff == 0.0


def test_matches_official_as_both_configs_are_written(tool_and_official):
    """Both sides as their configs are written, on an image whose sides are not multiples of 32:
    the official offset -0.5 against our COCO configs' MODEL.MSDEFORM_PIXEL_DECODER.POS_OFFSET
    -0.5, and no padding (the official test pipeline's) against their
    MODEL.PANOPTIC_SEGFORMER.SIZE_DIVISIBILITY 0."""
    tool, official = tool_and_official
    report = tool.compare(
        official, size=(120, 150), pos_offset=-0.5, mask_bias=-1.0, log=lambda s: None
    )
    print(report.format())
    assert report.ok, [r.name for r in report.failed()]
    assert not any("info" in r.name for r in report.rows)
    assert report.row("thing mask decoder").ref_max > 0.1
    assert report.row("panoptic: number of segments").ref_max >= 2


@pytest.mark.parametrize("backbone", ["swinl", "pvtb5"])
def test_matches_official_other_backbones(tool_and_official, backbone):
    """The official Swin-L (2 blocks per stage here) and PVTv2-B5 configs: converted into our
    D2SwinTransformer / timm pvt_v2_b5 configs, every stage agrees (both configs as written)."""
    tool, official = tool_and_official
    report = tool.compare(official, backbone=backbone, log=lambda s: None)
    print(report.format())
    assert report.ok, [r.name for r in report.failed()]
    assert not any("info" in r.name for r in report.rows)
    assert report.row("backbone res5").ref_max > 0.1
    assert report.row("thing mask decoder").ref_max > 0.1


def test_deviations_are_visible(tool_and_official):
    """Both settings change the outputs (the check sees real differences): the official offset
    -0.5 against our encoding without it, and padding to 32 of a 120x150 image, which the
    official test pipeline does not pad."""
    tool, official = tool_and_official
    report = tool.compare(official, pos_offset=-0.5, our_pos_offset=0.0, log=lambda s: None)
    assert report.row("backbone res3").abs_diff == 0.0
    assert report.row("encoder output").rel_diff > 1e-3
    assert report.row("location decoder layer 1: class").rel_diff > 1e-4
    padded = tool.compare(
        official, size=(120, 150), pos_offset=-0.5, size_divisibility=32, log=lambda s: None
    )
    assert padded.row("backbone res4").rel_diff > 1e-3  # same shape, other values
    assert padded.row("location decoder layer 1: class").rel_diff > 1e-3
