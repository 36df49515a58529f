"""Multi-process training on CPU-only machines through detectron2's launcher.

detectron2's ``launch`` already picks the gloo backend when CUDA is unavailable; four things
around it assume GPUs or need care, and this module adapts them without touching detectron2:

* **DDP wrapping.** ``detectron2.engine.defaults.create_ddp_model`` (called by
  ``DefaultTrainer.__init__``) always passes ``device_ids=[local_rank]``, which
  ``DistributedDataParallel`` refuses for a CPU model. :func:`create_ddp_model` leaves
  ``device_ids`` out for CPU models; :func:`cpu_capable_ddp` makes ``DefaultTrainer`` use it.
* **SyncBN.** ``torch.nn.SyncBatchNorm`` raises in training on CPU tensors whenever a process
  group exists. Before wrapping a CPU model, :func:`convert_sync_batchnorm_for_cpu` replaces each
  of them by :class:`CPUSyncBatchNorm`, which computes the batch statistics of all processes with
  a differentiable all-reduce that gloo supports. The statistics are those of the whole global
  batch (every sample weighted equally), so a SyncBN model trained with N processes x B images
  matches one process with N x B images, as on GPUs. Models on CUDA keep torch's SyncBatchNorm.
* **Evaluation during training.** With per-process BatchNorm each rank has its own running
  statistics (``broadcast_buffers=False``); :func:`broadcast_buffers` gives every rank those of
  rank 0 (the checkpoint's) before ``Trainer.test``.
* **Threads.** Each spawned process would start as many intra-op threads as the machine has
  cores, so N processes oversubscribe the CPU N times. Without ``OMP_NUM_THREADS`` in the
  environment, :func:`launch` gives each process ``cores // processes_per_machine`` threads (at
  least one); with it, torch's own reading of ``OMP_NUM_THREADS`` is kept.

Usage (what ``train_net.py`` does)::

    launch(main, args.num_gpus, num_machines=args.num_machines,
           machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))

On a CPU-only machine ``--num-gpus N`` means N processes on this machine. On a machine with GPUs
everything is detectron2's (NCCL, one process per GPU); to train on its CPUs instead, hide the
GPUs (``CUDA_VISIBLE_DEVICES=``) so that gloo is chosen.
"""

import contextlib
import logging
import os
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from detectron2.engine import defaults as d2_defaults
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.engine.launch import launch as d2_launch
from detectron2.utils import comm
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "CPUSyncBatchNorm",
    "broadcast_buffers",
    "convert_sync_batchnorm_for_cpu",
    "cpu_capable_ddp",
    "create_ddp_model",
    "launch",
    "threads_per_process",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ launcher
def threads_per_process(processes_per_machine: int) -> Optional[int]:
    """Intra-op threads for each of ``processes_per_machine`` CPU processes.

    Returns:
        int or None: ``max(1, usable cores // processes_per_machine)``, or None when
        ``OMP_NUM_THREADS`` is set (torch already follows it in every process) or when CUDA is
        available (GPU processes keep torch's default).
    """
    if "OMP_NUM_THREADS" in os.environ or torch.cuda.is_available():
        return None
    try:
        cores = len(os.sched_getaffinity(0))  # respects taskset / cgroup cpusets
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // processes_per_machine)


def _worker(main_func: Callable, num_threads: Optional[int], args: Sequence[Any]):
    """Runs in every spawned process, after detectron2 created the process groups."""
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    result = main_func(*args)
    if dist.is_available() and dist.is_initialized():
        # Tear the process groups down while every rank is alive: left to the interpreter's exit,
        # gloo's background threads can abort the process ("terminate called without an active
        # exception", SIGABRT) after the work is done, most often when the ranks finish fast.
        comm.synchronize()
        dist.destroy_process_group()
    return result


