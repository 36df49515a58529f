"""RegProxy: the timm ViT token backbone, the region-proxy head and the meta-architecture.

The end-to-end path (training, all-void image, inference, DefaultPredictor, checkpoint, export) is
covered by tests/modeling/test_model_e2e.py with configs/quick_schedules/regproxy_*.yaml.
"""

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model

from seg_methods.config import get_cfg
from seg_methods.modeling.backbone.timm_vit import TimmViTBackbone
from seg_methods.modeling.meta_arch.regproxy import RegionProxyHead
from seg_methods.solver.build import get_seg_optimizer_params
from repo_scripts import load_script

QUICK = "configs/quick_schedules/regproxy_synthetic_semantic_instant_test.yaml"


TORCH_THREADS = 1  # one intra-op thread for this module (tests/conftest.py)


def _tiny_vit(indices, names, pos_embed_antialias=False, **extra):
    args = {"img_size": 32, "depth": 3, "embed_dim": 32, "num_heads": 2, **extra}
    return TimmViTBackbone(
        name="vit_tiny_patch16_224",
        out_indices=indices,
        out_features=names,
        extra_args=args,
        pos_embed_antialias=pos_embed_antialias,
    ).eval()


def test_backbone_layers_follow_mmseg_out_indices():
    torch.manual_seed(0)
    # timm's own (antialiased) position-embedding resampling, to compare with timm's functions
    bb = _tiny_vit([-1, 0, 2], ["emb", "b0", "last"], pos_embed_antialias=True)
    x = torch.randn(2, 3, 48, 80)
    out = bb(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "emb": (2, 32, 3, 5),
        "b0": (2, 32, 3, 5),
        "last": (2, 32, 3, 5),
    }
    m = bb.model
    # the last index is the final, LayerNorm-ed output (mmseg final_norm), patch tokens only
    final = m.forward_features(x)[:, m.num_prefix_tokens :]
    torch.testing.assert_close(out["last"].flatten(2).transpose(1, 2), final)
    # a middle index is the block output without norm
    _, inter = m.forward_intermediates(x, indices=[0], norm=False)
    torch.testing.assert_close(out["b0"], inter[0])
    # -1: embedding + position embedding, before any block
    tok = m._pos_embed(m.patch_embed(x))[:, m.num_prefix_tokens :]
    torch.testing.assert_close(out["emb"].flatten(2).transpose(1, 2), tok)
    assert bb.size_divisibility == 16
    assert bb.output_shape()["b0"] == ShapeSpec(channels=32, stride=16)


