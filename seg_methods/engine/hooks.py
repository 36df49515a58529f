"""Training hooks added by seg_methods on top of detectron2's defaults, the progress line, and
the divergence guards the trainer uses (loss-term recording, finite-parameter check)."""

import datetime
import logging
import os
import time
from collections import deque
from typing import Callable, Deque, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from detectron2.engine import hooks
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, get_event_storage
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
        progress (TrainingProgress, optional): told the wall time of each evaluation and how
            many remain, so that the progress line's rate and ETA account for them.
    """

    def __init__(
        self,
        eval_period: int,
        eval_function: Callable[[], Mapping],
        *,
        output_dir: str,
        after_eval: Sequence[Callable[[Mapping], None]] = (),
        progress: Optional["TrainingProgress"] = None,
    ):
        self._output_dir = output_dir
        self._progress = progress
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

    def evaluations_left(self, next_iter: int) -> int:
        """Evaluations after the one at ``next_iter``: the periodic ones before ``max_iter`` and
        the final one (detectron2's schedule)."""
        max_iter, period = self.trainer.max_iter, self._period
        periodic = (max_iter - 1) // period - next_iter // period if period > 0 else 0
        return max(periodic, 0) + (1 if next_iter < max_iter else 0)

    def _do_eval(self):
        start = time.perf_counter()
        try:
            return super()._do_eval()
        finally:
            if self._progress is not None:
                next_iter = self.trainer.iter + 1
                self._progress.add_pause(
                    time.perf_counter() - start, self.evaluations_left(next_iter)
                )

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


# ----------------------------------------------------------------------------- progress line
class TrainingProgress:
    """Iterations/s and ETA from the wall-clock times at which iterations completed.

    detectron2's ``CommonMetricPrinter`` estimates the ETA as the *median* step time (the
    ``IterationTimer``'s "time", which skips the first iterations and the time spent in
    ``after_step`` hooks) times the remaining iterations. On a shared CPU the step times are
    skewed to the right, so the median underestimates the remaining time (at iteration 19 of a
    45-iteration run here: 41 s announced, 55 s taken), and nothing is printed before iteration
    19. This estimate is the *mean* rate of the recent iterations, measured on the wall clock
    between completed iterations (hooks included), which is what the remaining time is made of.

    The first iteration is not in the rate (it carries one-off costs: allocator warm-up, lazy
    initialisation, ``torch.compile``); from the second completed iteration on there is an ETA.

    Evaluations are not training: the evaluation hook reports each one (:meth:`add_pause`), its
    time is taken out of the rate (otherwise the iterations after an evaluation would look
    slower for a whole window), and the ETA adds the evaluations still to come (the final one
    included) at the cost of the last one. Before the first evaluation their cost is unknown and
    the ETA is the training time alone.

    Args:
        max_iter (int): iterations of the run (iteration indices 0 .. max_iter - 1).
        window (int): the rate is measured over at most this many recent iterations.
        clock (callable): time source in seconds (tests pass a fake one).
    """

    def __init__(
        self, max_iter: int, window: int = 100, clock: Callable[[], float] = time.perf_counter
    ):
        self.max_iter = max_iter
        self.window = window
        self.clock = clock
        self._marks: Deque[Tuple[int, float]] = deque()  # (completed iteration, training time)
        self._paused = 0.0  # wall seconds spent in reported pauses (evaluations)
        self._pause_seconds: Optional[float] = None  # the last pause's duration
        self._pauses_left = 0

    def add_pause(self, seconds: float, pauses_left: int) -> None:
        """Report ``seconds`` of wall time spent outside training (an evaluation), with
        ``pauses_left`` more such pauses to come before the run ends."""
        self._paused += max(float(seconds), 0.0)
        self._pause_seconds = max(float(seconds), 0.0)
        self._pauses_left = max(int(pauses_left), 0)

    def mark(self, iteration: int, now: Optional[float] = None) -> None:
        """Record that ``iteration`` has just completed."""
        now = (self.clock() if now is None else now) - self._paused
        if self._marks and iteration <= self._marks[-1][0]:  # restarted (e.g. resumed) run
            self._marks.clear()
        self._marks.append((iteration, now))
        # keep the oldest mark at most ``window`` iterations back (and at least two marks)
        while len(self._marks) > 2 and iteration - self._marks[1][0] >= self.window:
            self._marks.popleft()

    def iterations_per_second(self) -> Optional[float]:
        """Mean rate over the recorded window; None before two iterations completed."""
        if len(self._marks) < 2:
            return None
        (i0, t0), (i1, t1) = self._marks[0], self._marks[-1]
        if t1 <= t0:
            return None
        return (i1 - i0) / (t1 - t0)

    def eta_seconds(self) -> Optional[float]:
        """Seconds left for iterations ``last + 1 .. max_iter - 1`` and the evaluations still to
        come (once one has been timed); None when unknown."""
        rate = self.iterations_per_second()
        if rate is None:
            return None
        seconds = max(self.max_iter - 1 - self._marks[-1][0], 0) / rate
        if self._pause_seconds is not None:
            seconds += self._pause_seconds * self._pauses_left
        return seconds


def format_seconds(seconds: float) -> str:
    """``h:mm:ss`` (whole seconds)."""
    return str(datetime.timedelta(seconds=int(round(seconds))))


class SegMetricPrinter(CommonMetricPrinter):
    """The console progress line: ``iter i/max``, iterations/s, ETA, losses, times, lr.

    Example (a CPU run)::

        iter: 19/600  it/s: 0.47  eta: 0:20:36  total_loss: 71.9  loss_ce: 4.25 ...
        step: 2.1918 s  data: 0.0780 s  lr: 0.00023572

    ``it/s`` and ``eta`` come from :class:`TrainingProgress`, which the writer hook feeds with
    every completed iteration (:meth:`mark`); without those marks the printer marks the
    iterations it writes. Losses are medians over the last ``window_size`` iterations, as in
    detectron2; ``step`` and ``data`` are the means of the IterationTimer's step time and of the
    time spent waiting for data over the same window (``data`` close to ``step`` means the data
    loader starves the step).

    Args:
        max_iter (int): iterations of the run.
        window_size (int): smoothing window of the losses and times.
        progress (TrainingProgress, optional): rate/ETA estimator (one is made if None).
    """

    def __init__(
        self,
        max_iter: int,
        window_size: int = 20,
        progress: Optional[TrainingProgress] = None,
    ):
        super().__init__(max_iter, window_size)
        self.logger = logging.getLogger("seg_methods.progress")
        self.progress = progress or TrainingProgress(max_iter)
        self._marked = False

    def mark(self, iteration: int) -> None:
        """Record the completion of ``iteration`` (called every iteration by the writer hook)."""
        self._marked = True
        self.progress.mark(iteration)

    def _get_eta(self, storage) -> Optional[str]:
        eta = self.progress.eta_seconds()
        if eta is None:
            return None
        if storage.iter < self._max_iter - 1:  # (nothing left to estimate after the last one)
            storage.put_scalar("eta_seconds", eta, smoothing_hint=False)
        return format_seconds(eta)

    def _window_mean(self, storage, key: str) -> Optional[float]:
        try:
            history = storage.history(key)
        except KeyError:
            return None
        return history.avg(storage.count_samples(key, self._window_size))

    def format_line(self, storage) -> str:
        """The progress line of the storage's current iteration."""
        iteration = storage.iter
        if not self._marked:
            self.progress.mark(iteration)
        rate = self.progress.iterations_per_second()
        eta = self._get_eta(storage)
        parts = [f"iter: {iteration}/{self._max_iter}"]
        parts.append(f"it/s: {rate:.3g}" if rate is not None else "it/s: (measuring)")
        parts.append(f"eta: {eta}" if eta is not None else "eta: (measuring)")
        for k, v in storage.histories().items():
            if "loss" in k or "[metric]" in k:
                parts.append(f"{k}: {v.median(storage.count_samples(k, self._window_size)):.4g}")
        step = self._window_mean(storage, "time")
        data = self._window_mean(storage, "data_time")
        if step is not None:
            parts.append(f"step: {step:.4f} s")
        if data is not None:
            parts.append(f"data: {data:.4f} s")
        try:
            parts.append(f"lr: {storage.history('lr').latest():.5g}")
        except KeyError:
            pass
        if torch.cuda.is_available():
            parts.append(f"max_mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}M")
        return "  ".join(parts)

    def write(self):
        storage = get_event_storage()
        if storage.iter >= self._max_iter:  # after training: nothing to report (as detectron2)
            return
        self.logger.info(self.format_line(storage))


# Iterations after which the writers run besides every ``period``-th one: a CPU user sees the
# rate and the ETA within the first iterations.
EARLY_WRITE_ITERS = (0, 1, 2, 4, 9)


class SegPeriodicWriter(hooks.PeriodicWriter):
    """detectron2's ``PeriodicWriter`` whose progress writers (those with a ``mark(iteration)``
    method: :class:`SegMetricPrinter`) are told of every completed iteration and also write
    after the iterations ``early_iters`` (counted from the run's first iteration). The other
    writers (JSON lines, TensorBoard) keep detectron2's period.

    Args:
        writers (list[EventWriter]): the writers.
        period (int): write every ``period`` iterations (and after the last one).
        early_iters (iterable[int]): further iterations after which to write.
    """

    def __init__(self, writers, period: int = 20, early_iters: Iterable[int] = EARLY_WRITE_ITERS):
        super().__init__(writers, period)
        self._early_iters = set(early_iters)

    def after_step(self):
        iteration = self.trainer.iter
        progress_writers = [w for w in self._writers if hasattr(w, "mark")]
        for w in progress_writers:
            w.mark(iteration)
        periodic = (iteration + 1) % self._period == 0 or iteration == self.trainer.max_iter - 1
        if not periodic and iteration - self.trainer.start_iter in self._early_iters:
            for w in progress_writers:
                w.write()
        super().after_step()
