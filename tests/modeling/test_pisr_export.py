"""TorchScript export of PISR's detectron2 bases with an active PISR module (separate from
tests/modeling/test_pisr.py because tracing the two models takes 10-50 s on the shared machine)."""

import os

import pytest
import torch
from detectron2.modeling import build_model

import seg_methods  # noqa: F401  registers the meta-architectures
from seg_methods.config import get_cfg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK_M2F = os.path.join(
    REPO, "configs", "quick_schedules", "pisr_mask2former_synthetic_panoptic_instant_test.yaml"
)


@pytest.mark.parametrize("base", ["panoptic_fpn", "panoptic_deeplab"])
def test_torchscript_export_with_active_pisr(base, tmp_path):
    """The shared end-to-end test exports fresh models, whose zero-initialised ``fuse`` hides
    PISR; here PISR changes the output, and the trace must still equal eager on another image
    (the proposals / centre peaks, hence the selected instances, differ between the images)."""
    from seg_methods.export import export_model

    cfg = get_cfg()
    cfg.merge_from_file(QUICK_M2F.replace("pisr_mask2former", f"pisr_{base}"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.PANOPTIC_DEEPLAB.CENTER_THRESHOLD = -1e9  # every peak is a candidate
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.sem_seg_head.pisr.fuse.weight.normal_(0, 0.5)
        if base == "panoptic_deeplab":
            model.ins_embed_head.center_predictor.weight.normal_(0, 1.0)
    result = export_model(cfg, model, "torchscript", str(tmp_path), image_size=(61, 83))
    assert result.verified
    for diffs in result.max_abs_diff.values():
        assert diffs["sem_seg"] <= 1e-4
