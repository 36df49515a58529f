"""Training hooks added by seg_methods on top of detectron2's defaults."""

import logging
import os
from typing import Callable, Mapping, Optional, Sequence

from detectron2.engine import hooks
from detectron2.utils import comm

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
