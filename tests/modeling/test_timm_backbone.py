"""Tests of the generic timm backbone wrapper (``build_timm_backbone``, ``cfg.MODEL.TIMM``)."""

import pytest
import torch

from detectron2.modeling import ShapeSpec, build_backbone

from seg_methods.config import get_cfg
from seg_methods.modeling.backbone.timm_backbone import TimmBackbone, parse_timm_extra_args


def _cfg(name, indices, features, **timm_keys):
    cfg = get_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_timm_backbone"
    cfg.MODEL.TIMM.NAME = name
    cfg.MODEL.TIMM.OUT_INDICES = list(indices)
    cfg.MODEL.TIMM.OUT_FEATURES = list(features)
    for k, v in timm_keys.items():
        cfg.MODEL.TIMM[k] = v
    return cfg


def _check_shapes(backbone, x):
    backbone.eval()
    with torch.no_grad():
        out = backbone(x)
    shapes = backbone.output_shape()
    assert list(out) == list(shapes)
    for name, feat in out.items():
        spec = shapes[name]
        assert feat.shape == (
            x.shape[0],
            spec.channels,
            x.shape[2] // spec.stride,
            x.shape[3] // spec.stride,
        ), name
    return out


def test_resnet18_registry_shapes():
    cfg = _cfg("resnet18", [1, 2, 3, 4], ["res2", "res3", "res4", "res5"])
    backbone = build_backbone(cfg)
    assert isinstance(backbone, TimmBackbone)
    shapes = backbone.output_shape()
    assert [s.channels for s in shapes.values()] == [64, 128, 256, 512]
    assert [s.stride for s in shapes.values()] == [4, 8, 16, 32]
    assert backbone.size_divisibility == 32
    _check_shapes(backbone, torch.randn(2, 3, 64, 64))
    # timm's own keys under "model."
    assert "model.conv1.weight" in backbone.state_dict()


def test_resnet18_in_chans_and_output_stride():
    cfg = _cfg("resnet18", [2, 4], ["res3", "res5"], IN_CHANS=4, OUTPUT_STRIDE=8, NORM="FrozenBN")
    backbone = build_backbone(cfg, ShapeSpec(channels=4))
    shapes = backbone.output_shape()
    assert [s.stride for s in shapes.values()] == [8, 8]
    assert backbone.model.conv1.weight.shape[1] == 4
    out = _check_shapes(backbone, torch.randn(1, 4, 64, 64))
    assert out["res5"].shape[-1] == 8
    # FrozenBN: no trainable BatchNorm parameters, no running stat updates
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())


def test_hrnet_w18_small_branches():
    cfg = _cfg(
        "hrnet_w18_small",
        [1, 2, 3, 4],
        ["b1", "b2", "b3", "b4"],
        EXTRA_ARGS=["feature_location=''"],
    )
    backbone = build_backbone(cfg)
    shapes = backbone.output_shape()
    # raw HRNet branch widths (w18_small: 16, 32, 64, 128) at strides 4..32
    assert [s.channels for s in shapes.values()] == [16, 32, 64, 128]
    assert [s.stride for s in shapes.values()] == [4, 8, 16, 32]
    _check_shapes(backbone, torch.randn(1, 3, 64, 64))


def test_errors_name_config_keys():
    with pytest.raises(ValueError, match="MODEL.TIMM.NAME"):
        build_backbone(_cfg("no_such_timm_model_xyz", [1], ["res2"]))
    with pytest.raises(ValueError, match="MODEL.TIMM.OUT_INDICES.*MODEL.TIMM.OUT_FEATURES"):
        build_backbone(_cfg("resnet18", [1, 2], ["res2"]))
    with pytest.raises(ValueError, match="MODEL.TIMM.NORM"):
        build_backbone(_cfg("resnet18", [1], ["res2"], NORM="GN"))
    with pytest.raises(ValueError, match="MODEL.TIMM.OUTPUT_STRIDE / MODEL.TIMM.EXTRA_ARGS"):
        build_backbone(_cfg("resnet18", [1], ["res2"], EXTRA_ARGS=["no_such_kwarg=1"]))
    with pytest.raises(ValueError, match="MODEL.TIMM.IN_CHANS"):
        build_backbone(_cfg("resnet18", [1], ["res2"], IN_CHANS=4))  # PIXEL_MEAN has 3


def test_parse_extra_args():
    assert parse_timm_extra_args(["feature_location=''", "drop_path_rate = 0.1"]) == {
        "feature_location": "",
        "drop_path_rate": 0.1,
    }
    with pytest.raises(ValueError, match="EXTRA_ARGS"):
        parse_timm_extra_args(["no_equals_sign"])
    with pytest.raises(ValueError, match="EXTRA_ARGS"):
        parse_timm_extra_args(["x=not a literal"])


def test_upsample_mode_switches_hrnet_fusion():
    keys = dict(EXTRA_ARGS=["feature_location=''"])
    torch.manual_seed(0)
    nearest = build_backbone(_cfg("hrnet_w18_small", [1], ["b1"], **keys)).eval()
    bilinear = build_backbone(
        _cfg("hrnet_w18_small", [1], ["b1"], UPSAMPLE_MODE="bilinear_align_corners", **keys)
    ).eval()
    bilinear.load_state_dict(nearest.state_dict())  # same parameters, other interpolation
    ups = [m for m in bilinear.modules() if isinstance(m, torch.nn.Upsample)]
    assert ups and all(m.mode == "bilinear" and m.align_corners for m in ups)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (nearest(x)["b1"] - bilinear(x)["b1"]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="has no nn.Upsample"):
        build_backbone(_cfg("resnet18", [1], ["res2"], UPSAMPLE_MODE="bilinear"))
    with pytest.raises(ValueError, match="MODEL.TIMM.UPSAMPLE_MODE"):
        build_backbone(_cfg("resnet18", [1], ["res2"], UPSAMPLE_MODE="cubic"))
