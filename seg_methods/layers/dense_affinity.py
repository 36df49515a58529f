"""Low-rank dense affinity apply of "Unifying Training and Inference for Panoptic Segmentation"
(Li, Qi, Torr, CVPR 2020), Sec. 3.4.2, Eq. 3-4::

    P = Psi + phi0(Q) (phi1(Q)^T Psi)                                         (Eq. 4)

The pairwise instance affinity ``A = phi0(Q) phi1(Q)^T`` is an (HW x HW) matrix (15.7 GB in single
precision for an 800 x 1300 image at stride 4, Sec. 3.4.2: 65,000^2 x 4 bytes = 15.7 GiB), so the
product is evaluated right to left (Eq. 3, ``(Q Q^T) Psi = Q (Q^T Psi)``): first the small
``K = phi1(Q)^T Psi`` (C x N), then ``phi0(Q) K`` (HW x N), then the residual add.

Exactly what the paper specifies, and nothing more: there is no 1/HW normalisation and no
softmax over the pixels (unlike the efficient attention of its reference [23]). ``phi0`` and
``phi1`` are "each a 1 x 1 convolution followed by an activation" (the activation is not named);
this op takes their outputs, so the convolutions and the activation belong to the head. ``scale``
(default 1, i.e. the paper) multiplies the affinity term for callers that want one.

Layout (channel-first, as detectron2 feature maps; the paper writes the transposes, with Psi of
shape (HW, N) and phi(Q) of shape (HW, C))::

    psi   (N, H, W) or (N, HW)     dynamic potential Psi, N = D + N_st channels (Eq. 1-2)
    phi0  (C, H, W) or (C, HW)     phi0(Q), C = 128 in the paper
    phi1  (C, H, W) or (C, HW)     phi1(Q)
    P     shape of psi             P[n] = psi[n] + scale * sum_c K[c, n] phi0[c],
                                   K[c, n] = sum_p phi1[c, p] psi[n, p]

Implementations (``impl``):

* ``"ext"``: the compiled op ``torch.ops.seg_methods.dense_affinity_{forward,backward}``
  (csrc/dense_affinity/). It stores only the (C, N) matrix ``scale * K`` for backward, writes P
  with the residual fused into the GEMM (``addmm``, beta = 1), computes the gradient of ``psi``
  the same way (``G + dK^T phi1``), and handles a padded batch with per-image channel counts
  through views (the padded channels are never read or copied). Its memory besides the inputs is
  the output (forward) and the requested gradients (backward), plus O(C * N): linear in HW, with
  nothing of size HW x HW or (HW, N) beyond the outputs. Two backends for the pixel-sized
  products: ``"gemm"`` (ATen GEMMs: MKL / cuBLAS; the default) and ``"direct"`` (hand-written CPU
  and CUDA kernels whose per-element math is shared in ``dense_affinity_utils.h``).
* ``"pytorch"``: :func:`dense_affinity_apply_pytorch`, the same factored form in plain PyTorch
  autograd (also linear in HW, but with an extra (N, HW) temporary in forward and backward, and a
  masked copy of a padded batch), or with ``naive=True`` the (HW x HW) form, for tests on tiny
  shapes only.
* ``"auto"`` (default): ``"ext"`` when the compiled op is built for the inputs' device, else
  ``"pytorch"`` (the fallback sits outside the autograd Function).

Half precision: the GEMM backend runs in the input dtype (float16 / bfloat16 included), so no
float32 copy of the embeddings is made (at 4 megapixels and C = 128 each would take 2 GB); the
``"direct"`` backend takes float32 / float64 only.

Is a custom kernel worth it? The factored form is two GEMMs forward and four backward; ATen
already runs them well and fuses the residual add (``addmm``, beta = 1). Measured on this
machine's CPU (``benchmarks/dense_affinity.py``, 1 thread, N = 50, C = 128, float32): the
hand-written ``"direct"`` kernel is 2.0-2.8x slower than MKL's GEMMs (forward + backward at
64^2, 128^2 and 512^2 pixels) for the same memory, so the compiled op uses ATen GEMMs by default.
Its gain over the plain-PyTorch factored form is memory, not arithmetic (times within 0.97-1.39x
of each other): the forward peak is the output alone (191 MB per megapixel, against 381 MB for
the factored form, which makes an (N, HW) temporary), forward + backward needs exactly the
output and the three gradients, and a padded batch is not copied. Tiling over the pixels would
not lower the peak: the only pixel-sized tensors besides the inputs are the outputs themselves,
which must exist in full. The CUDA kernel of the ``"direct"`` backend is compiled but was not run
(no GPU here).
"""

