"""Poly learning-rate schedule (DeepLab's ``WarmupPolyLR``) that resumes with the config's
schedule.

``detectron2.projects.deeplab.lr_scheduler.WarmupPolyLR`` computes
``lr = base_lr * warmup(t) * (1 - t / max_iters) ** power`` (held at
``base_lr * constant_ending`` once the poly factor falls below it). As a plain torch scheduler
its ``state_dict`` stores every attribute, so resuming a run with a longer ``SOLVER.MAX_ITER``
restores the old ``max_iters`` and fails past it (``math domain error``). The subclass below
stores only the progress, as detectron2's own ``LRMultiplier`` does.
"""

import bisect
import math
from typing import List, Sequence

import torch
from detectron2.projects.deeplab.lr_scheduler import WarmupPolyLR as _DeepLabWarmupPolyLR
from detectron2.solver.lr_scheduler import _get_warmup_factor_at_iter

# Scheduler state that is progress, not configuration.
_PROGRESS_KEYS = ("base_lrs", "last_epoch", "_step_count", "_last_lr")


class WarmupPolyLR(_DeepLabWarmupPolyLR):
    """DeepLab's ``WarmupPolyLR`` whose checkpoint holds only progress (see module docstring)."""

    def state_dict(self):
        return {k: self.__dict__[k] for k in _PROGRESS_KEYS if k in self.__dict__}


def build_warmup_poly_lr(cfg, optimizer) -> WarmupPolyLR:
    """``SOLVER.LR_SCHEDULER_NAME = "WarmupPolyLR"``: the arguments DeepLab's builder passes
    (MAX_ITER, WARMUP_FACTOR/ITERS/METHOD, POLY_LR_POWER, POLY_LR_CONSTANT_ENDING)."""
    return WarmupPolyLR(
        optimizer,
        cfg.SOLVER.MAX_ITER,
        warmup_factor=cfg.SOLVER.WARMUP_FACTOR,
        warmup_iters=cfg.SOLVER.WARMUP_ITERS,
        warmup_method=cfg.SOLVER.WARMUP_METHOD,
        power=cfg.SOLVER.POLY_LR_POWER,
        constant_ending=cfg.SOLVER.POLY_LR_CONSTANT_ENDING,
    )


def cosine_restart_factor(
    it: int, periods: Sequence[int], weights: Sequence[float], min_ratio: float = 0.0
) -> float:
    """LR factor of mmcv's ``CosineRestart`` policy at iteration ``it``.

    Period i (lengths ``periods``, back to back) anneals from ``weights[i]`` to ``min_ratio`` by a
    half cosine: ``min_ratio + 0.5 * weights[i] * (1 - min_ratio) * (1 + cos(pi * alpha))`` with
    ``alpha = (it - start_i) / periods[i]`` (mmcv ``annealing_cos``; the target is
    ``base_lr * min_lr_ratio``). Past the last period the factor stays at its end value.
    """
    ends = list(periods)
    for i in range(1, len(ends)):
        ends[i] += ends[i - 1]
    idx = min(bisect.bisect_right(ends, it), len(ends) - 1)
    start = 0 if idx == 0 else ends[idx - 1]
    alpha = min((it - start) / periods[idx], 1.0)
    return min_ratio + 0.5 * weights[idx] * (1.0 - min_ratio) * (1.0 + math.cos(math.pi * alpha))


class WarmupCosineRestartLR(torch.optim.lr_scheduler.LRScheduler):
    """mmcv's ``CosineRestart`` schedule with its multiplicative warmup (RegProxy's ``adamw+cr``
    recipe: periods 20k / 40k / 100k, restart weights 1 / 0.5 / 0.25, linear warmup over 1500
    iterations from 1e-6): ``lr = base_lr * warmup(t) * cosine_restart_factor(t)``. Its
    ``state_dict`` holds only progress (see :class:`WarmupPolyLR`)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        periods: Sequence[int],
        weights: Sequence[float],
        *,
        min_ratio: float = 0.0,
        warmup_factor: float = 0.001,
        warmup_iters: int = 1000,
        warmup_method: str = "linear",
        last_epoch: int = -1,
    ):
        if len(periods) == 0 or len(periods) != len(weights) or min(periods) <= 0:
            raise ValueError(
                f"SOLVER.COSINE_RESTART_PERIODS {list(periods)} must be positive and as many as "
                f"SOLVER.COSINE_RESTART_WEIGHTS {list(weights)}"
            )
        self.periods, self.weights = [int(p) for p in periods], [float(w) for w in weights]
        self.min_ratio = float(min_ratio)
        self.warmup_factor, self.warmup_iters = warmup_factor, warmup_iters
        self.warmup_method = warmup_method
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> List[float]:
        t = self.last_epoch
        warmup = _get_warmup_factor_at_iter(
            self.warmup_method, t, self.warmup_iters, self.warmup_factor
        )
        factor = warmup * cosine_restart_factor(t, self.periods, self.weights, self.min_ratio)
        return [base_lr * factor for base_lr in self.base_lrs]

    def state_dict(self):
        return {k: self.__dict__[k] for k in _PROGRESS_KEYS if k in self.__dict__}


def build_warmup_cosine_restart_lr(cfg, optimizer) -> WarmupCosineRestartLR:
    """``SOLVER.LR_SCHEDULER_NAME = "WarmupCosineRestartLR"`` (SOLVER.COSINE_RESTART_*,
    WARMUP_FACTOR/ITERS/METHOD)."""
    return WarmupCosineRestartLR(
        optimizer,
        cfg.SOLVER.COSINE_RESTART_PERIODS,
        cfg.SOLVER.COSINE_RESTART_WEIGHTS,
        min_ratio=cfg.SOLVER.COSINE_RESTART_MIN_LR_RATIO,
        warmup_factor=cfg.SOLVER.WARMUP_FACTOR,
        warmup_iters=cfg.SOLVER.WARMUP_ITERS,
        warmup_method=cfg.SOLVER.WARMUP_METHOD,
    )
