"""RegProxy with the hybrid backbones R26+ViT-S/32 and R50+ViT-L/32 (paper Table 3).

timm's ``vit_small_r26_s32_*`` / ``vit_large_r50_s32_*`` through ``build_timm_vit_backbone``:
32-pixel tokens, association from the token embedding (``OUT_INDICES[0] = -1``: ResNetV2 stem
features, 1x1 projection, position embedding; the official "implicit-mid-n1"), logits painted at
1/8. Transformer depth / width are shrunk through ``MODEL.TIMM.EXTRA_ARGS`` (the ResNet stem is
fixed by the name) so every test stays small. Parity with the official code is in
tests/modeling/test_regproxy_official_parity.py (skipped without it).
"""

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model

from seg_methods.config import get_cfg
from seg_methods.modeling.backbone.timm_vit import TimmViTBackbone
from seg_methods.solver.build import get_seg_optimizer_params
from repo_scripts import load_script

_DIR = "configs/ade20k/semantic-segmentation/regproxy/"
CONFIGS = {
    "vit_small_r26_s32_384": _DIR + "regproxy_r26_s32_bs16_160k.yaml",
    "vit_large_r50_s32_384": _DIR + "regproxy_r50_l32_bs16_160k_res640.yaml",
}
TINY = ["img_size=64", "depth=2", "embed_dim=64", "num_heads=2"]


TORCH_THREADS = 1  # one intra-op thread for this module (tests/conftest.py)


def _backbone(name, indices=(-1, 0, 1), **extra):
    args = {"img_size": 64, "depth": 2, "embed_dim": 64, "num_heads": 2, **extra}
    names = [f"i{i}" for i in indices]
    return TimmViTBackbone(
        name=name, out_indices=list(indices), out_features=names, extra_args=args
    ).eval()


@pytest.mark.parametrize("name", ["vit_small_r26_s32_224", "vit_large_r50_s32_224"])
def test_hybrid_backbone_layers_and_token_embedding(name):
    torch.manual_seed(0)
    bb = _backbone(name)
    m = bb.model
    assert bb.is_hybrid and bb.size_divisibility == 32
    assert bb.output_shape()["i-1"] == ShapeSpec(channels=64, stride=32)
    with torch.no_grad():
        m.pos_embed.normal_()  # timm starts it near 0, which would hide a missing addition
        # input at the native grid (2x2 tokens): timm's own functions apply unchanged
        x = torch.randn(2, 3, 64, 64)
        out = bb(x)
        assert {k: tuple(v.shape) for k, v in out.items()} == {
            k: (2, 64, 2, 2) for k in ("i-1", "i0", "i1")
        }
        final = m.forward_features(x)[:, m.num_prefix_tokens :]  # blocks + final norm
        torch.testing.assert_close(out["i1"].flatten(2).transpose(1, 2), final)
        _, inter = m.forward_intermediates(x, indices=[0], norm=False)
        torch.testing.assert_close(out["i0"], inter[0])
        # -1 on another grid (4x3 tokens from the 2x2 embedding), written out: ResNetV2 stem ->
        # 1x1 projection -> + position embedding resampled bicubic (mmseg's resize_pos_embed)
        x = torch.randn(1, 3, 128, 96)
        feats = m.patch_embed.backbone(x)
        assert feats.shape == (1, m.patch_embed.feature_dim, 4, 3)  # /32
        emb = F.conv2d(feats, m.patch_embed.proj.weight, m.patch_embed.proj.bias)
        pos = m.pos_embed[:, 1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(4, 3), mode="bicubic", align_corners=False)
        torch.testing.assert_close(bb(x)["i-1"], emb + pos)


def test_hybrid_token_stride_ignores_timm_img_size_rounding():
    # img_size 100 is not a multiple of 32: timm's feat_ratio() would say 100 // 4 = 25
    bb = _backbone("vit_small_r26_s32_224", indices=(-1,), img_size=100, depth=1)
    assert bb.size_divisibility == 32
    assert tuple(bb(torch.randn(1, 3, 96, 64))["i-1"].shape) == (1, 64, 3, 2)


def test_hybrid_errors_name_the_config_keys():
    with pytest.raises(ValueError, match=r"MODEL.TIMM.OUT_INDICES.*\[-2\].*-1 = the token emb"):
        _backbone("vit_small_r26_s32_224", indices=(-2, 1))
    with pytest.raises(ValueError, match=r"MODEL.TIMM.OUT_INDICES.*\[2\] outside \[-1, 1\]"):
        _backbone("vit_small_r26_s32_224", indices=(-1, 2))
    with pytest.raises(ValueError, match="patch size"):  # 48 is not a multiple of 32
        _backbone("vit_small_r26_s32_224")(torch.randn(1, 3, 48, 64))
    # through the config: an invalid association depth names the key
    with pytest.raises(ValueError, match="MODEL.TIMM.OUT_INDICES"):
        build_model(_cfg(CONFIGS["vit_small_r26_s32_384"], "MODEL.TIMM.OUT_INDICES", "[-2, 1]"))