from typing import List, Optional, Sequence, Union

import torch
from torch import nn
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from seg_methods.utils.ext import ext_has_cuda, has_op

__all__ = [
    "DenseAffinityApply",
    "dense_affinity_apply",
    "dense_affinity_apply_batched",
    "dense_affinity_apply_pytorch",
]

_IMPLS = ("auto", "ext", "pytorch")
_BACKENDS = {"gemm": 0, "direct": 1}
_OPS = ("dense_affinity_forward", "dense_affinity_backward")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _use_ext(tensors, impl: str) -> bool:
    """Whether ``impl`` runs the compiled op on ``tensors`` (raises for an unusable "ext")."""
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "pytorch":
        return False
    available = all(has_op(name) for name in _OPS)
    device_ok = all(t.device.type == "cpu" for t in tensors) or (
        all(t.device.type == "cuda" for t in tensors) and ext_has_cuda()
    )
    if impl == "ext" and not (available and device_ok):
        raise RuntimeError(
            f"dense_affinity: impl='ext' needs the compiled ops {_OPS} of seg_methods._C for "
            f"device {tensors[0].device}; they are {'built' if available else 'not built'}"
            + ("" if device_ok else " but not for this device")
            + ". Use impl='auto' to fall back to the pure-PyTorch reference."
        )
    return available and device_ok


def _backend_code(backend: str) -> int:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {tuple(_BACKENDS)}, got {backend!r}")
    return _BACKENDS[backend]


def _flatten_single(psi, phi0, phi1):
    """Checks one image's shapes; returns psi (N, HW), phi0 (C, HW), phi1 (C, HW) views."""
    if psi.dim() not in (2, 3) or phi0.dim() not in (2, 3) or phi0.shape != phi1.shape:
        raise ValueError(
            "dense_affinity_apply expects psi (N, H, W) or (N, HW) and phi0, phi1 of one shape "
            f"(C, H, W) or (C, HW); got psi {tuple(psi.shape)}, phi0 {tuple(phi0.shape)}, "
            f"phi1 {tuple(phi1.shape)}"
        )
    if psi.dim() == 3 and phi0.dim() == 3 and psi.shape[1:] != phi0.shape[1:]:
        raise ValueError(
            f"dense_affinity_apply: psi (N, H, W) {tuple(psi.shape)} and phi0 (C, H, W) "
            f"{tuple(phi0.shape)} must share H and W"
        )
    psi_flat = psi.flatten(1) if psi.dim() == 3 else psi
    phi0_flat = phi0.flatten(1) if phi0.dim() == 3 else phi0
    phi1_flat = phi1.flatten(1) if phi1.dim() == 3 else phi1
    if psi_flat.shape[1] != phi0_flat.shape[1]:
        raise ValueError(
            f"dense_affinity_apply: psi {tuple(psi.shape)} and phi0 {tuple(phi0.shape)} have "
            f"different numbers of pixels ({psi_flat.shape[1]} vs {phi0_flat.shape[1]})"
        )
    _check_dtypes(psi, phi0, phi1)
    return psi_flat, phi0_flat, phi1_flat


def _check_dtypes(psi, phi0, phi1) -> None:
    dtypes = {psi.dtype, phi0.dtype, phi1.dtype}
    if len(dtypes) != 1 or not psi.is_floating_point():
        raise ValueError(
            f"dense_affinity_apply: psi, phi0, phi1 must share one float dtype, got "
            f"{psi.dtype}, {phi0.dtype}, {phi1.dtype}"
        )
    devices = {psi.device, phi0.device, phi1.device}
    if len(devices) != 1:
        raise ValueError(
            f"dense_affinity_apply: psi, phi0, phi1 are on different devices {devices}"
        )


