"""Tests for seg_methods.layers.axial (Axial-DeepLab position-sensitive axial attention)."""

import pytest
import torch

from seg_methods.layers.axial import (
    AxialAttention,
    AxialAttention2D,
    AxialBlock,
    BottleneckResidual,
    ConvBottleneck,
    relative_offset_index,
)


def _identity_attention(channels, axis, span=65, positional=True):
    """Single head, q = k = v = x (identity projections), no norm."""
    layer = AxialAttention(
        channels,
        channels,
        axis=axis,
        num_heads=1,
        span=span,
        qk_channels=channels,
        norm="",
        positional=positional,
    ).double()
    eye = torch.eye(channels, dtype=torch.float64)
    with torch.no_grad():
        layer.qkv.weight.copy_(torch.cat([eye, eye, eye], 0)[:, :, None])
        if positional:
            layer.relative_q.zero_()
            layer.relative_k.zero_()
            layer.relative_v.zero_()
    return layer


def _naive_row_attention(x, scale):
    # x: (N, C, H, W); softmax attention among the pixels of each row, computed pixel by pixel.
    n, c, h, w = x.shape
    out = torch.zeros_like(x)
    for b in range(n):
        for i in range(h):
            for o in range(w):
                logits = torch.tensor(
                    [float(x[b, :, i, o] @ x[b, :, i, p]) * scale for p in range(w)]
                )
                weights = torch.softmax(logits.double(), 0)
                out[b, :, i, o] = sum(weights[p] * x[b, :, i, p] for p in range(w))
    return out


def test_relative_offset_index():
    idx = relative_offset_index(3, span=5)
    # entry [o, p] = p - o + 4
    assert idx.tolist() == [[4, 5, 6], [3, 4, 5], [2, 3, 4]]
    clipped = relative_offset_index(4, span=2)
    assert clipped.tolist() == [[1, 2, 2, 2], [0, 1, 2, 2], [0, 0, 1, 2], [0, 0, 0, 1]]


@pytest.mark.parametrize("positional", [True, False])
def test_width_attention_equals_naive_row_softmax(positional):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)  # odd width
    layer = _identity_attention(3, "width", positional=positional)
    expected = _naive_row_attention(x, scale=3**-0.5)
    torch.testing.assert_close(layer(x), expected)


def test_height_attention_equals_naive_column_softmax():
    torch.manual_seed(1)
    x = torch.randn(1, 2, 5, 3, dtype=torch.float64)
    layer = _identity_attention(2, "height")
    expected = _naive_row_attention(x.transpose(2, 3), scale=2**-0.5).transpose(2, 3)
    torch.testing.assert_close(layer(x), expected)


def test_value_positional_term_by_hand():
    # q = k = 0 -> uniform attention over the keys within the span;
    # output_o = mean_{|p - o| < m} (v_p + r^v_{p-o}).
    layer = _identity_attention(1, "width", span=2)
    with torch.no_grad():
        layer.qkv.weight.copy_(torch.tensor([[[0.0]], [[0.0]], [[1.0]]], dtype=torch.float64))
        # table entries for offsets -1, 0, +1
        layer.relative_v.copy_(torch.tensor([[10.0, 20.0, 30.0]], dtype=torch.float64))
    x = torch.tensor([[[[1.0, 2.0, 3.0]]]], dtype=torch.float64)  # (1, 1, 1, 3)
    # o = 0: keys p = 0, 1 (p = 2 is 2 away, masked): ((1 + 20) + (2 + 30)) / 2 = 26.5
    # o = 1: keys 0, 1, 2: ((1 + 10) + (2 + 20) + (3 + 30)) / 3 = 22
    # o = 2: keys 1, 2: ((2 + 10) + (3 + 20)) / 2 = 17.5
    expected = torch.tensor([26.5, 22.0, 17.5], dtype=torch.float64)
    torch.testing.assert_close(layer(x)[0, 0, 0], expected)


def test_span_masks_distant_keys():
    # span 1: each position only sees itself -> output = v_o + r^v_0.
    layer = _identity_attention(2, "height", span=1)
    with torch.no_grad():
        layer.relative_v.fill_(0.5)
    x = torch.randn(1, 2, 7, 2, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x + 0.5)


