"""ProtoSeg on a timm HRNet: the HRNetV2Head, the official-compatibility options
(PROJECTION_L2_AXIS, CE_CLASS_WEIGHTS), the "prototype_index" inference output, and
tools/convert_protoseg_weights.py on official-layout state dicts (without the official source)."""

import os

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from torch.nn import functional as F

from seg_methods.config import get_cfg
from seg_methods.modeling.pixel_decoder.hrnetv2_head import HRNetV2Head
from seg_methods.utils.checkpoint import CheckpointSecurityError
from repo_scripts import load_script

REPO = os.path.join(os.path.dirname(__file__), "..", "..")
QUICK_HRNET = os.path.join(
    REPO, "configs", "quick_schedules", "protoseg_hrnet_synthetic_semantic_instant_test.yaml"
)


def _cfg(*opts):
    cfg = get_cfg()
    cfg.merge_from_file(QUICK_HRNET)
    cfg.merge_from_list(list(opts))
    return cfg


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(_cfg()).eval()


def _converter():
    return load_script("tools/convert_protoseg_weights.py")


# --------------------------------------------------------------------------- head
def test_hrnetv2_head_concatenates_upsampled_branches():
    shapes = {
        "a": ShapeSpec(channels=2, stride=4),
        "b": ShapeSpec(channels=3, stride=8),
        "c": ShapeSpec(channels=1, stride=16),
    }
    head = HRNetV2Head(
        shapes, in_features=["a", "b", "c"], convs_dim=5, norm="", num_classes=None
    ).eval()
    assert head.in_channels == 6 and head.predictor is None
    feats = {
        "a": torch.randn(1, 2, 8, 8),
        "b": torch.randn(1, 3, 4, 4),
        "c": torch.randn(1, 1, 2, 2),
    }
    # reference: align_corners=True bilinear upsampling, concat, 3x3 conv (+ bias), ReLU
    up = [feats["a"]] + [
        F.interpolate(feats[k], size=(8, 8), mode="bilinear", align_corners=True) for k in "bc"
    ]
    ref = F.relu(F.conv2d(torch.cat(up, 1), head.fuse.weight, head.fuse.bias, padding=1))
    torch.testing.assert_close(head.layers(feats), ref)
    with_classes = HRNetV2Head(shapes, in_features=["a", "b", "c"], convs_dim=5, num_classes=7)
    assert with_classes.eval().layers(feats).shape == (1, 7, 8, 8)
    with pytest.raises(ValueError, match="IN_FEATURES"):
        HRNetV2Head(shapes, in_features=["a", "zz"], convs_dim=5)


# --------------------------------------------------------------------------- model options
def test_hrnet_protoseg_trains_and_returns_prototype_index():
    torch.manual_seed(0)
    m = build_model(_cfg("MODEL.PROTOSEG.OUTPUT_PROTOTYPE_INDEX", "True"))
    assert type(m.sem_seg_head).__name__ == "HRNetV2Head"
    # timm HRNet branches 16/32/64/128 -> 240 concatenated channels
    assert m.sem_seg_head.in_channels == 240
    x = [{"image": torch.rand(3, 64, 64) * 255, "sem_seg": torch.randint(0, 8, (64, 64))}]
    losses = m(x)
    assert set(losses) == {"loss_sem_seg", "loss_ppc", "loss_ppd"}
    assert all(torch.isfinite(v) for v in losses.values())
    m.eval()
    with torch.no_grad():
        out = m([{"image": x[0]["image"], "height": 48, "width": 80}])[0]
        ids = out["prototype_index"]
        assert ids.shape == (48, 80) and ids.dtype == torch.int64
        assert 0 <= int(ids.min()) and int(ids.max()) < 8 * 3
        torch.testing.assert_close(
            ids, m.nearest_prototypes([{"image": x[0]["image"], "height": 48, "width": 80}])[0]
        )
        # the prototype's class is the predicted class at (almost) every pixel (the class logits
        # LayerNorm is monotone at initialisation; upsampling differs only at boundaries)
        agree = (ids // 3 == out["sem_seg"].argmax(0)).float().mean()
        assert agree > 0.9, float(agree)
        # at feature resolution the agreement is exact
        cos = m.prototype_cosines(m.embed(m.preprocess_images(x).tensor))
        b, c, k, h, w = cos.shape
        assert torch.equal(
            cos.reshape(b, c * k, h, w).argmax(1) // k, m.class_logits(cos).argmax(1)
        )


def test_without_option_no_prototype_index(model):
    with torch.no_grad():
        out = model([{"image": torch.rand(3, 64, 64) * 255}])[0]
    assert "prototype_index" not in out and out["sem_seg"].shape == (8, 64, 64)


def test_projection_l2_axis_width_is_the_official_axis(model):
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feats = model.projection(model.sem_seg_head.layers(model.backbone(x)))
        model.projection_l2_axis = "width"
        try:
            emb = model.embed(x)
        finally:
            model.projection_l2_axis = "channels"
        emb_channels = model.embed(x)
    ln = model.feature_norm
    # L2 over the width (last axis), then LayerNorm and L2 over the channels
    ref = F.normalize(ln(F.normalize(feats, dim=-1).permute(0, 2, 3, 1)), dim=-1).permute(
        0, 3, 1, 2
    )
    torch.testing.assert_close(emb, ref)
    assert (emb - emb_channels).abs().max() > 1e-3
    with pytest.raises(ValueError, match="PROJECTION_L2_AXIS"):
        build_model(_cfg("MODEL.PROTOSEG.PROJECTION_L2_AXIS", "rows"))


def test_class_weighted_cross_entropy():
    weights = [0.5, 1.0, 2.0, 1.0, 1.0, 3.0, 1.0, 0.25]
    torch.manual_seed(0)
    m = build_model(_cfg("MODEL.PROTOSEG.CE_CLASS_WEIGHTS", str(weights))).eval()
    logits = torch.randn(2, 8, 4, 4)
    targets = torch.randint(0, 8, (2, 16, 16))
    targets[0, :4] = 255
    loss = m.weighted_cross_entropy({"sem_seg": logits}, targets)
    up = F.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=False)
    valid = targets != 255
    pix = F.cross_entropy(up, targets.clamp(max=7), reduction="none")[valid]
    w = torch.tensor(weights)[targets[valid]]
    torch.testing.assert_close(loss, (pix * w).sum() / w.sum())
    void = m.weighted_cross_entropy(
        {"sem_seg": logits.requires_grad_()}, torch.full_like(targets, 255)
    )
    assert float(void.detach()) == 0.0 and void.requires_grad
    with pytest.raises(ValueError, match="CE_CLASS_WEIGHTS"):
        build_model(_cfg("MODEL.PROTOSEG.CE_CLASS_WEIGHTS", "[1.0, 2.0]"))


