"""Clustering ops of CMT-DeepLab and ClustSeg: a fused soft clustering step and a hard (k-means)
assignment.

* :func:`soft_cluster` is one EM step of ClustSeg's recurrent cross-attention (Eq. 10) and the
  clustering update of CMT-DeepLab (Eq. 4-7): per pixel, a softmax over the cluster axis of the
  pixel-cluster logits (E-step), then every cluster sums the pixel values weighted by its
  assignment (M-step). The compiled kernel never stores the (B, K, HW) logits or assignment unless
  asked to: its backward recomputes them tile by tile.
* :func:`hard_cluster` is the k-means cross-attention of kMaX-DeepLab (the "K-Means" variant of
  ClustSeg Table 4c): argmax over the cluster axis (no gradient), then a per-cluster sum or mean of
  the pixel values.

Shape shorthand:
    B: batch; when the op is used per attention head, fold the heads into B (B = batch * heads)
    K: number of clusters (cluster centres, i.e. object queries)
    HW: number of pixels H * W (a flattened feature map)
    D: channels of the queries and keys
    Dv: channels of the values

Each op has a compiled implementation (``seg_methods._C``, CPU and CUDA kernels) and a
pure-PyTorch reference (``*_pytorch``). ``impl="auto"`` uses the compiled kernel when it is built
for the inputs' device and falls back to the reference otherwise; ``impl="ext"`` requires the
compiled kernel; ``impl="pytorch"`` always runs the reference. Half-precision inputs are computed
in float32 by the compiled kernels and cast back.
"""

from typing import Optional, Tuple

import torch
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from seg_methods.utils.ext import ext_has_cuda, has_op

__all__ = [
    "soft_cluster",
    "soft_cluster_pytorch",
    "hard_cluster",
    "hard_cluster_pytorch",
    "hard_cluster_from_qk",
]

_IMPLS = ("auto", "ext", "pytorch")
_REDUCTIONS = ("mean", "sum")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _check_impl(impl: str) -> None:
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")


def _use_ext(op_names: Tuple[str, ...], tensors, impl: str, what: str) -> bool:
    """Whether to run the compiled kernels ``op_names`` on ``tensors`` for ``impl``."""
    _check_impl(impl)
    if impl == "pytorch":
        return False
    available = all(has_op(name) for name in op_names)
    device_ok = all(t.device.type == "cpu" for t in tensors) or (
        all(t.device.type == "cuda" for t in tensors) and ext_has_cuda()
    )
    if impl == "ext" and not (available and device_ok):
        raise RuntimeError(
            f"{what}: impl='ext' needs the compiled ops {op_names} of seg_methods._C for device "
            f"{tensors[0].device}; they are {'built' if available else 'not built'}"
            + ("" if device_ok else " but not for this device")
            + ". Use impl='auto' to fall back to the pure-PyTorch reference."
        )
    return available and device_ok


def _kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the compiled kernels run in (float32 for half precision)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _pack(update, logits, assignment, return_logits: bool, return_assignment: bool):
    outputs = [update]
    if return_logits:
        outputs.append(logits)
    if return_assignment:
        outputs.append(assignment)
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _check_soft_inputs(q, k, v, logits_bias) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            "soft_cluster expects q (B, K, D), k (B, HW, D), v (B, HW, Dv); got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, K, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(
            f"soft_cluster: batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if k.shape[2] != D:
        raise ValueError(
            f"soft_cluster: q (B, K, D) and k (B, HW, D) must share D; got {tuple(q.shape)} "
            f"and {tuple(k.shape)}"
        )
    if v.shape[1] != k.shape[1]:
        raise ValueError(
            f"soft_cluster: k (B, HW, D) and v (B, HW, Dv) must share HW; got {tuple(k.shape)} "
            f"and {tuple(v.shape)}"
        )
    if logits_bias is not None and tuple(logits_bias.shape) != (B, K, k.shape[1]):
        raise ValueError(
            f"soft_cluster: logits_bias must have shape (B, K, HW) = {(B, K, k.shape[1])}, got "
            f"{tuple(logits_bias.shape)}"
        )
    dtypes = {q.dtype, k.dtype, v.dtype} | (
        {logits_bias.dtype} if logits_bias is not None else set()
    )
    if len(dtypes) != 1 or not q.is_floating_point():
        raise ValueError(
            f"soft_cluster: q, k, v, logits_bias must share one float dtype, got {dtypes}"
        )


