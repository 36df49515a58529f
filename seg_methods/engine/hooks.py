"""Training hooks added by seg_methods on top of detectron2's defaults, and the divergence
guards the trainer uses (loss-term recording, finite-parameter check)."""

import logging
import os
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from detectron2.engine import hooks
from detectron2.utils import comm
from torch import nn

from .results import format_metrics_table, write_metrics_json

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"


def report_results(results: Optional[Mapping], output_dir: str) -> Optional[dict]:
    """Write ``output_dir/metrics.json`` and log the table of headline metrics (main process).

    Args:
        results (Mapping or None): ``DefaultTrainer.test`` output.
        output_dir (str): folder of ``metrics.json``.

    Returns:
        dict or None: the metrics written (see :mod:`seg_methods.engine.results`); None when
        there was nothing to write or on other ranks.
    """
    if not results or not comm.is_main_process():
        return None
    path = os.path.join(output_dir, METRICS_FILE)
    metrics = write_metrics_json(results, path)
    logger.info(f"Evaluation metrics (all of them in {path}):\n" + format_metrics_table(metrics))
    return metrics


class SegEvalHook(hooks.EvalHook):
    """detectron2's ``EvalHook`` that also saves and shows each evaluation's results.

    After every evaluation (periodic and final) it writes ``output_dir/metrics.json``, logs a
    metric table, then calls each ``after_eval(results)`` callback on the main process (e.g.
    drawing predictions). The final evaluation runs only if training reached ``max_iter``:
    unlike detectron2's hook, a failure in the last iteration does not trigger it.

    Args:
        eval_period (int): evaluate every this many iterations (0: only at the end).
        eval_function (callable): no-argument function returning the nested results dict.
        output_dir (str): folder of ``metrics.json``.
        after_eval (sequence of callables): called with the results after writing them.
    """

    def __init__(
        self,
        eval_period: int,
        eval_function: Callable[[], Mapping],
        *,
        output_dir: str,
        after_eval: Sequence[Callable[[Mapping], None]] = (),
    ):
        self._output_dir = output_dir
        self._after_eval = list(after_eval)
        self.last_metrics: Optional[dict] = None

        def evaluate_and_report():
            results = eval_function()
            self.last_metrics = report_results(results, self._output_dir)
            if comm.is_main_process():
                for callback in self._after_eval:
                    callback(results)
            return results

        super().__init__(eval_period, evaluate_and_report)

    def after_train(self):
        # TrainerBase.train leaves iter == max_iter only when the loop completed.
        if self._eval_after_train and self.trainer.iter >= self.trainer.max_iter:
            self._do_eval()
        del self._func  # as detectron2: the closure references the trainer
        self._after_eval = []


# --------------------------------------------------------------------------------- divergence
class LossTermsRecorder:
    """Forward hook that keeps the loss dict of the model's last training forward.

    Method-agnostic: every meta-architecture returns a dict of loss tensors in training mode.
    The tensors are kept detached (no copy, no device sync); :meth:`describe` turns them into
    text only when an error message needs them.

    Usage::

        recorder = LossTermsRecorder()
        model.register_forward_hook(recorder)
    """

    def __init__(self):
        self.terms: Optional[Dict[str, torch.Tensor]] = None

    def __call__(self, module: nn.Module, inputs, output) -> None:
        if module.training and isinstance(output, Mapping):
            self.terms = {
                k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in output.items()
            }

    def describe(self) -> str:
        """``"loss_ce=0.6931, loss_mask=nan, ..."`` of the last training forward."""
        if not self.terms:
            return "(none recorded)"
        parts = []
        for k, v in self.terms.items():
            try:
                parts.append(f"{k}={float(v):.6g}")
            except (TypeError, ValueError, RuntimeError):  # not a scalar
                parts.append(f"{k}={v}")
        return ", ".join(parts)


def non_finite_parameters(named_parameters: Sequence[Tuple[str, torch.Tensor]]) -> List[str]:
    """Names of the parameters holding NaN or Inf.

    Fast path: one fused ``torch._foreach_norm`` over all tensors of a device (a NaN or Inf in a
    tensor makes its norm NaN or Inf) and one host sync. Only when a norm is not finite, which
    can also happen through float overflow of huge but finite weights, is each such tensor
    checked exactly with ``torch.isfinite``.

    Args:
        named_parameters (sequence of (str, Tensor)): e.g. ``list(model.named_parameters())``.

    Returns:
        list[str]: the names, in the given order (empty when every value is finite).
    """
    by_device: Dict[torch.device, List[Tuple[str, torch.Tensor]]] = {}
    for name, p in named_parameters:
        if p.numel() and (p.is_floating_point() or p.is_complex()):
            by_device.setdefault(p.device, []).append((name, p.detach()))
    suspects = []
    for items in by_device.values():
        norms = torch._foreach_norm([p for _, p in items])
        if bool(torch.isfinite(torch.stack(norms)).all()):
            continue
        suspects += [(n, p) for (n, p), norm in zip(items, norms) if not torch.isfinite(norm)]
    order = {name: i for i, (name, _) in enumerate(named_parameters)}
    bad = [n for n, p in suspects if not bool(torch.isfinite(p).all())]
    return sorted(bad, key=order.__getitem__)