def launch(
    main_func: Callable,
    num_processes_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = None,
    args: Sequence[Any] = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
):
    """detectron2's ``launch`` with checked arguments and CPU thread placement.

    Spawns ``num_processes_per_machine`` processes on this machine (one per GPU on a GPU
    machine, gloo processes on a CPU-only one) that join one process group of
    ``num_machines * num_processes_per_machine`` ranks, then calls ``main_func(*args)`` in each.
    With one process in total, ``main_func(*args)`` runs in this process, unchanged.

    Args:
        main_func (callable): function to run; it must be importable by name (a module-level
            function) because the processes are spawned.
        num_processes_per_machine (int): processes on this machine (train_net's ``--num-gpus``).
        num_machines (int): machines taking part (``--num-machines``).
        machine_rank (int): rank of this machine, ``0 .. num_machines - 1`` (``--machine-rank``).
        dist_url (str or None): rendezvous URL of machine 0, e.g. "tcp://10.0.0.1:29500"
            (``--dist-url``). "auto" or None picks a free local port (one machine only).
        args (sequence): arguments of ``main_func``.
        timeout (timedelta): timeout of the process group's collectives: a rank stuck for longer
            (another rank died or diverged) raises instead of hanging.

    Raises:
        ValueError: a count below 1, a machine rank out of range, or several machines without
            an explicit URL.
    """
    if num_processes_per_machine < 1 or num_machines < 1:
        raise ValueError(
            f"--num-gpus (processes per machine, got {num_processes_per_machine}) and "
            f"--num-machines (got {num_machines}) must be >= 1."
        )
    if not 0 <= machine_rank < num_machines:
        raise ValueError(f"--machine-rank must be in [0, {num_machines}), got {machine_rank}.")
    if dist_url is None:
        dist_url = "auto"
    if num_machines > 1 and dist_url == "auto":
        raise ValueError(
            f"--num-machines={num_machines} needs --dist-url tcp://HOST:PORT: the address of "
            "machine 0 and a free port on it, reachable from every machine (the same URL on "
            "all machines)."
        )
    num_threads = None
    if num_machines * num_processes_per_machine > 1:
        num_threads = threads_per_process(num_processes_per_machine)
        if num_threads is not None:
            logger.info(
                f"{num_processes_per_machine} CPU processes on this machine, {num_threads} "
                "thread(s) each (set OMP_NUM_THREADS to choose)."
            )
    d2_launch(
        _worker,
        num_processes_per_machine,
        num_machines=num_machines,
        machine_rank=machine_rank,
        dist_url=dist_url,
        args=(main_func, num_threads, tuple(args)),
        timeout=timeout,
    )