def test_positional_qk_terms_by_hand():
    # Single channel, q = x, k = 0, r^q nonzero: logits_op = q_o * r^q_{p-o} * scale(=1).
    layer = _identity_attention(1, "width", span=2)
    with torch.no_grad():
        layer.qkv.weight.copy_(torch.tensor([[[1.0]], [[0.0]], [[1.0]]], dtype=torch.float64))
        layer.relative_q.copy_(torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64))  # +1 offset
    x = torch.tensor([[[[2.0, 0.0]]]], dtype=torch.float64)
    # o = 0: logits p=0 -> q0*r(0)=0, p=1 -> q0*r(+1) = 2 -> weights softmax([0, 2])
    w = torch.softmax(torch.tensor([0.0, 2.0], dtype=torch.float64), 0)
    out0 = w[0] * 2.0 + w[1] * 0.0
    # o = 1: q1 = 0 -> uniform -> mean(v) = 1
    torch.testing.assert_close(layer(x)[0, 0, 0], torch.stack([out0, torch.ones_like(out0)]))


@pytest.mark.parametrize("size", [(7, 5), (1, 9), (6, 6)])
def test_shapes_odd_sizes_and_stride(size):
    torch.manual_seed(0)
    h, w = size
    x = torch.randn(2, 16, h, w)
    layer = AxialAttention2D(16, 32, num_heads=4, span=4, stride=2)
    assert layer(x).shape == (2, 32, (h + 1) // 2, (w + 1) // 2)
    block = AxialBlock(16, 32, num_heads=2, span=5, stride=2, drop_path=0.1)
    assert block(x).shape == (2, 32, (h + 1) // 2, (w + 1) // 2)
    block = AxialBlock(16, 16, num_heads=2, span=5).eval()
    assert block(x).shape == x.shape


def test_block_zero_init_is_identity_then_activation():
    torch.manual_seed(0)
    block = AxialBlock(8, 8, num_heads=2, span=3, activation="relu").eval()
    x = torch.randn(1, 8, 3, 5)
    torch.testing.assert_close(block(x), torch.relu(x))
    # the residual branch is trainable: gradients reach the attention projections
    block.train()
    nn_weight = block.conv3.norm.weight
    with torch.no_grad():
        nn_weight.fill_(1.0)
    block(x).sum().backward()
    assert block.attention.height_attention.qkv.weight.grad.abs().sum() > 0


def test_gradcheck_float64():
    torch.manual_seed(0)
    layer = AxialAttention(2, 2, axis="width", num_heads=1, span=2, norm="").double()
    x = torch.randn(1, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_bad_arguments():
    with pytest.raises(ValueError, match="axis"):
        AxialAttention(4, 4, axis="depth")
    with pytest.raises(ValueError, match="divisible"):
        AxialAttention(4, 6, num_heads=4)
    with pytest.raises(ValueError, match="norm"):
        AxialAttention(4, 8, num_heads=2, norm="GN")


def test_conv_bottleneck_shares_the_residual_plumbing():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 7, 5)
    # ResNet shortcut: strided 1x1 conv + norm; fresh block = act(shortcut(x)) (zero-init)
    block = ConvBottleneck(8, 16, stride=2, activation="relu").eval()
    assert isinstance(block, BottleneckResidual) and block.conv2.stride == (2, 2)
    assert block.shortcut.stride == (2, 2)
    torch.testing.assert_close(block(x), torch.relu(block.shortcut(x)))
    assert block(x).shape == (2, 16, 4, 3)
    # the residual branch is live once the last norm's scale is non-zero
    with torch.no_grad():
        block.conv3.norm.weight.fill_(1.0)
    assert (block(x) - torch.relu(block.shortcut(x))).abs().max() > 1e-3
    # identity shortcut when shapes match
    assert isinstance(ConvBottleneck(8, 8).shortcut, torch.nn.Identity)


def test_axial_block_keeps_its_parameter_names():
    # the pooled shortcut (Axial-DeepLab) and the attention keep their checkpoint names
    block = AxialBlock(8, 16, num_heads=2, span=3, stride=2)
    keys = set(block.state_dict())
    assert {"conv1.weight", "conv3.norm.weight", "shortcut.1.weight", "shortcut.1.norm.weight",
            "attention.height_attention.qkv.weight"} <= keys  # fmt: skip
    assert isinstance(block.shortcut[0], torch.nn.AvgPool2d)