# --------------------------------------------------------------------------------------------
# pure-PyTorch reference
# --------------------------------------------------------------------------------------------
def dense_affinity_apply_pytorch(
    psi: torch.Tensor,
    phi0: torch.Tensor,
    phi1: torch.Tensor,
    *,
    scale: float = 1.0,
    naive: bool = False,
) -> torch.Tensor:
    """Pure-PyTorch reference of :func:`dense_affinity_apply` for one image.

    ``naive=False`` evaluates Eq. 4 right to left (Eq. 3): ``K = phi1 psi^T`` (C, N), then
    ``psi + scale * K^T phi0`` (memory linear in HW). ``naive=True`` forms the (HW x HW)
    affinity ``A = phi0(Q) phi1(Q)^T`` of Sec. 3.4.2 and computes ``Psi + scale * A Psi`` in the
    paper's (HW, N) layout: quadratic in HW, for tests on tiny shapes.

    Args and return value as :func:`dense_affinity_apply`.
    """
    psi_flat, phi0_flat, phi1_flat = _flatten_single(psi, phi0, phi1)
    if naive:
        affinity = phi0_flat.t() @ phi1_flat  # A = phi0(Q) phi1(Q)^T, (HW, HW)
        if scale != 1.0:
            affinity = affinity * scale
        out = psi_flat.t() + affinity @ psi_flat.t()  # Psi + A Psi, (HW, N)
        return out.t().reshape(psi.shape)
    kernel = phi1_flat @ psi_flat.t()  # K = phi1(Q)^T Psi in the paper's layout, (C, N)
    if scale != 1.0:
        kernel = kernel * scale
    out = psi_flat + kernel.t() @ phi0_flat  # Psi + phi0(Q) K, (N, HW)
    return out.reshape(psi.shape)


def _batched_pytorch(psi, phi0, phi1, counts: List[int], scale: float):
    """Factored reference on a padded batch psi (B, Nmax, HW), phi (B, C, HW)."""
    B, N, _ = psi.shape
    valid = torch.arange(N, device=psi.device).unsqueeze(0) < torch.tensor(
        counts, device=psi.device
    ).unsqueeze(
        1
    )  # (B, Nmax)
    # Padded channels read as 0, whatever they hold (NaN included): a masked copy of psi.
    psi = torch.where(valid.unsqueeze(-1), psi, torch.zeros((), dtype=psi.dtype, device=psi.device))
    kernel = torch.bmm(phi1, psi.transpose(1, 2))  # (B, C, Nmax): zero columns for padding
    if scale != 1.0:
        kernel = kernel * scale
    return psi + torch.bmm(kernel.transpose(1, 2), phi0)  # padded rows stay 0


# --------------------------------------------------------------------------------------------
# compiled op
# --------------------------------------------------------------------------------------------
class _DenseAffinityFunction(Function):
    @staticmethod
    def forward(ctx, psi, phi0, phi1, counts, scale, backend):
        out, kernel = torch.ops.seg_methods.dense_affinity_forward(
            psi, phi0, phi1, counts, scale, backend
        )
        # Besides the inputs (referenced, not copied) only the (B, C, N) kernel scale * K is kept.
        ctx.save_for_backward(psi, phi0, phi1, kernel)
        ctx.counts = counts
        ctx.scale = scale
        ctx.backend = backend
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        psi, phi0, phi1, kernel = ctx.saved_tensors
        output_mask = [bool(x) for x in ctx.needs_input_grad[:3]]
        grad_psi, grad_phi0, grad_phi1 = torch.ops.seg_methods.dense_affinity_backward(
            grad_out, psi, phi0, phi1, kernel, ctx.counts, ctx.scale, output_mask, ctx.backend
        )
        return grad_psi, grad_phi0, grad_phi1, None, None, None