# --------------------------------------------------------------------------------------------
# soft clustering step (ClustSeg Eq. 10, CMT-DeepLab Eq. 4-7)
# --------------------------------------------------------------------------------------------
def soft_cluster_pytorch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    logits_bias: Optional[torch.Tensor] = None,
    return_logits: bool = False,
    *,
    return_assignment: bool = False,
    scale: float = 1.0,
):
    """Pure-PyTorch reference of :func:`soft_cluster` (matmul, softmax over K, matmul).

    Same arguments and return values as :func:`soft_cluster`; it stores the (B, K, HW) logits and
    assignment for autograd.
    """
    _check_soft_inputs(q, k, v, logits_bias)
    logits = torch.bmm(q, k.transpose(1, 2))  # (B, K, HW)
    if scale != 1.0:
        logits = logits * scale
    if logits_bias is not None:
        logits = logits + logits_bias  # CMT-DeepLab Eq. 6
    assignment = logits.softmax(dim=1)  # softmax over the cluster axis K, per pixel (Eq. 10 E-step)
    update = torch.bmm(assignment, v)  # (B, K, Dv), Eq. 10 M-step
    return _pack(update, logits, assignment, return_logits, return_assignment)


class _SoftClusterFunction(Function):
    @staticmethod
    def forward(ctx, q, k, v, logits_bias, scale, return_logits, return_assignment, tile_size):
        update, lse, logits, assignment = torch.ops.seg_methods.soft_cluster_forward(
            q, k, v, logits_bias, scale, return_logits, return_assignment, tile_size
        )
        # Only O(B * HW) is stored besides the inputs: the per-pixel log-sum-exp. The logits or
        # assignment are kept only when they are returned anyway (they spare a recomputation).
        ctx.save_for_backward(q, k, v, logits_bias, lse, logits, assignment)
        ctx.scale = scale
        ctx.tile_size = tile_size
        ctx.set_materialize_grads(False)
        return update, logits, assignment

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_update, grad_logits, grad_assignment):
        q, k, v, logits_bias, lse, logits, assignment = ctx.saved_tensors
        output_mask = [bool(x) for x in ctx.needs_input_grad[:4]]
        grad_q, grad_k, grad_v, grad_bias = torch.ops.seg_methods.soft_cluster_backward(
            grad_update,
            grad_logits,
            grad_assignment,
            q,
            k,
            v,
            logits_bias,
            lse,
            logits,
            assignment,
            ctx.scale,
            output_mask,
            ctx.tile_size,
        )
        return grad_q, grad_k, grad_v, grad_bias, None, None, None, None