# ------------------------------------------------------------------------------------ SyncBN
class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks of ``group``; the gradient is summed over the ranks as well."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class CPUSyncBatchNorm(_BatchNorm):
    """Synchronised BatchNorm whose training statistics are all-reduced with any backend (gloo).

    In training, with a process group of several ranks, the per-channel statistics of the
    input ``x`` of shape (N, C, *) are taken over every dimension but C and over all ranks, with
    two differentiable all-reduces: ``[sum x, count]`` gives the global mean ``mu = S / n``, then
    ``sum (x - mu)^2`` the biased variance ``var`` (two passes, numerically safer than
    ``E[x^2] - mu^2``). These are the statistics of the whole global batch (each sample weighted
    equally, also when ranks hold different numbers of samples). The output is
    ``(x - mu) / sqrt(var + eps) * weight + bias``; running statistics are updated as torch's
    BatchNorm does (unbiased variance ``var * n / (n - 1)``, ``momentum`` or cumulative average).
    Otherwise (evaluation, one process) it is plain BatchNorm.

    It is not a subclass of ``nn.SyncBatchNorm``: DistributedDataParallel refuses those in CPU
    modules. Build one with :func:`convert_sync_batchnorm_for_cpu`.

    Args:
        num_features (int): C.
        eps, momentum, affine, track_running_stats: as ``nn.SyncBatchNorm``.
        process_group: group whose ranks share statistics (None: all ranks).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Optional[Any] = None,
        device=None,
        dtype=None,
    ):
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, *), got {input.dim()}D input")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(input)
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        if dist.get_world_size(group) == 1:
            return super().forward(input)
        c = input.shape[1]
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        dims = [0] + list(range(2, x.dim()))
        shape = [1, c] + [1] * (x.dim() - 2)
        local_count = x.numel() // c if c else 0
        sums = _AllReduceSum.apply(torch.cat([x.sum(dims), x.new_full((1,), local_count)]), group)
        n = sums[-1].detach()
        if n.item() <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel in training over all processes, got "
                f"input of size {list(input.shape)} on this process and {int(n.item())} in all"
            )
        mean = sums[:c] / n
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims), group) / n

        if self.track_running_stats and self.running_mean is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
            else:
                factor = self.momentum
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                unbiased = var.detach() * (n / (n - 1))
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)

        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


def convert_sync_batchnorm_for_cpu(module: nn.Module) -> int:
    """Replace, in place, every ``nn.SyncBatchNorm`` of ``module`` by :class:`CPUSyncBatchNorm`.

    The new layers take over the same ``Parameter`` and buffer objects, so an optimizer built
    before the conversion keeps updating them and state dicts are unchanged.

    Args:
        module (nn.Module): model to convert (not a SyncBatchNorm itself: TypeError).

    Returns:
        int: number of layers replaced.
    """
    if type(module) is nn.SyncBatchNorm:
        raise TypeError(
            "convert_sync_batchnorm_for_cpu replaces layers inside a module: pass the module "
            "that holds the SyncBatchNorm, not the layer itself"
        )
    count = 0
    for name, child in module.named_children():
        if type(child) is nn.SyncBatchNorm:
            new = CPUSyncBatchNorm(
                child.num_features,
                eps=child.eps,
                momentum=child.momentum,
                affine=child.affine,
                track_running_stats=child.track_running_stats,
                process_group=child.process_group,
                device="meta",  # placeholders, replaced just below
            )
            for key, value in list(child._parameters.items()):
                new._parameters[key] = value
            for key, value in list(child._buffers.items()):
                new._buffers[key] = value
            new.train(child.training)
            setattr(module, name, new)
            count += 1
        else:
            count += convert_sync_batchnorm_for_cpu(child)
    return count


# ------------------------------------------------------------------------------------ DDP
def broadcast_buffers(model: nn.Module, src: int = 0) -> int:
    """Copy rank ``src``'s buffers (BatchNorm running statistics, ...) to every rank, in place.

    ``DefaultTrainer`` wraps the model with ``broadcast_buffers=False``, so with per-process
    BatchNorm ("BN") each rank keeps its own running statistics. Evaluation during training runs
    on every rank, each on its share of the test set: without this call the ranks would score
    their shares with different statistics, none of them necessarily those of the checkpoint
    (saved by rank 0), and the metrics would differ from an evaluation of that checkpoint.
    Call it on every rank; it does nothing with one process.

    Args:
        model (nn.Module): the model, possibly wrapped in DistributedDataParallel.
        src (int): global rank whose buffers are kept.

    Returns:
        int: number of buffers broadcast.
    """
    if comm.get_world_size() == 1:
        return 0
    model = getattr(model, "module", model)
    count = 0
    with torch.no_grad():
        for buf in model.buffers():
            dist.broadcast(buf, src=src)
            count += 1
    return count


def create_ddp_model(model: nn.Module, *, fp16_compression: bool = False, **kwargs) -> nn.Module:
    """detectron2's ``create_ddp_model`` that also wraps CPU models.

    With one process the model is returned as is. A model whose parameters are on the CPU is
    wrapped without ``device_ids`` (``DistributedDataParallel`` refuses them for CPU modules)
    after :func:`convert_sync_batchnorm_for_cpu`; a CUDA model goes to detectron2's function
    unchanged (``device_ids=[local rank]``).

    Args:
        model (nn.Module): the model, already on its device.
        fp16_compression (bool): detectron2's fp16 gradient-compression hook.
        kwargs: other ``DistributedDataParallel`` arguments (e.g. ``broadcast_buffers``).
    """
    if comm.get_world_size() == 1:
        return model
    first = next(iter(model.parameters()), None)
    if first is not None and first.device.type == "cpu":
        if kwargs.get("device_ids") or kwargs.get("output_device") is not None:
            raise ValueError(
                f"device_ids/output_device {kwargs.get('device_ids')}, "
                f"{kwargs.get('output_device')} given for a CPU model"
            )
        converted = convert_sync_batchnorm_for_cpu(model)
        if converted:
            logger.info(
                f"{converted} SyncBatchNorm layer(s) synchronised with gloo all-reduces "
                "(CPUSyncBatchNorm): torch's SyncBatchNorm needs a GPU."
            )
        kwargs["device_ids"] = None
    return _D2_CREATE_DDP_MODEL(model, fp16_compression=fp16_compression, **kwargs)


_D2_CREATE_DDP_MODEL = d2_defaults.create_ddp_model


@contextlib.contextmanager
def cpu_capable_ddp() -> Iterator[None]:
    """Within this block, ``DefaultTrainer.__init__`` wraps models with :func:`create_ddp_model`.

    ``DefaultTrainer.__init__`` calls ``create_ddp_model`` of ``detectron2.engine.defaults``
    directly (there is no method to override), so the module's name is pointed at our function
    for the duration of the block and restored afterwards, also on error.
    """
    previous = d2_defaults.create_ddp_model
    d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = previous