def _apply_ext(psi, phi0, phi1, counts: Optional[List[int]], scale: float, backend: str):
    """Compiled op on psi (B, N, HW), phi (B, C, HW)."""
    return _DenseAffinityFunction.apply(
        psi, phi0, phi1, counts, float(scale), _backend_code(backend)
    )


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def dense_affinity_apply(
    psi: torch.Tensor,
    phi0: torch.Tensor,
    phi1: torch.Tensor,
    *,
    scale: float = 1.0,
    impl: str = "auto",
    backend: str = "gemm",
) -> torch.Tensor:
    """Dense instance affinity applier of one image (Sec. 3.4.2, Eq. 4).

    ::

        K[c, n] = sum_p phi1[c, p] * psi[n, p]                       (C, N)   phi1(Q)^T Psi
        P[n, p] = psi[n, p] + scale * sum_c K[c, n] * phi0[c, p]     (N, HW)  Psi + phi0(Q) K

    which equals ``Psi + scale * (phi0(Q) phi1(Q)^T) Psi`` (Eq. 3) without forming the (HW x HW)
    affinity. Gradients flow to ``psi``, ``phi0`` and ``phi1``. ``N = 0`` (no detection and no
    stuff class) gives an empty output; ``C = 0`` gives ``P = psi``.

    Args:
        psi (Tensor): dynamic potential, shape (N, H, W) or (N, HW).
        phi0 (Tensor): phi0(Q), shape (C, H, W) or (C, HW) (activation already applied).
        phi1 (Tensor): phi1(Q), same shape as ``phi0``.
        scale (float): multiplies the affinity term; 1 (the default) is the paper's Eq. 4.
        impl (str): "auto", "ext" (compiled op, error if unavailable) or "pytorch"
            (:func:`dense_affinity_apply_pytorch`, factored form).
        backend (str): pixel-sized products of the compiled op: "gemm" (ATen GEMMs, default) or
            "direct" (hand-written kernels, float32 / float64 only; slower, see the module
            docstring).

    Returns:
        Tensor: P, same shape and dtype as ``psi``.
    """
    psi_flat, phi0_flat, phi1_flat = _flatten_single(psi, phi0, phi1)
    _backend_code(backend)
    if not _use_ext([psi, phi0, phi1], impl):
        return dense_affinity_apply_pytorch(psi, phi0, phi1, scale=scale)
    out = _apply_ext(
        psi_flat.unsqueeze(0), phi0_flat.unsqueeze(0), phi1_flat.unsqueeze(0), None, scale, backend
    )
    return out.reshape(psi.shape)


