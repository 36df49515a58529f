"""Tests of the Swin backbone (seg_methods.modeling.backbone.swin).

A tiny Swin (embed 24, depths [1, 1, 2, 1], heads [1, 2, 2, 4], window 4) keeps them fast.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from detectron2.config import get_cfg
from detectron2.modeling import ShapeSpec, build_backbone

from seg_methods.config.swin import add_swin_config
from seg_methods.modeling.backbone.swin import (
    D2SwinTransformer,
    SwinTransformerBlock,
    patch_merging_gather,
    relative_position_index,
    shifted_window_attention_mask,
    window_partition,
    window_reverse,
)

TINY = dict(embed_dim=24, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], window_size=4)


def tiny_swin(**overrides):
    kwargs = dict(TINY, drop_path_rate=0.0)
    kwargs.update(overrides)
    return D2SwinTransformer(**kwargs).eval()


def randomize_(module, std=0.2):
    """Give every float parameter random values (LayerNorm included) for sharper tests."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


# ---------------------------------------------------------------------------------------------
# Official key set
# ---------------------------------------------------------------------------------------------
def official_swin_keys(embed_dim, depths, num_heads, window_size, ape=False, pretrain=224):
    """(key, shape) of the official Mask2Former D2SwinTransformer state dict, written down from
    its module structure (patch_embed, layers.i.blocks.j.*, layers.i.downsample, norm0..norm3)."""
    keys = {
        "patch_embed.proj.weight": (embed_dim, 3, 4, 4),
        "patch_embed.proj.bias": (embed_dim,),
        "patch_embed.norm.weight": (embed_dim,),
        "patch_embed.norm.bias": (embed_dim,),
    }
    if ape:
        keys["absolute_pos_embed"] = (1, embed_dim, pretrain // 4, pretrain // 4)
    m = window_size
    for i, (depth, heads) in enumerate(zip(depths, num_heads)):
        c = embed_dim * 2**i
        for j in range(depth):
            b = f"layers.{i}.blocks.{j}."
            keys.update(
                {
                    b + "norm1.weight": (c,),
                    b + "norm1.bias": (c,),
                    b + "attn.relative_position_bias_table": ((2 * m - 1) ** 2, heads),
                    b + "attn.relative_position_index": (m * m, m * m),
                    b + "attn.qkv.weight": (3 * c, c),
                    b + "attn.qkv.bias": (3 * c,),
                    b + "attn.proj.weight": (c, c),
                    b + "attn.proj.bias": (c,),
                    b + "norm2.weight": (c,),
                    b + "norm2.bias": (c,),
                    b + "mlp.fc1.weight": (4 * c, c),
                    b + "mlp.fc1.bias": (4 * c,),
                    b + "mlp.fc2.weight": (c, 4 * c),
                    b + "mlp.fc2.bias": (c,),
                }
            )
        if i < len(depths) - 1:
            keys[f"layers.{i}.downsample.reduction.weight"] = (2 * c, 4 * c)
            keys[f"layers.{i}.downsample.norm.weight"] = (4 * c,)
            keys[f"layers.{i}.downsample.norm.bias"] = (4 * c,)
        keys[f"norm{i}.weight"] = (c,)
        keys[f"norm{i}.bias"] = (c,)
    return keys


@pytest.mark.parametrize("ape", [False, True])
def test_official_key_set_loads(ape):
    model = tiny_swin(ape=ape, out_features=["res3", "res5"])
    expected = official_swin_keys(**TINY, ape=ape)
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert actual == expected
    # A state dict with exactly the official keys loads strictly, and values are taken over.
    state = {k: torch.randn(s) for k, s in expected.items()}
    for k in state:
        if k.endswith("relative_position_index"):
            state[k] = relative_position_index(4)
    result = model.load_state_dict(state, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(
        model.layers[2].blocks[1].attn.qkv.weight, state["layers.2.blocks.1.attn.qkv.weight"]
    )


def test_swin_t_defaults_parameter_count():
    # Swin-T without its classifier: 28.29M total minus head (768*1000+1000) minus final norm
    # (2*768) plus output norms norm0..norm3 (2*(96+192+384+768)) = 27,520,698.
    cfg = get_cfg()
    add_swin_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "D2SwinTransformer"
    model = build_backbone(cfg)
    assert isinstance(model, D2SwinTransformer)
    assert sum(p.numel() for p in model.parameters()) == 27_520_698
    assert model.size_divisibility == 32
    blocks = [b for layer in model.layers for b in layer.blocks]
    assert [b.shift_size for b in model.layers[2].blocks] == [0, 3, 0, 3, 0, 3]
    # Stochastic depth grows linearly from 0 to 0.3 over the 12 blocks.
    assert [round(b.drop_path.drop_prob, 6) for b in blocks] == [
        round(0.3 * i / 11, 6) for i in range(12)
    ]


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------
def test_output_shapes_odd_input():
    cfg = get_cfg()
    add_swin_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "D2SwinTransformer"
    cfg.MODEL.SWIN.EMBED_DIM = 24
    cfg.MODEL.SWIN.DEPTHS = [1, 1, 2, 1]
    cfg.MODEL.SWIN.NUM_HEADS = [1, 2, 2, 4]
    cfg.MODEL.SWIN.WINDOW_SIZE = 4
    model = build_backbone(cfg, ShapeSpec(channels=3)).eval()
    assert {k: (v.channels, v.stride) for k, v in model.output_shape().items()} == {
        "res2": (24, 4),
        "res3": (48, 8),
        "res4": (96, 16),
        "res5": (192, 32),
    }
    with torch.no_grad():
        out = model(torch.randn(2, 3, 67, 93))
    # 67x93 -> ceil(/4) = 17x24 -> ceil(/2) = 9x12 -> 5x6 -> 3x3.
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "res2": (2, 24, 17, 24),
        "res3": (2, 48, 9, 12),
        "res4": (2, 96, 5, 6),
        "res5": (2, 192, 3, 3),
    }
    assert all(torch.isfinite(v).all() for v in out.values())


def test_out_features_subset():
    model = tiny_swin(out_features=["res4"])
    assert list(model.output_shape()) == ["res4"]
    out = model(torch.randn(1, 3, 32, 32))
    assert list(out) == ["res4"] and out["res4"].shape == (1, 96, 2, 2)
    with pytest.raises(ValueError, match="res6"):
        tiny_swin(out_features=["res6"])


# ---------------------------------------------------------------------------------------------
# Hand-checkable pieces
# ---------------------------------------------------------------------------------------------
def test_window_partition_reverse_are_inverses():
    x = torch.arange(2 * 8 * 12 * 3, dtype=torch.float32).reshape(2, 8, 12, 3)
    windows = window_partition(x, 4)
    assert windows.shape == (2 * 2 * 3, 4, 4, 3)
    # Second window of the first image covers rows 0-3, columns 4-7.
    assert torch.equal(windows[1], x[0, 0:4, 4:8])
    # First window of the second image follows the 6 windows of the first.
    assert torch.equal(windows[6], x[1, 0:4, 0:4])
    assert torch.equal(window_reverse(windows, 4, 8, 12), x)
    w = torch.randn(12, 4, 4, 5)
    assert torch.equal(window_partition(window_reverse(w, 4, 8, 12), 4), w)


def test_relative_position_index_window2():
    # Tokens (0,0), (0,1), (1,0), (1,1); index = (dy + 1) * 3 + (dx + 1), dy = y_q - y_k.
    expected = torch.tensor([[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]])
    assert torch.equal(relative_position_index(2), expected)


def test_shifted_window_mask_blocks_cross_region_pairs():
    # 4x4 map, window 2, shift 1: windows (0,0), (0,1), (1,0), (1,1) of the rolled map.
    mask = shifted_window_attention_mask(4, 4, 2, 1)
    assert mask.shape == (4, 4, 4)
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    i = torch.arange(4)
    allowed = [
        torch.ones(4, 4, dtype=torch.bool),  # rows 0-1, cols 0-1: one region
        i[:, None] % 2 == i[None, :] % 2,  # cols 2 | 3 (3 wrapped): same column parity
        i[:, None] // 2 == i[None, :] // 2,  # rows 2 | 3 (3 wrapped): same row
        torch.eye(4, dtype=torch.bool),  # rows and cols split: four regions
    ]
    for w in range(4):
        assert torch.equal(mask[w] == 0, allowed[w]), w


def test_patch_merging_gather_order_and_padding():
    # x[h, w] = 10 * h + w; neighbours are stacked (0,0), (1,0), (0,1), (1,1).
    h, w = 3, 4
    x = (10 * torch.arange(h)[:, None] + torch.arange(w)[None, :]).float()[None, :, :, None]
    out = patch_merging_gather(x + 1)  # +1 so that zero padding is recognisable
    assert out.shape == (1, 2, 2, 4)
    assert out[0, 0, 1].tolist() == [3.0, 13.0, 4.0, 14.0]  # rows 0-1, cols 2-3
    assert out[0, 1, 0].tolist() == [21.0, 0.0, 22.0, 0.0]  # row 2 and a padded row


# ---------------------------------------------------------------------------------------------
# Numerical check against a naive, explicitly looped window attention
# ---------------------------------------------------------------------------------------------
def naive_block(blk, x, height, width):
    """Swin block computed token by token: per window, per head, per query, with the region
    rule written from the paper (in a shifted window, tokens attend only to tokens that did not
    wrap around differently) and the bias looked up from the displacement directly."""
    m, s = blk.window_size, blk.shift_size
    attn = blk.attn
    heads, c = attn.num_heads, x.shape[-1]
    d = c // heads
    hp, wp = math.ceil(height / m) * m, math.ceil(width / m) * m
    y = F.layer_norm(x, (c,), blk.norm1.weight, blk.norm1.bias).reshape(-1, height, width, c)
    grid = torch.zeros(y.shape[0], hp, wp, c, dtype=x.dtype)
    grid[:, :height, :width] = y
    out = torch.zeros_like(grid)
    wq, bq = attn.qkv.weight, attn.qkv.bias
    table = attn.relative_position_bias_table
    for b in range(grid.shape[0]):
        for wr in range(hp // m):
            for wc in range(wp // m):
                # Rolled-frame coordinates of the window and their original positions.
                coords = [(wr * m + i, wc * m + j) for i in range(m) for j in range(m)]
                orig = [((r + s) % hp, (q + s) % wp) for r, q in coords]
                wrapped = [
                    (r >= hp - s if s else False, q >= wp - s if s else False) for r, q in coords
                ]
                feats = torch.stack([grid[b, r, q] for r, q in orig])  # (L, C)
                qkv = feats @ wq.T + bq
                heads_out = []
                for h in range(heads):
                    qh = qkv[:, h * d : (h + 1) * d] * attn.scale
                    kh = qkv[:, c + h * d : c + (h + 1) * d]
                    vh = qkv[:, 2 * c + h * d : 2 * c + (h + 1) * d]
                    rows = []
                    for i, (ri, ci) in enumerate(coords):
                        logits, vals = [], []
                        for j, (rj, cj) in enumerate(coords):
                            if wrapped[i] != wrapped[j]:
                                continue  # blocked pair
                            idx = (ri - rj + m - 1) * (2 * m - 1) + (ci - cj + m - 1)
                            logits.append(qh[i] @ kh[j] + table[idx, h])
                            vals.append(vh[j])
                        p = torch.softmax(torch.stack(logits), 0)
                        rows.append((p[:, None] * torch.stack(vals)).sum(0))
                    heads_out.append(torch.stack(rows))
                res = torch.cat(heads_out, dim=1) @ attn.proj.weight.T + attn.proj.bias
                for (r, q), val in zip(orig, res):
                    out[b, r, q] = val
    z = x + out[:, :height, :width].reshape(x.shape)
    hdn = F.gelu(
        F.layer_norm(z, (c,), blk.norm2.weight, blk.norm2.bias) @ blk.mlp.fc1.weight.T
        + blk.mlp.fc1.bias
    )
    return z + hdn @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias


@pytest.mark.parametrize("shift", [0, 1])
def test_block_matches_naive_attention(shift):
    blk = SwinTransformerBlock(dim=8, num_heads=2, window_size=3, shift_size=shift, mlp_ratio=2.0)
    blk = randomize_(blk.double().eval(), std=0.5)
    height, width = 5, 7  # padded to 6 x 9: padding and several windows per axis
    x = torch.randn(2, height * width, 8, dtype=torch.float64)
    mask = shifted_window_attention_mask(6, 9, 3, 1).double() if shift else None
    with torch.no_grad():
        ours = blk(x, height, width, mask)
        ref = naive_block(blk, x, height, width)
    # The -100 logit of blocked pairs leaves weights of ~exp(-100), far below this tolerance.
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)


def test_backbone_stage_wiring_against_naive():
    """Whole tiny backbone: patch embedding, naive blocks, merging order, norm{i} outputs."""
    model = randomize_(tiny_swin().double(), std=0.2)
    x = torch.randn(1, 3, 27, 37, dtype=torch.float64)
    with torch.no_grad():
        ours = model(x)
        feat = F.conv2d(
            F.pad(x, (0, 3, 0, 1)),
            model.patch_embed.proj.weight,
            model.patch_embed.proj.bias,
            stride=4,
        )
        feat = F.layer_norm(
            feat.permute(0, 2, 3, 1),
            (24,),
            model.patch_embed.norm.weight,
            model.patch_embed.norm.bias,
        )
        h, w = feat.shape[1:3]
        tokens = feat.reshape(1, h * w, 24)
        for i, stage in enumerate(model.layers):
            for blk in stage.blocks:
                tokens = naive_block(blk, tokens, h, w)
            c = tokens.shape[-1]
            norm = getattr(model, f"norm{i}")
            expected = (
                F.layer_norm(tokens, (c,), norm.weight, norm.bias)
                .reshape(1, h, w, c)
                .permute(0, 3, 1, 2)
            )
            torch.testing.assert_close(ours[f"res{i + 2}"], expected, rtol=0, atol=1e-9)
            if stage.downsample is not None:
                grid = F.pad(tokens.reshape(1, h, w, c), (0, 0, 0, w % 2, 0, h % 2))
                cat = torch.cat(
                    [
                        grid[:, 0::2, 0::2],
                        grid[:, 1::2, 0::2],
                        grid[:, 0::2, 1::2],
                        grid[:, 1::2, 1::2],
                    ],
                    -1,
                )
                ds = stage.downsample
                cat = (
                    F.layer_norm(cat, (4 * c,), ds.norm.weight, ds.norm.bias)
                    @ ds.reduction.weight.T
                )
                h, w = cat.shape[1:3]
                tokens = cat.reshape(1, h * w, 2 * c)


def test_activation_checkpointing_same_output_and_grad():
    torch.manual_seed(1)
    a = tiny_swin()
    b = tiny_swin(use_checkpoint=True)
    b.load_state_dict(a.state_dict())
    a.train()
    b.train()
    x = torch.randn(1, 3, 20, 28)
    out_a = sum(v.sum() for v in a(x).values())
    out_b = sum(v.sum() for v in b(x).values())
    torch.testing.assert_close(out_a, out_b)
    out_a.backward()
    out_b.backward()
    torch.testing.assert_close(a.patch_embed.proj.weight.grad, b.patch_embed.proj.weight.grad)


def test_drop_path_train_vs_eval():
    model = tiny_swin(drop_path_rate=0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        e1, e2 = model(x)["res5"], model(x)["res5"]
        model.train()
        torch.manual_seed(3)
        t1 = model(x)["res5"]
        torch.manual_seed(4)
        t2 = model(x)["res5"]
    assert torch.equal(e1, e2)  # deterministic in eval
    assert not torch.allclose(t1, t2)  # stochastic depth active in training