def soft_cluster(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    logits_bias: Optional[torch.Tensor] = None,
    return_logits: bool = False,
    impl: str = "auto",
    *,
    return_assignment: bool = False,
    scale: float = 1.0,
    tile_size: Optional[int] = None,
):
    """One fused soft clustering step: E-step and M-step of ClustSeg Eq. 10 (CMT-DeepLab Eq. 5-7).

    With ``L = scale * q @ k^T + logits_bias``::

        L[b, i, n]  = scale * <q[b, i], k[b, n]> + logits_bias[b, i, n]       (B, K, HW)
        M[b, :, n]  = softmax(L[b, :, n])      # over the cluster axis K (dim 1), per pixel
        U[b, i]     = sum_n M[b, i, n] * v[b, n]                               (B, K, Dv)

    So every column ``M[b, :, n]`` sums to 1 (each pixel distributes itself over the clusters);
    rows are not normalised (U is the plain weighted sum, no division by sum_n M, as in ClustSeg
    Eq. 10 / Algorithm 2 and CMT-DeepLab Eq. 5). CMT-DeepLab's ``Z`` of Eq. 4/6, shape (HW, N),
    is ``M.transpose(1, 2)``; its cluster-centre update of Eq. 7 adds ``U`` to the usual
    softmax-over-HW cross-attention, and its pixel update Eq. 8 is ``M.transpose(1, 2) @ V^c``
    (ask for ``return_assignment=True``).

    Gradients flow to ``q``, ``k``, ``v`` and ``logits_bias`` and, when returned, through the
    logits and the assignment as well. Unless ``return_logits`` / ``return_assignment`` is set,
    the compiled kernel keeps no (B, K, HW) tensor: it saves the per-pixel log-sum-exp (B, HW)
    and recomputes the logits tile by tile in backward (one extra GEMM), so its working memory is
    O(B * K * tile_size). ``logits_bias``, when given, is an input and is referenced, not copied.
    A returned logits / assignment tensor is saved for backward (no recomputation then).

    Args:
        q (Tensor): cluster-centre queries, shape (B, K, D).
        k (Tensor): pixel keys, shape (B, HW, D).
        v (Tensor): pixel values, shape (B, HW, Dv).
        logits_bias (Tensor or None): additive logits, shape (B, K, HW); CMT-DeepLab Eq. 6's
            residual ``S`` (the previous layer's logits). None when unused.
        return_logits (bool): also return ``L``, shape (B, K, HW).
        impl (str): "auto", "ext" (compiled kernel, error if unavailable) or "pytorch"
            (:func:`soft_cluster_pytorch`).
        return_assignment (bool): also return ``M``, shape (B, K, HW).
        scale (float): multiplies ``q @ k^T`` (not ``logits_bias``). Default 1.0: neither ClustSeg
            (Eq. 10, Algorithm 2) nor CMT-DeepLab (Eq. 5-6) scales the affinity logits; pass
            ``D ** -0.5`` for a scaled dot product.
        tile_size (int or None): pixels per tile of the compiled kernel; None picks about 2^18
            elements per (B, K, tile) tile on the CPU (at least 512 pixels) and 2^22 on CUDA.

    Returns:
        ``update`` (Tensor) of shape (B, K, Dv) when neither flag is set; otherwise the tuple
        ``(update, logits)``, ``(update, assignment)`` or ``(update, logits, assignment)``, in that
        order, with ``logits`` and ``assignment`` of shape (B, K, HW).
    """
    _check_soft_inputs(q, k, v, logits_bias)
    tensors = [q, k, v] + ([logits_bias] if logits_bias is not None else [])
    if not _use_ext(
        ("soft_cluster_forward", "soft_cluster_backward"), tensors, impl, "soft_cluster"
    ):
        return soft_cluster_pytorch(
            q, k, v, logits_bias, return_logits, return_assignment=return_assignment, scale=scale
        )
    in_dtype = q.dtype
    kdtype = _kernel_dtype(in_dtype)
    if kdtype != in_dtype:
        q, k, v = q.to(kdtype), k.to(kdtype), v.to(kdtype)
        logits_bias = logits_bias.to(kdtype) if logits_bias is not None else None
    update, logits, assignment = _SoftClusterFunction.apply(
        q,
        k,
        v,
        logits_bias,
        float(scale),
        bool(return_logits),
        bool(return_assignment),
        int(tile_size or 0),
    )
    if kdtype != in_dtype:
        update = update.to(in_dtype)
        logits = logits.to(in_dtype) if logits is not None else None
        assignment = assignment.to(in_dtype) if assignment is not None else None
    return _pack(update, logits, assignment, return_logits, return_assignment)


# --------------------------------------------------------------------------------------------
# hard (k-means) assignment (kMaX-DeepLab; ClustSeg Table 4c "K-Means")
# --------------------------------------------------------------------------------------------
def _check_reduce(reduce: str) -> bool:
    if reduce not in _REDUCTIONS:
        raise ValueError(f"reduce must be one of {_REDUCTIONS}, got {reduce!r}")
    return reduce == "mean"


def _check_hard_inputs(logits, v) -> None:
    if logits.dim() != 3 or v.dim() != 3:
        raise ValueError(
            "hard_cluster expects logits (B, K, HW) and v (B, HW, Dv); got shapes "
            f"{tuple(logits.shape)} and {tuple(v.shape)}"
        )
    if logits.shape[0] != v.shape[0] or logits.shape[2] != v.shape[1]:
        raise ValueError(
            f"hard_cluster: logits (B, K, HW) {tuple(logits.shape)} and v (B, HW, Dv) "
            f"{tuple(v.shape)} must share B and HW"
        )
    if not logits.is_floating_point() or not v.is_floating_point():
        raise ValueError(
            f"hard_cluster: logits and v must be floating point, got {logits.dtype}, {v.dtype}"
        )