def dense_affinity_apply_batched(
    psi: Union[torch.Tensor, Sequence[torch.Tensor]],
    phi0: Union[torch.Tensor, Sequence[torch.Tensor]],
    phi1: Union[torch.Tensor, Sequence[torch.Tensor]],
    counts: Optional[Union[torch.Tensor, Sequence[int]]] = None,
    *,
    scale: float = 1.0,
    impl: str = "auto",
    backend: str = "gemm",
) -> Union[torch.Tensor, List[torch.Tensor]]:
    """:func:`dense_affinity_apply` over a batch whose images have different channel counts.

    Two forms:

    * **list**: ``psi`` is a sequence of B tensors (N_i, H, W) or (N_i, HW) (N_i may be 0);
      ``phi0`` / ``phi1`` are (B, C, H, W) / (B, C, HW) tensors or sequences of per-image
      tensors. Returns the list of the B outputs. Each image runs on its own (no padding copy).
    * **padded**: ``psi`` is one (B, Nmax, H, W) or (B, Nmax, HW) tensor and ``counts`` gives the
      number of valid channels of each image (a sequence of B ints or a 1-D integer tensor;
      default: all Nmax). Channels ``n >= counts[b]`` are padding: their values are never read
      (they may hold anything), they are 0 in the output and get a zero gradient. Returns the
      padded (B, Nmax, ...) output. The compiled op reads the valid channels through views; the
      PyTorch fallback multiplies by a mask (a copy).

    Args:
        psi, phi0, phi1: see above; all images share C, H and W within a padded batch.
        counts: valid channels per image (padded form only).
        scale, impl, backend: as :func:`dense_affinity_apply`.
    """
    _backend_code(backend)
    if isinstance(psi, (list, tuple)):
        if counts is not None:
            raise ValueError("dense_affinity_apply_batched: counts is for the padded form only")
        if len(phi0) != len(psi) or len(phi1) != len(psi):
            raise ValueError(
                f"dense_affinity_apply_batched: {len(psi)} psi tensors but {len(phi0)} phi0 and "
                f"{len(phi1)} phi1 images"
            )
        return [
            dense_affinity_apply(p, f0, f1, scale=scale, impl=impl, backend=backend)
            for p, f0, f1 in zip(psi, phi0, phi1)
        ]
    if psi.dim() not in (3, 4) or phi0.dim() != psi.dim() or phi0.shape != phi1.shape:
        raise ValueError(
            "dense_affinity_apply_batched expects psi (B, Nmax, H, W) with phi0, phi1 "
            "(B, C, H, W), or psi (B, Nmax, HW) with phi0, phi1 (B, C, HW); got psi "
            f"{tuple(psi.shape)}, phi0 {tuple(phi0.shape)}, phi1 {tuple(phi1.shape)}"
        )
    if psi.shape[0] != phi0.shape[0] or psi.shape[2:] != phi0.shape[2:]:
        raise ValueError(
            f"dense_affinity_apply_batched: psi {tuple(psi.shape)} and phi0 "
            f"{tuple(phi0.shape)} must share B and the pixel dimensions"
        )
    _check_dtypes(psi, phi0, phi1)
    B, N = psi.shape[:2]
    if counts is None:
        counts_list = [N] * B
    elif isinstance(counts, torch.Tensor):
        counts_list = [int(c) for c in counts.tolist()]
    else:
        counts_list = [int(c) for c in counts]
    if len(counts_list) != B or any(c < 0 or c > N for c in counts_list):
        raise ValueError(
            f"dense_affinity_apply_batched: counts must give B = {B} values in [0, Nmax = {N}], "
            f"got {counts_list}"
        )
    psi_flat = psi.flatten(2)
    phi0_flat = phi0.flatten(2)
    phi1_flat = phi1.flatten(2)
    if _use_ext([psi, phi0, phi1], impl):
        out = _apply_ext(psi_flat, phi0_flat, phi1_flat, counts_list, scale, backend)
    else:
        out = _batched_pytorch(psi_flat, phi0_flat, phi1_flat, counts_list, scale)
    return out.reshape(psi.shape)


class DenseAffinityApply(nn.Module):
    """The dense instance affinity applier of Eq. 4 as a module (no parameters: phi0 and phi1,
    the 1 x 1 convolutions with their activation, belong to the caller's head).

    ``forward(psi, phi0, phi1, counts=None)`` takes image layouts: one image (psi (N, H, W) or
    (N, HW), phi (C, H, W)) goes to :func:`dense_affinity_apply`; a padded batch (psi
    (B, Nmax, H, W), phi (B, C, H, W), optional ``counts``) or a list of psi tensors goes to
    :func:`dense_affinity_apply_batched`. (Flattened (B, N, HW) batches: call the function.)
    """

    def __init__(self, scale: float = 1.0, impl: str = "auto", backend: str = "gemm"):
        super().__init__()
        if impl not in _IMPLS:
            raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
        _backend_code(backend)
        self.scale = float(scale)
        self.impl = impl
        self.backend = backend

    def forward(self, psi, phi0, phi1, counts=None):
        kwargs = dict(scale=self.scale, impl=self.impl, backend=self.backend)
        if isinstance(psi, torch.Tensor) and psi.dim() in (2, 3) and counts is None:
            return dense_affinity_apply(psi, phi0, phi1, **kwargs)
        return dense_affinity_apply_batched(psi, phi0, phi1, counts, **kwargs)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, impl={self.impl!r}, backend={self.backend!r}"
