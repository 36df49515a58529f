"""Local pixel-token association of RegProxy (Zhang et al., "Semantic Segmentation by Early Region
Proxy", CVPR 2022: the "Prediction" formula Y'[u, v] = sum_{s in N_p} y(s) q_s(p) and Fig. 4b;
official head: YiF-Zhang/RegionProxy ``models/proxy_head.py``). Our copy of the paper (the
summary in shared/papers/00_*.txt) does not number that formula.

Every region token (a ViT patch token on an h x w grid) owns an rh x rw patch of output pixels
(4 x 4 for patch 16 at 1/4 resolution). Each pixel is a convex combination of the class logits of
the 3 x 3 neighbourhood of tokens around its own token, with weights given by a softmax over the 9
affinity logits the proxy head predicts for that pixel::

    out[b, :, ty * rh + py, tx * rw + px]
        = sum_{n valid} softmax_n(A[b, n, py, px, ty, tx]) * T[b, :, ty + dy_n, tx + dx_n]

i.e. the paper's y(s) are the token class logits ``T`` and q_s(p) the softmax over the
neighbourhood N_p (the 3 x 3 tokens around the pixel's own token) of the affinity ``A``.

* ``A`` (B, 9 * rh * rw, h, w): affinity logits exactly as the official 1x1 conv outputs them,
  channel ``n * rh * rw + py * rw + px`` (the official ``reshape(B, 9, rh, rw, h, w)``), so
  official weights port without reshuffling.
* Neighbour ``n = (dy + 1) * 3 + (dx + 1)``, dy, dx in {-1, 0, 1}: 3 x 3 raster order, as
  ``F.unfold(kernel_size=3, padding=1)`` enumerates it.
* Neighbours outside the token grid are set to -inf BEFORE the softmax (so they get weight 0 and
  the 9 weights of a pixel still sum to 1); a 1-row or 1-column grid masks both sides.
* ``T`` (B, C, h, w): the tokens' class LOGITS (not probabilities): the official head paints
  logits and the loss is a plain cross-entropy on the result.

Shape shorthand:
    B: batch, C: classes, (h, w): token grid, (rh, rw): region_res, pixels per token,
    H = h * rh, W = w * rw: output size.

Two implementations share these semantics: the compiled op
``torch.ops.seg_methods.token_association_{forward,backward}`` (C++ CPU and CUDA kernels in
``layers/csrc/token_association/``; the forward stores the (B, 9, H, W) softmax weights for the
backward, as many elements as the affinity, and nothing is recomputed) and the pure-PyTorch
reference :func:`token_association_pytorch` (the official head's unfold + matmul). With
``impl="auto"`` the compiled op runs when it is built for the inputs' device, the reference
otherwise.
"""

from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from seg_methods.utils.ext import ext_has_cuda, has_op

__all__ = [
    "TokenAssociation",
    "neighbour_validity",
    "token_association",
    "token_association_pytorch",
]

_IMPLS = ("auto", "op", "pytorch")
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_OPS = ("token_association_forward", "token_association_backward")


