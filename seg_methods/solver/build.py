"""Optimizer and learning-rate schedule from config.

Parameter groups follow Mask2Former's recipe:

* every parameter starts with ``SOLVER.BASE_LR`` and ``SOLVER.WEIGHT_DECAY``;
* parameters whose name starts with ``backbone.`` get ``lr * SOLVER.BACKBONE_MULTIPLIER``;
* parameters whose name contains a substring of ``SOLVER.LR_MULTIPLIERS`` (``[[substring,
  factor], ...]``, mmcv's ``paramwise_cfg.custom_keys`` with ``lr_mult``) get ``lr * factor``;
  of several matching substrings the longest applies (mmcv's rule);
* parameters of normalization layers get ``SOLVER.WEIGHT_DECAY_NORM`` (detectron2 default 0);
* embeddings (``nn.Embedding`` modules and parameters whose name contains one of
  :data:`EMBED_PARAM_KEYWORDS`) get ``SOLVER.WEIGHT_DECAY_EMBED`` (default 0);
* biases follow detectron2's legacy ``BIAS_LR_FACTOR`` / ``WEIGHT_DECAY_BIAS`` (neutral by
  default).

As in Mask2Former, only ``nn.Embedding`` modules and Swin's position tables count as embeddings;
an embedding stored as a raw ``nn.Parameter`` (the pixel decoder's ``level_embed``) is decayed
like any other weight. (Mask2Former hard-codes 0 for the Swin tables; here they follow
``WEIGHT_DECAY_EMBED``, whose default is 0.)

Gradient clipping: ``CLIP_TYPE == "full_model"`` clips the global norm of all parameters
together (Mask2Former's setting); "value"/"norm" use detectron2's per-parameter clipping.
"""

import logging
from typing import Any, Callable, Dict, List, Sequence, Tuple, Type

import torch
from detectron2.config import CfgNode
from detectron2.layers import CycleBatchNormList, FrozenBatchNorm2d, NaiveSyncBatchNorm
from detectron2.layers.batch_norm import LayerNorm as D2LayerNorm
from detectron2.solver import build_lr_scheduler as _build_d2_lr_scheduler
from detectron2.solver.build import maybe_add_gradient_clipping, reduce_param_groups
from torch import nn

from .lr_scheduler import build_warmup_cosine_restart_lr, build_warmup_poly_lr

logger = logging.getLogger(__name__)

# Normalization layers: every torch norm plus detectron2's own (get_norm's "LN", "naiveSyncBN",
# "FrozenBN" - the last has no parameters but is listed for completeness).
NORM_MODULE_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    NaiveSyncBatchNorm,
    CycleBatchNormList,
    FrozenBatchNorm2d,
    D2LayerNorm,
)

# Substrings of parameter names treated as embeddings (no weight decay by default).
# (ViTs: timm's "pos_embed", "cls_token" and DeiT's "dist_token", which mmseg-based recipes such as
# RegProxy's exclude from weight decay.)
EMBED_PARAM_KEYWORDS = (
    "relative_position_bias_table",
    "absolute_pos_embed",
    "pos_embed",
    "cls_token",
    "dist_token",
)


def get_seg_optimizer_params(
    model: nn.Module,
    *,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: float,
    weight_decay_embed: float,
    backbone_multiplier: float = 1.0,
    bias_lr_factor: float = 1.0,
    weight_decay_bias=None,
    lr_multipliers: Sequence[Tuple[str, float]] = (),
) -> List[Dict[str, Any]]:
    """Parameter groups with the rules of the module docstring.

    Args:
        model (nn.Module): the model; frozen parameters (``requires_grad=False``) are skipped and
            shared parameters appear once.
        base_lr (float): learning rate of ordinary parameters.
        weight_decay (float): weight decay of ordinary parameters.
        weight_decay_norm (float): weight decay of normalization-layer parameters.
        weight_decay_embed (float): weight decay of embeddings.
        backbone_multiplier (float): lr factor of parameters named ``backbone.*``.
        bias_lr_factor (float): lr factor of biases (not of norm layers).
        weight_decay_bias (float or None): weight decay of biases (None: ``weight_decay``).
        lr_multipliers (sequence of (str, float)): name substrings and their lr factors; a
            parameter gets the factor of the longest substring its full name contains.

    Returns:
        list[dict]: groups with keys "params", "lr", "weight_decay"; parameters with identical
        hyper-parameters share a group.
    """
    # longest first, so that the first match is the longest (mmcv's custom_keys order)
    name_factors = sorted(_check_lr_multipliers(lr_multipliers), key=lambda kv: -len(kv[0]))
    groups: List[Dict[str, Any]] = []
    seen = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or param in seen:
                continue
            seen.add(param)
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            lr, wd = base_lr, weight_decay
            if full_name.startswith("backbone."):
                lr *= backbone_multiplier
            for key, factor in name_factors:
                if key in full_name:
                    lr *= factor
                    break
            if isinstance(module, NORM_MODULE_TYPES):
                wd = weight_decay_norm
            elif isinstance(module, nn.Embedding) or any(
                k in full_name for k in EMBED_PARAM_KEYWORDS
            ):
                wd = weight_decay_embed
            elif param_name == "bias":
                lr *= bias_lr_factor
                if weight_decay_bias is not None:
                    wd = weight_decay_bias
            groups.append({"params": [param], "lr": lr, "weight_decay": wd})
    return reduce_param_groups(groups)


