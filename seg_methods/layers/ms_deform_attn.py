"""Multi-scale deformable attention sampling (Deformable DETR, Zhu et al. 2021, Eq. 3).

The core of Mask2Former's pixel decoder: every query reads ``P`` bilinearly interpolated points on
each of ``L`` feature levels, per attention head, and sums them with its attention weights:

    out[n, q, m] = sum_l sum_p A[n, q, m, l, p] * V_l[n, m](phi_l(loc[n, q, m, l, p]))

where ``V_l[n, m]`` is level ``l`` of ``value`` for head ``m`` (a ``(D, H_l, W_l)`` map) and the
bilinear read at normalized ``(x, y)`` equals ``F.grid_sample(..., mode="bilinear",
padding_mode="zeros", align_corners=False)`` on the grid ``2 * loc - 1``, i.e. pixel position
``(x * W_l - 0.5, y * H_l - 0.5)`` with zeros outside the map. Projections (value, offsets,
attention logits, output) belong to the calling module, not to this op.

Shape shorthand:
    N: batch size
    S: sum_l H_l * W_l, all levels flattened row-major and concatenated
    M: attention heads
    D: channels per head
    Lq: queries
    L: feature levels
    P: sampling points per level and head

Two implementations share these semantics: the compiled op
``torch.ops.seg_methods.ms_deform_attn_{forward,backward}`` (C++ CPU and CUDA kernels in
``layers/csrc/ms_deform_attn/``) and the pure-PyTorch reference :func:`ms_deform_attn_pytorch`.
"""

from typing import List

import torch
import torch.nn.functional as F
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from seg_methods.utils.ext import ext_has_cuda, has_op

__all__ = ["ms_deform_attn", "ms_deform_attn_pytorch"]

_IMPLS = ("auto", "op", "pytorch")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _check_inputs(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> List[List[int]]:
    """Validate shapes and return the level sizes as a list of ``[H_l, W_l]``."""
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be (N, S, M, D), got {tuple(value.shape)}")
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(
            "ms_deform_attn: spatial_shapes must be (L, 2) with rows (H, W), got "
            f"{tuple(spatial_shapes.shape)}"
        )
    num_levels = spatial_shapes.shape[0]
    if level_start_index.dim() != 1 or level_start_index.shape[0] != num_levels:
        raise ValueError(
            f"ms_deform_attn: level_start_index must be (L,) with L = {num_levels}, got "
            f"{tuple(level_start_index.shape)}"
        )
    n, s, m, _ = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got "
            f"{tuple(sampling_locations.shape)}"
        )
    ln, _, lm, ll, _, _ = sampling_locations.shape
    if (ln, lm, ll) != (n, m, num_levels):
        raise ValueError(
            f"ms_deform_attn: sampling_locations {tuple(sampling_locations.shape)} does not match "
            f"(N, Lq, M, L, P, 2) with N = {n}, M = {m}, L = {num_levels}"
        )
    if attention_weights.shape != sampling_locations.shape[:5]:
        raise ValueError(
            f"ms_deform_attn: attention_weights {tuple(attention_weights.shape)} must equal "
            f"sampling_locations.shape[:5] = {tuple(sampling_locations.shape[:5])}"
        )
    shapes = [[int(h), int(w)] for h, w in spatial_shapes.tolist()]
    if any(h <= 0 or w <= 0 for h, w in shapes):
        raise ValueError(f"ms_deform_attn: every level needs H, W > 0, got {shapes}")
    total = sum(h * w for h, w in shapes)
    if total != s:
        raise ValueError(
            f"ms_deform_attn: value has S = {s} pixels but spatial_shapes {shapes} sum to {total}"
        )
    return shapes