@pytest.mark.parametrize("distilled", [False, True])
def test_backbone_resamples_pos_embed_as_mmseg(distilled):
    """Default resampling = mmseg's ``resize_pos_embed`` (bicubic, align_corners=False, no
    antialiasing; class / distillation entries kept), written out here; timm's differs."""
    torch.manual_seed(0)
    name = "deit_tiny_distilled_patch16_224" if distilled else "vit_tiny_patch16_224"
    args = {"img_size": 64, "depth": 1, "embed_dim": 32, "num_heads": 2}
    bb = TimmViTBackbone(name=name, out_indices=[-1], out_features=["emb"], extra_args=args)
    m = bb.model.eval()
    with torch.no_grad():
        m.pos_embed.normal_()
    prefix = 2 if distilled else 1
    for size in [(48, 80), (96, 32)]:  # 3x5 (shrink + grow) and 6x2 tokens from a 4x4 grid
        x = torch.randn(1, 3, *size)
        grid = (size[0] // 16, size[1] // 16)
        pos = m.pos_embed[:, prefix:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=grid, mode="bicubic", align_corners=False)
        expected = m.patch_embed.proj(x).flatten(2) + pos.flatten(2)  # (1, D, h * w)
        out = bb(x)["emb"].flatten(2)
        torch.testing.assert_close(out, expected)
        bb.pos_embed_antialias = True
        assert (bb(x)["emb"].flatten(2) - expected).abs().max() > 1e-3
        bb.pos_embed_antialias = False
    assert m.num_prefix_tokens == prefix


def test_backbone_errors_name_the_config_keys():
    with pytest.raises(ValueError, match="OUT_INDICES"):
        _tiny_vit([0, 5], ["a", "b"])  # 3 blocks
    with pytest.raises(ValueError, match="OUT_FEATURES"):
        _tiny_vit([0], ["a", "b"])
    with pytest.raises(ValueError, match="MODEL.TIMM.NAME"):
        TimmViTBackbone(name="resnet18", out_indices=[0], out_features=["a"])
    with pytest.raises(ValueError, match="patch size"):
        _tiny_vit([0], ["a"])(torch.randn(1, 3, 20, 32))


def _head(num_classes=3, region_res=(2, 3), d=8):
    shape = {"mid": ShapeSpec(channels=d, stride=16), "last": ShapeSpec(channels=d, stride=16)}
    return RegionProxyHead(
        assoc_feature="mid",
        cls_feature="last",
        assoc_channels=shape["mid"].channels,
        cls_channels=shape["last"].channels,
        channels=d,
        num_classes=num_classes,
        region_res=region_res,
        norm="",
        impl="pytorch",
    ).eval()


def _official_forward(head, mid, last):
    """The official ProxyHead.forward, written independently: (B, 9, rh, rw, h, w) affinity with
    -inf borders, softmax over the 9, unfold of the token logits, per-pixel weighted sum."""
    rh, rw = head.region_res
    b, _, h, w = last.shape
    aff = head.affinity(mid).reshape(b, 9, rh, rw, h, w).clone()
    aff[:, :3, :, :, 0, :] = float("-inf")
    aff[:, -3:, :, :, -1, :] = float("-inf")
    aff[:, ::3, :, :, :, 0] = float("-inf")
    aff[:, 2::3, :, :, :, -1] = float("-inf")
    aff = aff.softmax(dim=1)
    tok = head.classifier(last.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    c = tok.shape[1]
    unf = F.unfold(tok, kernel_size=3, padding=1).reshape(b, c, 9, h, w)
    out = torch.einsum("bnyxhw,bcnhw->bchywx", aff, unf)  # (B, C, h, rh, w, rw)
    return out.reshape(b, c, h * rh, w * rw)


@pytest.mark.parametrize("hw", [(1, 1), (1, 4), (3, 2), (4, 5)])
def test_head_equals_the_official_formula(hw):
    torch.manual_seed(1)
    head = _head()
    mid, last = torch.randn(2, 8, *hw), torch.randn(2, 8, *hw)
    ours = head.layers({"mid": mid, "last": last})
    assert ours.shape == (2, 3, hw[0] * 2, hw[1] * 3)
    torch.testing.assert_close(ours, _official_forward(head, mid, last))


def test_head_paints_the_chosen_neighbour_and_renormalises_at_borders():
    """Predictor bias picks one neighbour per output pixel; token logits are hand-set."""
    head = _head(num_classes=1, region_res=(1, 1), d=4)
    with torch.no_grad():
        head.predictor.weight.zero_()
        head.predictor.bias.fill_(0.0)
        head.predictor.bias[5] = 50.0  # n = 5: the right neighbour (dy 0, dx +1)
        head.classifier.weight.zero_()
        head.classifier.weight[0, 0] = 1.0  # class logit = channel 0 of the last tokens
        head.classifier.bias.zero_()
    last = torch.zeros(1, 4, 2, 2)
    last[0, 0] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = head.layers({"mid": torch.zeros(1, 4, 2, 2), "last": last})[0, 0]
    # left column takes its right neighbour; the right column has none, so the softmax runs over
    # its 4 valid neighbours (itself, left, up/down, diagonal) with equal weights
    assert out[0, 0].item() == pytest.approx(2.0)
    assert out[1, 0].item() == pytest.approx(4.0)
    assert out[0, 1].item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert out[1, 1].item() == pytest.approx((1 + 2 + 3 + 4) / 4)


def _cfg(*opts):
    cfg = get_cfg()
    cfg.merge_from_file(QUICK)
    cfg.merge_from_list(list(opts))
    return cfg


def test_config_errors_name_the_keys():
    with pytest.raises(ValueError, match="SEM_SEG_HEAD.NAME"):
        build_model(_cfg("MODEL.SEM_SEG_HEAD.NAME", "DeepLabV3PlusHead"))
    with pytest.raises(ValueError, match="MODEL.REGPROXY.ASSOC_FEATURE"):
        build_model(_cfg("MODEL.REGPROXY.ASSOC_FEATURE", "res4"))
    with pytest.raises(ValueError, match="ASSOCIATION_IMPL"):
        build_model(_cfg("MODEL.REGPROXY.ASSOCIATION_IMPL", "cuda"))


def test_image_smaller_than_one_patch_is_padded():
    model = build_model(_cfg()).eval()
    with torch.no_grad():
        out = model([{"image": torch.randint(0, 255, (3, 10, 7), dtype=torch.uint8)}])[0]
    assert out["sem_seg"].shape == (8, 10, 7)
    assert torch.isfinite(out["sem_seg"]).all()


def test_no_weight_decay_on_position_embedding_tokens_and_norms():
    model = build_model(_cfg())
    groups = get_seg_optimizer_params(
        model, base_lr=1e-4, weight_decay=0.01, weight_decay_norm=0.0, weight_decay_embed=0.0
    )
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert decay[id(names["backbone.model.pos_embed"])] == 0.0
    assert decay[id(names["backbone.model.cls_token"])] == 0.0
    assert decay[id(names["backbone.model.blocks.0.norm1.weight"])] == 0.0
    assert decay[id(names["backbone.model.blocks.0.attn.qkv.weight"])] == 0.01
    assert decay[id(names["sem_seg_head.classifier.weight"])] == 0.01


def _load_tool(name):
    return load_script(f"tools/{name}.py")


def _to_official(ours):
    """Our names -> the official mmseg names: the official utils/checkpoint.py::convert_vit rules
    (timm -> mmseg), applied to our ``backbone.model.*``, plus the ProxyHead's module names. A
    hybrid (official ``VisionTransformerHybrid``) keeps timm's ``HybridEmbed`` as its
    ``patch_embed``: ResNetV2 stem and 1x1 ``proj`` under timm's names."""
    hybrid = any(k.startswith("backbone.model.patch_embed.backbone.") for k in ours)
    head = {
        "depthwise.weight": "affinity_head.0.depthwise_conv.conv.weight",
        "pointwise.weight": "affinity_head.0.pointwise_conv.conv.weight",
        "predictor.weight": "affinity_head.1.conv.weight",
        "predictor.bias": "affinity_head.1.conv.bias",
        "classifier.weight": "mlp.0.0.weight",
        "classifier.bias": "mlp.0.0.bias",
    }
    out = {}
    for k, v in ours.items():
        if k.startswith("backbone.model."):
            k = k[len("backbone.model.") :]
            if k.startswith("norm"):
                k = k.replace("norm.", "ln1.")
            elif k.startswith("patch_embed") and not hybrid:
                k = k.replace("proj", "projection")
            elif k.startswith("blocks"):
                if "norm" in k:
                    k = k.replace("norm", "ln")
                elif "mlp.fc1" in k:
                    k = k.replace("mlp.fc1", "ffn.layers.0.0")
                elif "mlp.fc2" in k:
                    k = k.replace("mlp.fc2", "ffn.layers.1")
                elif "attn.qkv" in k:
                    k = k.replace("attn.qkv.", "attn.attn.in_proj_")
                elif "attn.proj" in k:
                    k = k.replace("attn.proj", "attn.attn.out_proj")
                k = k.replace("blocks.", "layers.")
            out["backbone." + k] = v
        else:
            k = k[len("sem_seg_head.") :]
            for ours_norm, theirs in (("depthwise.norm.", "depthwise_conv.bn."),
                                      ("pointwise.norm.", "pointwise_conv.bn.")):  # fmt: skip
                if k.startswith(ours_norm):
                    k = "affinity_head.0." + theirs + k[len(ours_norm) :]
            out["decode_head." + head.get(k, k)] = v
    return out


def test_official_checkpoint_keys_convert_back_exactly():
    tool = _load_tool("convert_regproxy_weights")
    model = build_model(_cfg())
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("pixel_")}
    official = {"module." + k: v for k, v in _to_official(ours).items()}
    assert "decode_head.affinity_head.0.depthwise_conv.bn.running_mean" in _to_official(ours)
    converted = tool.convert_state_dict(official)
    assert set(converted) == set(ours)
    for k in ours:
        assert converted[k] is ours[k] or torch.equal(converted[k], ours[k]), k
    model.load_state_dict(converted, strict=False)  # pixel_mean/std are config values
    with pytest.raises(ValueError, match="not part of"):
        tool.convert_state_dict({**official, "decode_head.conv_seg.weight": torch.zeros(1)})
    # position embedding resampled to a 128x96 training size: 8 x 6 tokens + the class token
    resized = tool.convert_state_dict(official, img_size=(128, 96))
    assert resized["backbone.model.pos_embed"].shape == (1, 1 + 8 * 6, 64)
    torch.testing.assert_close(
        resized["backbone.model.pos_embed"][:, :1], ours["backbone.model.pos_embed"][:, :1]
    )
