"""Optimizer (AdamW/SGD with per-group lr and weight decay, gradient clipping) and LR schedules."""

from .build import (  # noqa: F401
    EMBED_PARAM_KEYWORDS,
    GRADIENT_CLIPPERS,
    LR_SCHEDULERS,
    NORM_MODULE_TYPES,
    OPTIMIZER_IMPLS,
    OPTIMIZERS,
    build_lr_scheduler,
    build_optimizer,
    get_seg_optimizer_params,
)
from .lr_scheduler import WarmupPolyLR, build_warmup_poly_lr  # noqa: F401