def _check_lr_multipliers(entries) -> List[Tuple[str, float]]:
    """``SOLVER.LR_MULTIPLIERS`` as a list of (substring, factor); ValueError naming the key on
    anything else."""
    out = []
    for entry in entries:
        if (
            not isinstance(entry, (list, tuple))
            or len(entry) != 2
            or not isinstance(entry[0], str)
            or not entry[0]
            or isinstance(entry[1], bool)
            or not isinstance(entry[1], (int, float))
            or entry[1] < 0
        ):
            raise ValueError(
                "SOLVER.LR_MULTIPLIERS must be a list of [name_substring, factor] pairs with a "
                f"non-empty substring and a factor >= 0; got entry {entry!r}"
            )
        out.append((entry[0], float(entry[1])))
    return out


def _full_model_clipping(optimizer_cls: Type[torch.optim.Optimizer], cfg: CfgNode):
    """Subclass of ``optimizer_cls`` whose ``step`` first clips the global gradient norm of all
    parameters (every group together) to ``CLIP_VALUE``."""
    max_norm = cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE
    norm_type = cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE

    class FullModelGradientClipping(optimizer_cls):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)
            return super().step(closure=closure)

    FullModelGradientClipping.__name__ = optimizer_cls.__name__ + "FullModelGradientClipping"
    FullModelGradientClipping.__qualname__ = FullModelGradientClipping.__name__
    return FullModelGradientClipping


def _per_param_clipping(optimizer_cls, cfg):
    return maybe_add_gradient_clipping(cfg, optimizer_cls)


# SOLVER.CLIP_GRADIENTS.CLIP_TYPE -> (optimizer class, cfg) -> optimizer class with clipping.
GRADIENT_CLIPPERS: Dict[str, Callable] = {
    "full_model": _full_model_clipping,
    "value": _per_param_clipping,
    "norm": _per_param_clipping,
}

# SOLVER.OPTIMIZER -> (optimizer class, extra constructor kwargs from cfg).
OPTIMIZERS: Dict[str, Callable[[CfgNode], tuple]] = {
    "ADAMW": lambda cfg: (torch.optim.AdamW, {}),
    "SGD": lambda cfg: (
        torch.optim.SGD,
        {"momentum": cfg.SOLVER.MOMENTUM, "nesterov": cfg.SOLVER.NESTEROV},
    ),
}


# SPEED.OPTIMIZER_IMPL -> optimizer constructor kwargs choosing PyTorch's implementation (the
# same update; "foreach" and "fused" batch the per-parameter loop, with a different rounding order).
# "default" is PyTorch's own choice (the for-loop on the CPU, foreach on CUDA).
OPTIMIZER_IMPLS: Dict[str, Dict[str, bool]] = {
    "default": {},
    "for-loop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}


def _lookup(table: Dict[str, Any], key: str, cfg_key: str):
    if key not in table:
        raise KeyError(f"Unknown {cfg_key} '{key}'. Supported: {sorted(table)}")
    return table[key]


def build_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """Build ``SOLVER.OPTIMIZER`` ("ADAMW" or "SGD") over the parameter groups of
    :func:`get_seg_optimizer_params`, with gradient clipping when
    ``SOLVER.CLIP_GRADIENTS.ENABLED``, in the implementation ``SPEED.OPTIMIZER_IMPL`` names
    (see :data:`OPTIMIZER_IMPLS`).

    Args:
        cfg (CfgNode): config with the solver keys of ``add_common_config``.
        model (nn.Module): the (not yet DDP-wrapped) model.

    Returns:
        torch.optim.Optimizer
    """
    params = get_seg_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        weight_decay_embed=cfg.SOLVER.WEIGHT_DECAY_EMBED,
        backbone_multiplier=cfg.SOLVER.BACKBONE_MULTIPLIER,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        lr_multipliers=cfg.SOLVER.LR_MULTIPLIERS,
    )
    optimizer_cls, extra = _lookup(OPTIMIZERS, cfg.SOLVER.OPTIMIZER.upper(), "SOLVER.OPTIMIZER")(
        cfg
    )
    extra.update(_lookup(OPTIMIZER_IMPLS, cfg.SPEED.OPTIMIZER_IMPL, "SPEED.OPTIMIZER_IMPL"))
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED:
        clipper = _lookup(GRADIENT_CLIPPERS, clip.CLIP_TYPE, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE")
        optimizer_cls = clipper(optimizer_cls, cfg)
    return optimizer_cls(
        params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY, **extra
    )


# SOLVER.LR_SCHEDULER_NAME -> builder(cfg, optimizer). detectron2's builder covers its own
# schedules; WarmupPolyLR is detectron2.projects.deeplab's (POLY_LR_POWER,
# POLY_LR_CONSTANT_ENDING), with a resume-safe state_dict (see lr_scheduler.py).
LR_SCHEDULERS: Dict[str, Callable] = {
    "WarmupMultiStepLR": _build_d2_lr_scheduler,
    "WarmupCosineLR": _build_d2_lr_scheduler,
    "WarmupStepWithFixedGammaLR": _build_d2_lr_scheduler,
    "WarmupPolyLR": build_warmup_poly_lr,
    "WarmupCosineRestartLR": build_warmup_cosine_restart_lr,
}


def build_lr_scheduler(cfg: CfgNode, optimizer: torch.optim.Optimizer):
    """Build the schedule named by ``SOLVER.LR_SCHEDULER_NAME`` (see :data:`LR_SCHEDULERS`).

    Returns:
        torch.optim.lr_scheduler.LRScheduler: stepped once per iteration by detectron2's
        ``LRScheduler`` hook.
    """
    name = cfg.SOLVER.LR_SCHEDULER_NAME
    return _lookup(LR_SCHEDULERS, name, "SOLVER.LR_SCHEDULER_NAME")(cfg, optimizer)
