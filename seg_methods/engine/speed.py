"""Training-speed options of ``cfg.SPEED`` (see :mod:`seg_methods.config.speed`), applied to any
meta-architecture.

* :func:`prepare_model_for_speed`: channels_last and ``torch.compile`` of named submodules, in
  place (parameter names and checkpoints unchanged);
* :class:`TrainingAutocast`: bf16 autocast of the training forward, with every criterion (and the
  matcher it calls) kept in float32;
* ``SPEED.OPTIMIZER_IMPL`` (foreach / fused optimizer) is applied by
  :func:`seg_methods.solver.build_optimizer`.

The trainer applies them (:class:`~seg_methods.engine.trainer.Trainer`); ``benchmarks/
train_step.py`` measures each one.
"""

import logging
from typing import Any, List, Mapping, Sequence, Tuple

import torch
from torch import nn

from ..modeling.criterion.base import WeightedCriterion

logger = logging.getLogger(__name__)

__all__ = [
    "TrainingAutocast",
    "compile_submodules",
    "criterion_modules",
    "prepare_model_for_speed",
    "to_float32",
]


def _get_submodule(model: nn.Module, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def compile_submodules(
    model: nn.Module, names: Sequence[str], *, mode: str = "default", dynamic=None
) -> List[str]:
    """``torch.compile`` the submodules ``names`` of ``model`` in place (``nn.Module.compile``).

    Compiling in place keeps the parameter names (no ``_orig_mod.`` prefix), so checkpoints and
    the optimizer's parameter groups are unchanged. Compilation itself happens at the first call
    of each submodule (and again for each new input signature, e.g. train vs eval mode).

    Args:
        model (nn.Module): the model (not DDP-wrapped).
        names (sequence[str]): dotted submodule names; names ``model`` lacks are skipped.
        mode (str): ``torch.compile``'s mode.
        dynamic (bool or None): ``torch.compile``'s dynamic-shape setting.

    Returns:
        list[str]: the names compiled.

    Raises:
        ValueError: none of ``names`` exists in ``model`` (naming ``SPEED.COMPILE.MODULES``).
    """
    found = [n for n in names if _get_submodule(model, n) is not None]
    if not found:
        children = [n for n, _ in model.named_children()]
        raise ValueError(
            f"SPEED.COMPILE.MODULES={list(names)}: none of these submodules exists in "
            f"{type(model).__name__} (its children: {children})."
        )
    for n in found:
        model.get_submodule(n).compile(mode=mode, dynamic=dynamic)
    skipped = sorted(set(names) - set(found))
    logger.info(
        f"torch.compile (mode={mode}, dynamic={dynamic}) of {found}"
        + (f"; not in {type(model).__name__}: {skipped}" if skipped else "")
    )
    return found


def prepare_model_for_speed(cfg, model: nn.Module) -> nn.Module:
    """Apply ``SPEED.CHANNELS_LAST`` and ``SPEED.COMPILE`` to ``model`` in place.

    Args:
        cfg (CfgNode): config with ``SPEED``.
        model (nn.Module): freshly built model (before the optimizer and DDP wrapping).

    Returns:
        nn.Module: the same ``model``.
    """
    if cfg.SPEED.CHANNELS_LAST:
        # 4-d parameters and buffers (convolution weights) become channels_last; convolutions
        # then produce channels_last outputs, which oneDNN runs without layout reorders.
        model.to(memory_format=torch.channels_last)
    if cfg.SPEED.COMPILE.ENABLED:
        compile_submodules(
            model,
            cfg.SPEED.COMPILE.MODULES,
            mode=cfg.SPEED.COMPILE.MODE,
            dynamic=cfg.SPEED.COMPILE.DYNAMIC,
        )
    return model


def to_float32(obj: Any) -> Any:
    """``obj`` with every floating-point tensor (in nested dicts, lists, tuples) cast to float32.

    Other values (integer tensors, strings, Instances, ...) are returned unchanged.
    """
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() and obj.dtype != torch.float32 else obj
    if isinstance(obj, Mapping):
        return {k: to_float32(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(to_float32(v) for v in obj)
    return obj


def criterion_modules(model: nn.Module) -> List[nn.Module]:
    """The loss modules of ``model``: submodules deriving from ``WeightedCriterion`` or named
    ``criterion`` (outermost ones only)."""
    found: List[nn.Module] = []
    for name, module in model.named_modules():
        if isinstance(module, WeightedCriterion) or name.rsplit(".", 1)[-1] == "criterion":
            if not any(module in set(c.modules()) for c in found):
                found.append(module)
    return found


class TrainingAutocast:
    """bf16 autocast of a model's training forward (or of some submodules), criteria in float32.

    Installed with forward hooks, so the model, its ``state_dict`` and DDP wrapping are
    untouched. Each *region* (the whole model, or the submodules ``modules`` names) enters
    ``torch.autocast(device, bfloat16)`` in its forward pre-hook and, in its forward hook,
    leaves it and casts its floating outputs to float32 (so the code after a region, and the
    losses the model returns, see float32). Each criterion met inside a region casts its
    floating inputs to float32 and runs with autocast disabled: the Hungarian matcher and the
    losses run in float32, as without autocast. Only training-mode forwards are affected;
    evaluation runs in float32.

    Usage::

        autocast = TrainingAutocast(model, device_type="cpu")
        loss_dict = model(batch)        # forward in bf16, losses in float32
        autocast.reset()                # after an exception inside the forward
        autocast.remove()               # uninstall

    Args:
        model (nn.Module): the model (not DDP-wrapped).
        device_type (str): "cpu" or "cuda".
        dtype (torch.dtype): the low-precision type (bfloat16).
        modules (sequence[str]): dotted names of the submodules to autocast; empty: the whole
            model. Names the model lacks are skipped; none found raises ValueError naming
            ``SPEED.BF16_AUTOCAST_MODULES``.
    """

    def __init__(
        self,
        model: nn.Module,
        device_type: str = "cpu",
        dtype=torch.bfloat16,
        modules: Sequence[str] = (),
    ):
        self.device_type = device_type
        self.dtype = dtype
        # entered contexts, innermost last, with the module that entered each
        self._stack: List[Tuple[nn.Module, Any]] = []
        if modules:
            self.regions = [m for m in (_get_submodule(model, n) for n in modules) if m is not None]
            if not self.regions:
                raise ValueError(
                    f"SPEED.BF16_AUTOCAST_MODULES={list(modules)}: none of these submodules "
                    f"exists in {type(model).__name__}"
                )
        else:
            self.regions = [model]
        self._handles = []
        for r in self.regions:
            self._handles.append(r.register_forward_pre_hook(self._enter_region))
            self._handles.append(r.register_forward_hook(self._exit_region))
        self.criteria = criterion_modules(model)
        for c in self.criteria:
            self._handles.append(
                c.register_forward_pre_hook(self._enter_criterion, with_kwargs=True)
            )
            self._handles.append(c.register_forward_hook(self._exit_criterion))

    def _push(self, module: nn.Module, ctx) -> None:
        ctx.__enter__()
        self._stack.append((module, ctx))

    def _pop(self, module: nn.Module) -> bool:
        if self._stack and self._stack[-1][0] is module:
            self._stack.pop()[1].__exit__(None, None, None)
            return True
        return False

    def _enter_region(self, module, args):
        if module.training:
            self._push(module, torch.autocast(self.device_type, dtype=self.dtype))

    def _exit_region(self, module, args, output):
        if self._pop(module):
            return to_float32(output)
        return None

    def _enter_criterion(self, module, args, kwargs):
        if self._stack:  # inside an autocast training forward
            self._push(module, torch.autocast(self.device_type, enabled=False))
            return to_float32(args), to_float32(kwargs)
        return None

    def _exit_criterion(self, module, args, output):
        self._pop(module)
        return None

    def reset(self) -> None:
        """Leave every autocast context still entered (a forward that raised)."""
        while self._stack:
            self._stack.pop()[1].__exit__(None, None, None)

    def remove(self) -> None:
        """Remove the hooks (and leave any entered context)."""
        self.reset()
        for h in self._handles:
            h.remove()
        self._handles = []