def _cfg(path, *opts):
    cfg = get_cfg()
    cfg.merge_from_file(path)
    cfg.merge_from_list(["MODEL.TIMM.EXTRA_ARGS", str(TINY), "MODEL.TIMM.OUT_INDICES", "[-1, 1]"])
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.REGPROXY.NORM = "BN"
    return cfg


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hybrid_configs_build_and_paint_at_one_eighth(name):
    cfg = get_cfg()
    cfg.merge_from_file(CONFIGS[name])
    # the official settings as written: association from the embedding, 32-pixel padding
    assert cfg.MODEL.TIMM.NAME == name
    assert list(cfg.MODEL.TIMM.OUT_INDICES) == [-1, 11 if "small" in name else 23]
    assert cfg.MODEL.PER_PIXEL.SIZE_DIVISIBILITY == 32
    assert list(cfg.MODEL.REGPROXY.REGION_RES) == [4, 4]
    crop = 512 if "small" in name else 640
    assert list(cfg.INPUT.CROP.SIZE) == [crop, crop] == list(cfg.TEST.PER_PIXEL.CROP_SIZE)
    assert f"img_size={crop}" in cfg.MODEL.TIMM.EXTRA_ARGS
    poly = "small" in name  # adamw-poly (R26+S/32) vs adamw-cr (R50+L/32)
    assert cfg.SOLVER.LR_SCHEDULER_NAME == ("WarmupPolyLR" if poly else "WarmupCosineRestartLR")
    assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.MAX_ITER) == (
        6e-5,
        0.01,
        160000,
    )

    model = build_model(_cfg(CONFIGS[name])).eval()
    assert model.backbone.size_divisibility == 32 and model.size_divisibility == 32
    with torch.no_grad():
        feats = model.backbone(torch.randn(2, 3, 96, 128))  # 3x4 tokens
        logits = model.sem_seg_head.layers(feats)
        assert logits.shape == (2, 150, 12, 16)  # 4x4 pixels per 32-pixel token: 1/8
        image = torch.randint(0, 255, (3, 70, 45), dtype=torch.uint8)  # padded to 96x64
        out = model([{"image": image}])[0]["sem_seg"]
    assert out.shape == (150, 70, 45) and torch.isfinite(out).all()


def test_hybrid_train_step_and_weight_decay_groups():
    cfg = _cfg(CONFIGS["vit_small_r26_s32_384"])
    model = build_model(cfg).train()
    image = torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8)
    sem_seg = torch.randint(0, 150, (64, 96))
    sem_seg[:8] = 255  # void
    losses = model([{"image": image, "sem_seg": sem_seg}])
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    names = dict(model.named_parameters())
    stem = "backbone.model.patch_embed.backbone."
    for k in (stem + "stem.conv.weight", "backbone.model.patch_embed.proj.weight"):
        assert names[k].grad is not None and names[k].grad.abs().sum() > 0, k
    # official custom_keys: names containing "norm" (the stem's GroupNorms) get no decay
    groups = get_seg_optimizer_params(
        model, base_lr=1e-4, weight_decay=0.01, weight_decay_norm=0.0, weight_decay_embed=0.0
    )
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay[id(names[stem + "stem.norm.weight"])] == 0.0
    assert decay[id(names[stem + "stages.0.blocks.0.norm1.bias"])] == 0.0
    assert decay[id(names[stem + "stages.0.blocks.0.downsample.norm.weight"])] == 0.0
    assert decay[id(names[stem + "stages.0.blocks.0.conv1.weight"])] == 0.01
    assert decay[id(names["backbone.model.patch_embed.proj.weight"])] == 0.01
    assert decay[id(names["backbone.model.pos_embed"])] == 0.0


def test_hybrid_official_keys_convert_back_exactly():
    tool = load_script("tools/convert_regproxy_weights.py")
    to_official = load_script("tests/modeling/test_regproxy.py", "regproxy_tests")._to_official
    model = build_model(_cfg(CONFIGS["vit_large_r50_s32_384"]))
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("pixel_")}
    official = to_official(ours)
    # the official VisionTransformerHybrid names (timm HybridEmbed under mmseg's ViT)
    for k in (
        "backbone.patch_embed.backbone.stem.conv.weight",
        "backbone.patch_embed.backbone.stages.3.blocks.2.norm3.bias",
        "backbone.patch_embed.proj.weight",
        "backbone.layers.1.attn.attn.in_proj_weight",
        "backbone.ln1.weight",
    ):
        assert k in official, k
    converted = tool.convert_state_dict(official)
    assert set(converted) == set(ours)
    for k in ours:
        assert converted[k] is ours[k], k
    assert tool.token_stride(converted) == 32
    # position embedding resampled to a 128x96 training size: 4 x 3 tokens of 32 + class token
    resized = tool.convert_state_dict(official, img_size=(128, 96))
    assert resized["backbone.model.pos_embed"].shape == (1, 1 + 4 * 3, 64)
    # the official mmseg-ResNet variant (use_origin=False) has other stem keys: refused
    bad = {**official, "backbone.patch_embed.backbone.layer1.0.conv1.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="layer1.0.conv1"):
        tool.convert_state_dict(bad)
