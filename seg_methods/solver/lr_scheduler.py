"""Poly learning-rate schedule (DeepLab's ``WarmupPolyLR``) that resumes with the config's
schedule.

``detectron2.projects.deeplab.lr_scheduler.WarmupPolyLR`` computes
``lr = base_lr * warmup(t) * (1 - t / max_iters) ** power`` (held at
``base_lr * constant_ending`` once the poly factor falls below it). As a plain torch scheduler
its ``state_dict`` stores every attribute, so resuming a run with a longer ``SOLVER.MAX_ITER``
restores the old ``max_iters`` and fails past it (``math domain error``). The subclass below
stores only the progress, as detectron2's own ``LRMultiplier`` does.
"""

from detectron2.projects.deeplab.lr_scheduler import WarmupPolyLR as _DeepLabWarmupPolyLR

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