def _reduce_from_index_pytorch(index, v, num_clusters: int, mean: bool):
    """One-hot matmul reference of the k-means update from a (B, HW) index."""
    B, HW, _ = v.shape
    onehot = torch.zeros(B, num_clusters, HW, dtype=v.dtype, device=v.device)  # (B, K, HW)
    counts = torch.zeros(B, num_clusters, dtype=torch.long, device=v.device)  # (B, K)
    if num_clusters > 0:  # with K = 0 every index is -1 and there is nothing to scatter
        assigned = index >= 0  # negative index: unassigned pixel
        safe_index = index.clamp(min=0)
        onehot.scatter_(1, safe_index.unsqueeze(1), assigned.unsqueeze(1).to(v.dtype))
        counts.scatter_add_(1, safe_index, assigned.long())
    update = torch.bmm(onehot, v)  # (B, K, Dv)
    if mean:
        update = update / counts.clamp(min=1).unsqueeze(-1).to(v.dtype)
    return update, counts


def hard_cluster_pytorch(logits: torch.Tensor, v: torch.Tensor, reduce: str = "mean"):
    """Pure-PyTorch reference of :func:`hard_cluster`: argmax, one-hot (B, K, HW), matmul.

    Same arguments and return values as :func:`hard_cluster`.
    """
    _check_hard_inputs(logits, v)
    mean = _check_reduce(reduce)
    B, K, HW = logits.shape
    with torch.no_grad():
        if K == 0:
            index = torch.full((B, HW), -1, dtype=torch.long, device=logits.device)
        else:
            index = logits.argmax(dim=1)  # (B, HW), argmax over the cluster axis
    update, counts = _reduce_from_index_pytorch(index, v, K, mean)
    return update, index, counts


class _HardClusterReduceFunction(Function):
    @staticmethod
    def forward(ctx, index, v, num_clusters, mean):
        update, counts = torch.ops.seg_methods.hard_cluster_reduce(index, v, num_clusters, mean)
        ctx.save_for_backward(index, counts)
        ctx.mean = mean
        ctx.mark_non_differentiable(counts)
        return update, counts

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_update, grad_counts):
        index, counts = ctx.saved_tensors
        grad_v = None
        if ctx.needs_input_grad[1]:
            grad_v = torch.ops.seg_methods.hard_cluster_reduce_backward(
                grad_update, index, counts, ctx.mean
            )
        return None, grad_v, None, None


def _reduce_from_index(index, v, num_clusters: int, mean: bool):
    """Compiled k-means update (B, K, Dv) and counts (B, K) from the (B, HW) index."""
    in_dtype = v.dtype
    kdtype = _kernel_dtype(in_dtype)
    update, counts = _HardClusterReduceFunction.apply(index, v.to(kdtype), num_clusters, mean)
    return update.to(in_dtype), counts


