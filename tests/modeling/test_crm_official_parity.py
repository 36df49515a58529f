"""Parity of our CRM with the official code (dvlab-research/Entity ``High-Quality-Segmention``).

Runs ``tools/compare_with_official_crm.py`` (see its docstring) when the official source exists:
``CRM_OFFICIAL_ROOT``, else /work/ref/High-Quality-Segmention; skipped otherwise. One random
official-format checkpoint (ResNet-50, official initialisation) is converted with
``tools/convert_crm_weights.py`` and loaded into both; compared in eval mode on the CPU: the
single-scale decoder logits at random continuous points, and the 4-scale cascade of the official
``test.py`` on a 72 x 60 image with query chunks of 1000.
"""

import os
from pathlib import Path

import pytest
import torch
from repo_scripts import load_script

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OFFICIAL_ROOT = "/work/ref/High-Quality-Segmention"


def _official_root():
    root = os.environ.get("CRM_OFFICIAL_ROOT") or DEFAULT_OFFICIAL_ROOT
    return root if os.path.isfile(os.path.join(root, "models", "network", "crm.py")) else None


def _load_tool(name):
    return load_script(f"tools/{name}.py")


@pytest.fixture(scope="module")
def report():
    root = _official_root()
    if root is None:
        pytest.skip(
            "official CRM source not available: set CRM_OFFICIAL_ROOT to the "
            "High-Quality-Segmention folder of dvlab-research/Entity"
        )
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _load_tool("compare_with_official_crm").compare(
            root, seed=0, size=(72, 60), queries=1000, chunk=1000
        )
    finally:
        torch.set_num_threads(n)


def test_single_scale_logits_match(report):
    assert report["single_scale_logit_range"] > 1.0  # a non-trivial comparison
    assert report["single_scale_logits"] < 1e-4, report


def test_cascade_matches_official_test_loop(report):
    assert report["cascade_prob_std"] > 0.01, report
    assert report["cascade_prob"] < 1e-3, report
    assert report["cascade_prob_via_refine"] < 1e-3, report
    assert report["cascade_prob_tiled_fusion"] < 1e-3, report
    assert report["cascade_binary_disagreement"] < 1e-3, report


def test_converter_refuses_unknown_and_drops_layer4():
    convert = _load_tool("convert_crm_weights")
    w = torch.zeros(1)
    out, dropped = convert.convert(
        {
            "module.feats.conv1.weight": w,
            "module.feats.layer4.0.conv1.weight": w,
            "module.aspp_.aspp1_1024.bn.weight": w,
            "module.aspp_.bn1_128.running_mean": w,
            "module.aspp_.last_conv.1.bias": w,
            "module.imnet.layers.8.weight": w,
        }
    )
    assert set(out) == {
        "backbone.model.conv1.weight",
        "fusion.branches.2.norm1.weight",
        "fusion.branches.0.norm2.running_mean",
        "fusion.project.1.bias",
        "decoder.mlp.layers.8.weight",
    }
    assert dropped == ["feats.layer4.0.conv1.weight"]
    with pytest.raises(ValueError, match="not part of the official CRMNet"):
        convert.convert({"module.feats.conv1.weight": w, "module.head.weight": w})


def test_converter_refuses_missing_keys_and_wrong_shapes():
    convert = _load_tool("convert_crm_weights")
    config = str(REPO / convert.DEFAULT_CONFIG)
    partial = {"decoder.mlp.layers.0.weight": torch.zeros(32, 262)}
    with pytest.raises(ValueError, match="missing"):
        convert.check_against_model(partial, config)
    from detectron2.modeling import build_model

    from seg_methods.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(config)
    cfg.MODEL.DEVICE = "cpu"
    full = {
        k: v
        for k, v in build_model(cfg).state_dict().items()
        if k not in ("pixel_mean", "pixel_std") and not k.endswith("num_batches_tracked")
    }
    done = convert.check_against_model(full, config)  # counters may be absent: filled with 0
    assert any(k.endswith("num_batches_tracked") for k in done)
    full["decoder.mlp.layers.0.weight"] = torch.zeros(32, 260)
    with pytest.raises(ValueError, match="shape mismatches"):
        convert.check_against_model(full, config)