def _region_res(region_res: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """(rh, rw) from an int or a pair, both >= 1."""
    if isinstance(region_res, int):
        rh, rw = region_res, region_res
    else:
        if len(region_res) != 2:
            raise ValueError(
                f"token_association: region_res must be an int or (rh, rw), got {region_res!r}"
            )
        rh, rw = int(region_res[0]), int(region_res[1])
    if rh < 1 or rw < 1:
        raise ValueError(f"token_association: region_res must be positive, got ({rh}, {rw})")
    return rh, rw


def _check_inputs(affinity: torch.Tensor, token_logits: torch.Tensor, rh: int, rw: int) -> None:
    if token_logits.dim() != 4:
        raise ValueError(
            f"token_association: token_logits must be (B, C, h, w), got {tuple(token_logits.shape)}"
        )
    B, _, h, w = token_logits.shape
    expected = (B, 9 * rh * rw, h, w)
    if tuple(affinity.shape) != expected:
        raise ValueError(
            f"token_association: affinity must be (B, 9 * rh * rw, h, w) = {expected} for "
            f"token_logits (B, C, h, w) = {tuple(token_logits.shape)} and region_res "
            f"({rh}, {rw}), got {tuple(affinity.shape)}"
        )
    if not (affinity.is_floating_point() and token_logits.is_floating_point()):
        raise ValueError(
            "token_association: affinity and token_logits must be floating point, got "
            f"{affinity.dtype} and {token_logits.dtype}"
        )
    if affinity.device != token_logits.device:
        raise ValueError(
            f"token_association: affinity is on {affinity.device} but token_logits on "
            f"{token_logits.device}"
        )


def neighbour_validity(h: int, w: int, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """(9, h, w) bool: whether neighbour n of token (ty, tx) lies inside the h x w grid.

    Neighbour n = (dy + 1) * 3 + (dx + 1) is token (ty + dy, tx + dx) (F.unfold's order). This is
    the complement of the official head's four border assignments (top rows of the first three
    neighbours, bottom of the last three, left of n = 0, 3, 6, right of n = 2, 5, 8).
    """
    d = torch.arange(-1, 2, device=device)  # dy or dx of the 3 rows / columns of the window
    ys = torch.arange(h, device=device)[None, :] + d[:, None]  # (3, h): ty + dy
    xs = torch.arange(w, device=device)[None, :] + d[:, None]  # (3, w): tx + dx
    valid_y = (ys >= 0) & (ys < h)
    valid_x = (xs >= 0) & (xs < w)
    # (3 dy, 1, h, 1) & (1, 3 dx, 1, w) -> (3, 3, h, w) -> (9, h, w), n = (dy + 1) * 3 + (dx + 1)
    return (valid_y[:, None, :, None] & valid_x[None, :, None, :]).reshape(9, h, w)


def token_association_pytorch(
    affinity: torch.Tensor, token_logits: torch.Tensor, region_res: Union[int, Sequence[int]]
) -> torch.Tensor:
    """Pure-PyTorch reference of :func:`token_association`, the official head's formula.

    Masked softmax of the affinity over the 9 neighbours, ``F.unfold`` of the token logits to
    their 3 x 3 neighbourhoods (zero padding, weight 0 there), one batched matmul per token and a
    reshape to pixels, exactly as ``ProxyHead.forward`` (it does not modify ``affinity`` in place,
    unlike the official head). Stores the (B, 9, rh, rw, h, w) weights and the (B, C, 9, h, w)
    unfolded logits for autograd.

    Args:
        affinity (Tensor): (B, 9 * rh * rw, h, w) affinity logits.
        token_logits (Tensor): (B, C, h, w) class logits of the tokens.
        region_res (int or (int, int)): (rh, rw), output pixels per token.

    Returns:
        Tensor: (B, C, h * rh, w * rw) painted class logits.
    """
    rh, rw = _region_res(region_res)
    if not torch.jit.is_tracing():  # a trace (ONNX export) has fixed shapes
        _check_inputs(affinity, token_logits, rh, rw)
    B, C, h, w = token_logits.shape
    a = affinity.reshape(B, 9, rh, rw, h, w)
    invalid = ~neighbour_validity(h, w, affinity.device)  # (9, h, w)
    a = a.masked_fill(invalid[None, :, None, None], float("-inf"))  # borders excluded first
    weights = a.softmax(dim=1)  # (B, 9, rh, rw, h, w): softmax over the neighbours
    if token_logits.numel() > 0:
        neighbours = F.unfold(token_logits, kernel_size=3, padding=1).reshape(B, C, 9, h, w)
    else:  # F.unfold rejects empty C / h / w; any (B, C, 9, h, w) tensor of no element will do
        neighbours = token_logits.unsqueeze(2).expand(B, C, 9, h, w)
    neighbours = neighbours.permute(0, 3, 4, 2, 1)  # (B, h, w, 9, C)
    weights = weights.permute(0, 4, 5, 2, 3, 1).reshape(B, h, w, rh * rw, 9)  # (B, h, w, R, 9)
    seg = torch.matmul(weights, neighbours)  # (B, h, w, rh * rw, C)
    seg = seg.reshape(B, h, w, rh, rw, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, rh, w, rw)
    return seg.reshape(B, C, h * rh, w * rw)


class _TokenAssociationFunction(Function):
    """Autograd wrapper of the compiled op (inputs validated, one float dtype)."""

    @staticmethod
    def forward(ctx, affinity, token_logits, rh: int, rw: int):
        save = bool(ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        output, weights = torch.ops.seg_methods.token_association_forward(
            affinity, token_logits, rh, rw, save
        )
        # The (B, 9, H, W) weights replace the affinity (same number of elements); the token
        # logits are referenced, not copied.
        ctx.save_for_backward(weights, token_logits)
        ctx.region = (rh, rw)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        weights, token_logits = ctx.saved_tensors
        rh, rw = ctx.region
        grad_affinity, grad_tokens = torch.ops.seg_methods.token_association_backward(
            grad_output,
            weights,
            token_logits,
            rh,
            rw,
            [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])],
        )
        return grad_affinity, grad_tokens, None, None


def _use_op(device: torch.device, impl: str) -> bool:
    if impl not in _IMPLS:
        raise ValueError(f"token_association: impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "pytorch":
        return False
    built = all(has_op(name) for name in _OPS)
    device_ok = device.type == "cpu" or (device.type == "cuda" and ext_has_cuda())
    if impl == "op" and not (built and device_ok):
        raise RuntimeError(
            "token_association(impl='op'): the compiled op is not available for device "
            f"{device} (seg_methods._C is {'built' if built else 'not built or lacks it'}"
            f"{'' if device_ok else ', without kernels for this device'}). Build it with "
            "`python setup.py build_ext --inplace`, or use impl='auto' / 'pytorch'."
        )
    return built and device_ok


def token_association(
    affinity: torch.Tensor,
    token_logits: torch.Tensor,
    region_res: Union[int, Sequence[int]],
    impl: str = "auto",
) -> torch.Tensor:
    """Paint the tokens' class logits onto pixels with RegProxy's local association, differentiable.

    ``out[b, :, ty * rh + py, tx * rw + px] = sum_n w_n * token_logits[b, :, ty + dy_n, tx + dx_n]``
    with ``w = softmax over the valid n of affinity[b, n * rh * rw + py * rw + px, ty, tx]``
    (neighbours outside the grid excluded before the softmax; see the module docstring).

    float16 / bfloat16 inputs are computed in float32 (also under autocast) and the result is cast
    back to the promoted input dtype. Gradients flow to both inputs (compiled op: the softmax
    weights saved by the forward, no recomputation; gradients of out-of-grid logits are 0). Under
    ``torch.no_grad`` (inference, tracing) the compiled op is called directly and stores nothing,
    so ``torch.jit.trace`` records ``torch.ops.seg_methods.token_association_forward``.

    Args:
        affinity (Tensor): (B, 9 * rh * rw, h, w) affinity logits, the official 1x1 conv layout.
        token_logits (Tensor): (B, C, h, w) class logits of the region tokens.
        region_res (int or (int, int)): (rh, rw), output pixels per token (4 for patch 16 at 1/4
            resolution).
        impl (str): "auto" (compiled op when built for the device, else the reference), "op"
            (compiled op, error if unavailable) or "pytorch" (:func:`token_association_pytorch`).

    Returns:
        Tensor: (B, C, h * rh, w * rw).
    """
    rh, rw = _region_res(region_res)
    if not torch.jit.is_tracing():  # a trace has fixed shapes; the compiled op checks them too
        _check_inputs(affinity, token_logits, rh, rw)
    out_dtype = torch.promote_types(affinity.dtype, token_logits.dtype)
    compute_dtype = torch.float32 if out_dtype in _LOW_PRECISION else out_dtype
    affinity = affinity.to(compute_dtype)
    token_logits = token_logits.to(compute_dtype)
    use_op = _use_op(token_logits.device, impl)
    with torch.autocast(device_type=token_logits.device.type, enabled=False):
        if not use_op:
            out = token_association_pytorch(affinity, token_logits, (rh, rw))
        elif torch.is_grad_enabled() and (affinity.requires_grad or token_logits.requires_grad):
            out = _TokenAssociationFunction.apply(affinity, token_logits, rh, rw)
        else:
            out, _ = torch.ops.seg_methods.token_association_forward(
                affinity, token_logits, rh, rw, False
            )
    return out.to(out_dtype)


class TokenAssociation(nn.Module):
    """:func:`token_association` as a module (no parameters).

    Args:
        region_res (int or (int, int)): (rh, rw), output pixels per token.
        impl (str): "auto", "op" or "pytorch".
    """

    def __init__(self, region_res: Union[int, Sequence[int]] = 4, impl: str = "auto"):
        super().__init__()
        self.region_res = _region_res(region_res)
        if impl not in _IMPLS:
            raise ValueError(f"TokenAssociation: impl must be one of {_IMPLS}, got {impl!r}")
        self.impl = impl

    def forward(self, affinity: torch.Tensor, token_logits: torch.Tensor) -> torch.Tensor:
        """
        Args:
            affinity (Tensor): (B, 9 * rh * rw, h, w).
            token_logits (Tensor): (B, C, h, w).

        Returns:
            Tensor: (B, C, h * rh, w * rw).
        """
        return token_association(affinity, token_logits, self.region_res, self.impl)

    def extra_repr(self) -> str:
        return f"region_res={self.region_res}, impl={self.impl!r}"