def hard_cluster(
    logits: torch.Tensor, v: torch.Tensor, reduce: str = "mean", impl: str = "auto"
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hard (k-means) pixel-cluster assignment and cluster update (kMaX-DeepLab).

    ::

        index[b, n]  = argmax_i logits[b, i, n]     # over the cluster axis K (dim 1), per pixel
        counts[b, i] = #{n : index[b, n] = i}
        update[b, i] = sum_{n : index[b, n] = i} v[b, n]            ("sum")
                       ... / max(counts[b, i], 1)                   ("mean"; empty clusters: 0)

    This is ClustSeg's ``M = one-hot(argmax_K(M_hat))`` (Sec. 3.1) followed by its M-step, i.e.
    the "K-Means cross-attention" of ClustSeg Table 4c. kMaX-DeepLab uses "sum" and normalises the
    result with a BatchNorm layer of its own (the caller's business). ClustSeg's text describes
    that baseline's hard assignment as Gumbel-Softmax; kMaX-DeepLab's released code takes a plain
    argmax of detached logits, which is what this op does. Ties go to the lower cluster index and
    NaN logits win, as in ``torch.argmax``.

    No gradient flows through the argmax: ``logits`` never receives a gradient (as in kMaX, which
    detaches it). The gradient w.r.t. ``v`` is ``grad_update[b, index[b, n]]`` (divided by the
    cluster's count for "mean"; counts are treated as constants).

    Args:
        logits (Tensor): pixel-cluster affinities, shape (B, K, HW).
        v (Tensor): pixel values, shape (B, HW, Dv).
        reduce (str): "mean" or "sum".
        impl (str): "auto", "ext" or "pytorch" (:func:`hard_cluster_pytorch`).

    Returns:
        tuple: ``update`` (Tensor) of shape (B, K, Dv) and dtype of ``v``; ``index`` (LongTensor)
        of shape (B, HW) with the cluster of every pixel (all -1 when K == 0); ``counts``
        (LongTensor) of shape (B, K).
    """
    _check_hard_inputs(logits, v)
    mean = _check_reduce(reduce)
    ops = ("hard_cluster_argmax", "hard_cluster_reduce", "hard_cluster_reduce_backward")
    if not _use_ext(ops, [logits, v], impl, "hard_cluster"):
        return hard_cluster_pytorch(logits, v, reduce)
    with torch.no_grad():
        index = torch.ops.seg_methods.hard_cluster_argmax(
            logits.detach().to(_kernel_dtype(logits.dtype))
        )
    update, counts = _reduce_from_index(index, v, logits.shape[1], mean)
    return update, index, counts


def hard_cluster_from_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    logits_bias: Optional[torch.Tensor] = None,
    reduce: str = "mean",
    *,
    scale: float = 1.0,
    impl: str = "auto",
    tile_size: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`hard_cluster` on ``logits = scale * q @ k^T + logits_bias`` without storing them.

    The argmax is taken tile by tile over the pixels (under ``torch.no_grad``: neither ``q`` nor
    ``k`` receives a gradient), so only a (B, K, tile_size) block of logits exists at a time.

    Args:
        q (Tensor): cluster-centre queries, shape (B, K, D).
        k (Tensor): pixel keys, shape (B, HW, D).
        v (Tensor): pixel values, shape (B, HW, Dv).
        logits_bias (Tensor or None): additive logits, shape (B, K, HW).
        reduce (str): "mean" or "sum".
        scale (float): multiplies ``q @ k^T``.
        impl (str): "auto", "ext" or "pytorch".
        tile_size (int or None): pixels per tile; None picks about 2^18 elements per tile.

    Returns:
        tuple: ``update`` (B, K, Dv), ``index`` (B, HW) int64, ``counts`` (B, K) int64, as
        :func:`hard_cluster`.
    """
    _check_soft_inputs(q, k, v, logits_bias)
    mean = _check_reduce(reduce)
    B, K, _ = q.shape
    HW = k.shape[1]
    ops = ("hard_cluster_argmax", "hard_cluster_reduce", "hard_cluster_reduce_backward")
    tensors = [q, k, v] + ([logits_bias] if logits_bias is not None else [])
    use_ext = _use_ext(ops, tensors, impl, "hard_cluster_from_qk")
    tile = int(tile_size or max(64, (2**18 // max(1, B * K)) // 64 * 64))
    with torch.no_grad():
        if K == 0:
            index = torch.full((B, HW), -1, dtype=torch.long, device=q.device)
        else:
            index = torch.empty(B, HW, dtype=torch.long, device=q.device)
            for start in range(0, HW, tile):
                end = min(HW, start + tile)
                logits = torch.bmm(q, k[:, start:end].transpose(1, 2))  # (B, K, t)
                if scale != 1.0:
                    logits = logits * scale
                if logits_bias is not None:
                    logits = logits + logits_bias[:, :, start:end]
                if use_ext:
                    index[:, start:end] = torch.ops.seg_methods.hard_cluster_argmax(
                        logits.to(_kernel_dtype(logits.dtype))
                    )
                else:
                    index[:, start:end] = logits.argmax(dim=1)
    if use_ext:
        update, counts = _reduce_from_index(index, v, K, mean)
    else:
        update, counts = _reduce_from_index_pytorch(index, v, K, mean)
    return update, index, counts