def ms_deform_attn_pytorch(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Pure-PyTorch reference of multi-scale deformable attention sampling (``F.grid_sample``).

    Args:
        value (Tensor): (N, S, M, D) per-head values of all levels.
        spatial_shapes (Tensor): (L, 2) int64, rows (H_l, W_l).
        level_start_index (Tensor): (L,) int64; unused here (the split follows spatial_shapes),
            kept for the signature of the compiled op.
        sampling_locations (Tensor): (N, Lq, M, L, P, 2) normalized (x, y); outside [0, 1]
            reads zeros.
        attention_weights (Tensor): (N, Lq, M, L, P).

    Returns:
        Tensor: (N, Lq, M * D).
    """
    shapes = _check_inputs(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    n, _, m, d = value.shape
    _, lq, _, num_levels, p, _ = sampling_locations.shape
    if num_levels == 0 or p == 0:
        return value.new_zeros(n, lq, m * d)
    per_level = value.split([h * w for h, w in shapes], dim=1)  # L x (N, H_l*W_l, M, D)
    grids = 2 * sampling_locations - 1  # (N, Lq, M, L, P, 2) in grid_sample's [-1, 1]
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        # (N, H*W, M, D) -> (N, M, D, H*W) -> (N*M, D, H, W)
        v = per_level[lvl].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        # (N, Lq, M, P, 2) -> (N, M, Lq, P, 2) -> (N*M, Lq, P, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(n * m, lq, p, 2)
        # (N*M, D, Lq, P)
        sampled.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    sampled = torch.stack(sampled, dim=3).flatten(3)  # (N*M, D, Lq, L*P)
    # (N, Lq, M, L, P) -> (N, M, Lq, L, P) -> (N*M, 1, Lq, L*P)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, num_levels * p)
    out = (sampled * weights).sum(-1)  # (N*M, D, Lq)
    return out.view(n, m * d, lq).transpose(1, 2).contiguous()  # (N, Lq, M*D)


class _MSDeformAttnFunction(Function):
    """Autograd wrapper of the compiled op (inputs already validated, same dtype, contiguous)."""

    @staticmethod
    def forward(
        ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    ):
        ctx.save_for_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
        return torch.ops.seg_methods.ms_deform_attn_forward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = (
            ctx.saved_tensors
        )
        grad_value, grad_loc, grad_attn = torch.ops.seg_methods.ms_deform_attn_backward(
            value,
            spatial_shapes,
            level_start_index,
            sampling_locations,
            attention_weights,
            grad_output.contiguous(),
        )
        return grad_value, None, None, grad_loc, grad_attn


def _op_usable(device: torch.device) -> bool:
    if not has_op("ms_deform_attn_forward"):
        return False
    return device.type == "cpu" or (device.type == "cuda" and ext_has_cuda())


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    impl: str = "auto",
) -> torch.Tensor:
    """Multi-scale deformable attention sampling (Deformable DETR Eq. 3), differentiable.

    float16/bfloat16 inputs are computed in float32 (also under autocast) and the result is cast
    back to ``value.dtype``. ``sampling_locations`` and ``attention_weights`` are cast to the
    compute dtype.

    Args:
        value (Tensor): (N, S, M, D) per-head values of all levels, S = sum_l H_l * W_l.
        spatial_shapes (Tensor): (L, 2) integer, rows (H_l, W_l).
        level_start_index (Tensor): (L,) integer, offset of each level in S.
        sampling_locations (Tensor): (N, Lq, M, L, P, 2) normalized (x, y), (0, 0) the top-left
            corner and (1, 1) the bottom-right corner of the map; outside reads zeros.
        attention_weights (Tensor): (N, Lq, M, L, P).
        impl (str): "auto" uses the compiled op when it is built for the device of ``value``,
            else the PyTorch reference; "op" requires the compiled op; "pytorch" forces the
            reference.

    Returns:
        Tensor: (N, Lq, M * D), dtype of ``value``.
    """
    if impl not in _IMPLS:
        raise ValueError(f"ms_deform_attn: impl must be one of {_IMPLS}, got {impl!r}")
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    out_dtype = value.dtype
    compute_dtype = torch.float32 if out_dtype in _LOW_PRECISION else out_dtype
    value = value.to(compute_dtype)
    sampling_locations = sampling_locations.to(compute_dtype)
    attention_weights = attention_weights.to(compute_dtype)

    if impl == "op":
        if not has_op("ms_deform_attn_forward"):
            raise RuntimeError(
                "ms_deform_attn(impl='op'): the compiled op is not available (seg_methods._C is "
                "not built or lacks ms_deform_attn). Build it with `python setup.py build_ext "
                "--inplace`, or use impl='pytorch'."
            )
        use_op = True
    else:
        use_op = impl == "auto" and _op_usable(value.device)

    with torch.autocast(device_type=value.device.type, enabled=False):
        if use_op:
            device = value.device
            out = _MSDeformAttnFunction.apply(
                value.contiguous(),
                spatial_shapes.to(device=device, dtype=torch.int64).contiguous(),
                level_start_index.to(device=device, dtype=torch.int64).contiguous(),
                sampling_locations.contiguous(),
                attention_weights.contiguous(),
            )
        else:
            out = ms_deform_attn_pytorch(
                value, spatial_shapes, level_start_index, sampling_locations, attention_weights
            )
    return out.to(out_dtype)
