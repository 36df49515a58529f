"""Shared multi-scale plumbing: c2 convolutions, per-level input projections, level embeddings."""

import math

import pytest
import torch
from torch import nn

from seg_methods.layers.multi_scale import c2_conv, level_input_projections, project_levels
from seg_methods.layers.position_encoding import PositionEmbeddingSine


def test_c2_conv_bias_only_without_norm_and_same_padding():
    plain = c2_conv(3, 4, 1)
    assert sorted(n for n, _ in plain.named_parameters()) == ["bias", "weight"]
    assert not plain.bias.detach().any()  # c2_xavier_fill zeroes the bias
    normed = c2_conv(3, 4, 3, norm="BN")
    assert sorted(n for n, _ in normed.named_parameters()) == ["norm.bias", "norm.weight", "weight"]
    assert normed(torch.randn(2, 3, 5, 7)).shape == (2, 4, 5, 7)


def test_level_input_projections_identity_when_channels_match():
    same = level_input_projections(8, 8, 3)
    assert all(isinstance(p, nn.Sequential) and len(p) == 0 for p in same)
    assert sum(p.numel() for p in same.parameters()) == 0
    enforced = level_input_projections(8, 8, 2, enforce=True)
    assert [n for n, _ in enforced.named_parameters()] == [
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
    ]
    other = level_input_projections(6, 8, 1)
    assert other[0].weight.shape == (8, 6, 1, 1)


def test_project_levels_adds_the_level_embedding_of_each_level():
    torch.manual_seed(0)
    pe = PositionEmbeddingSine(2, normalize=True)
    proj = level_input_projections(3, 4, 2)
    feats = [torch.randn(2, 3, 2, 3), torch.randn(2, 3, 4, 5)]
    embed = torch.arange(8.0).view(2, 4)
    src, pos = project_levels(feats, proj, pe, embed)
    plain, pos2 = project_levels(feats, proj, pe)
    for lvl in range(2):
        assert src[lvl].shape == (2, 4) + feats[lvl].shape[-2:]
        want = plain[lvl] + embed[lvl].view(1, 4, 1, 1)
        assert torch.equal(src[lvl], want)
        assert torch.equal(pos[lvl], pe(feats[lvl])) and torch.equal(pos[lvl], pos2[lvl])
    with pytest.raises(ValueError, match="2 feature levels for 3 input projections"):
        project_levels(feats, level_input_projections(3, 4, 3), pe)


def test_sine_encoding_offset_is_mmdets_coordinate_shift():
    """offset o: coordinate (i + o) / (n + eps) * 2 pi for 1-based i (mmdet's
    SinePositionalEncoding); 0 is DETR's encoding; a non-zero offset needs normalize."""
    h, w, f = 3, 4, 4
    x = torch.zeros(1, 1, h, w)
    plain = PositionEmbeddingSine(f, normalize=True)(x)
    shifted = PositionEmbeddingSine(f, normalize=True, offset=-0.5)(x)
    assert not torch.allclose(plain, shifted)
    # channel 0 of the y half is sin(t / T^0) = sin(t), channel 1 cos(t); the x half follows
    ty = (torch.arange(1, h + 1, dtype=torch.float32) - 0.5) / (h + 1e-6) * 2 * math.pi
    tx = (torch.arange(1, w + 1, dtype=torch.float32) - 0.5) / (w + 1e-6) * 2 * math.pi
    assert torch.allclose(shifted[0, 0, :, 0], ty.sin(), atol=1e-6)
    assert torch.allclose(shifted[0, 1, :, 0], ty.cos(), atol=1e-6)
    assert torch.allclose(shifted[0, f, 0, :], tx.sin(), atol=1e-6)
    ty0 = torch.arange(1, h + 1, dtype=torch.float32) / (h + 1e-6) * 2 * math.pi
    assert torch.allclose(plain[0, 0, :, 0], ty0.sin(), atol=1e-6)
    with pytest.raises(ValueError, match="offset"):
        PositionEmbeddingSine(f, offset=-0.5)