# --------------------------------------------------------------------------- converter
def _official_layout(ours_state):
    """Our HRNet ProtoSeg state dict written with the official key names (inverse mapping)."""
    out = {}
    for k, v in ours_state.items():
        if k.startswith("backbone.model."):
            out["backbone." + k[len("backbone.model.") :]] = v
        elif k.startswith("sem_seg_head.fuse.norm."):
            out["cls_head.1.0." + k.split(".")[-1]] = v
        elif k.startswith("sem_seg_head.fuse."):
            out["cls_head.0." + k.split(".")[-1]] = v
        elif k.startswith("projection."):
            out["proj_head.proj." + k[len("projection.") :]] = v
            out["proj_head.mlp2." + k[len("projection.") :]] = v
        elif k.startswith("feature_norm."):
            out["feat_norm." + k.split(".")[-1]] = v
        elif k.startswith("logits_norm."):
            out["mask_norm." + k.split(".")[-1]] = v
        elif k == "prototypes":
            out[k] = v * 3.0  # unnormalised, as an official Parameter may be
        else:
            raise AssertionError(k)
    return out


def test_converter_round_trip_and_file_format(model, tmp_path):
    conv = _converter()
    ours = model.state_dict()
    official = _official_layout(ours)
    path = tmp_path / "official.pth"
    torch.save(
        {
            "config_dict": {"network": {"backbone": "hrnet48"}},
            "state_dict": {"module." + k: v for k, v in official.items()},
        },
        path,
    )
    converted = conv.convert(conv.load_official_state(str(path)))
    assert set(converted) == set(ours)
    for k in ours:
        torch.testing.assert_close(converted[k], ours[k], msg=k)  # prototypes re-normalised
    out = tmp_path / "ours.pth"
    assert conv.main([str(path), str(out), "--config-file", QUICK_HRNET]) == 0
    fresh = build_model(_cfg())
    fresh.load_state_dict(torch.load(out, weights_only=True)["model"], strict=True)
    torch.testing.assert_close(fresh.prototypes, model.prototypes)


def test_converter_refuses_bad_checkpoints(model, tmp_path):
    conv = _converter()
    official = _official_layout(model.state_dict())
    with pytest.raises(conv.ConversionError, match="no counterpart.*aux_head"):
        conv.convert({**official, "aux_head.0.weight": torch.zeros(1)})
    with pytest.raises(conv.ConversionError, match="incre_modules"):
        conv.convert({**official, "backbone.incre_modules.0.0.conv1.weight": torch.zeros(1)})
    missing = {k: v for k, v in official.items() if k != "mask_norm.weight"}
    with pytest.raises(conv.ConversionError, match="missing.*mask_norm.weight"):
        conv.convert(missing)
    bad_alias = dict(official)
    bad_alias["proj_head.mlp2.0.weight"] = official["proj_head.mlp2.0.weight"] + 1
    with pytest.raises(conv.ConversionError, match="alias"):
        conv.convert(bad_alias)
    # a config whose model does not match (other embedding size) is refused with the key
    with pytest.raises(conv.ConversionError, match="shape mismatches.*projection.2.weight"):
        conv.check_against_config(
            conv.convert(official), QUICK_HRNET, ["MODEL.PROTOSEG.EMBED_DIM", "32"]
        )
    # a pickle that needs arbitrary code is refused by the weights-only loader
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": official, "obj": _Unsafe()}, path)
    with pytest.raises(CheckpointSecurityError):
        conv.load_official_state(str(path))


class _Unsafe:
    pass
