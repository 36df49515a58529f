"""Trainer, config setup and the entry points ``train_net.py`` wires (train, evaluate).

:class:`Trainer` is detectron2's ``DefaultTrainer`` with seg_methods' components:

* data: the mapper named by ``cfg.INPUT.DATASET_MAPPER_NAME`` (train) and its test mode;
* solver: :func:`seg_methods.solver.build_optimizer` / ``build_lr_scheduler``;
* evaluation: :func:`seg_methods.evaluation.build_evaluator`;
* checkpoints: ``SegCheckpointer`` (``seg_methods.utils.checkpoint``: restricted unpickler,
  errors naming mismatched keys);
* hooks: detectron2's defaults (timer, LR, checkpointer, writers) with the ``EvalHook``
  replaced by :class:`SegEvalHook`, which writes ``OUTPUT_DIR/metrics.json``, logs a metric table
  and draws the first ``cfg.TEST.NUM_VIS_IMAGES`` test images to ``OUTPUT_DIR/vis``, and the
  ``PeriodicWriter`` replaced by :class:`SegPeriodicWriter`, which also writes after the first
  iterations (0, 1, 2, 4, 9) so that the progress line (:class:`SegMetricPrinter`: iter/max,
  iterations/s, ETA from the mean recent wall-clock rate) appears at once;
* speed (``cfg.SPEED``, :mod:`seg_methods.engine.speed`): channels_last and ``torch.compile``
  applied in :meth:`Trainer.build_model`, bf16 autocast of the training forward with the
  criteria in float32 (:class:`TrainingAutocast`), the optimizer implementation in
  :func:`seg_methods.solver.build_optimizer`.

detectron2's per-iteration JSON log goes to ``OUTPUT_DIR/training_metrics.json`` (JSON lines)
because ``metrics.json`` holds the evaluation results.

Divergence guard (every method): training stops with a ``FloatingPointError`` naming the
iteration and the loss terms when (a) the loss is NaN/Inf (detectron2's check, before the
optimizer step), (b) after the optimizer step a parameter holds NaN/Inf (checked every
iteration with one fused norm per device, see :func:`~seg_methods.engine.hooks.
non_finite_parameters`; the message names the parameters), so that the next forward, and its
Hungarian matching, never runs on diverged weights, or (c) the forward itself meets non-finite
values before the loss exists (the shared matcher raises ``FloatingPointError`` on a non-finite
cost matrix; scipy's "invalid numeric entries" error of any other matcher is turned into one);
the message then gives the loss terms of the last completed iteration.

Weights: ``evaluate_checkpoint`` refuses to evaluate random weights (empty ``MODEL.WEIGHTS``,
nothing to resume from) unless ``allow_random_weights`` (``train_net.py --random-weights``);
``resume_fallback`` (``--resume-fallback``) resumes from the previous checkpoint when the last
one is truncated (see :class:`~seg_methods.utils.checkpoint.SegCheckpointer`).
"""

import logging
import os
import weakref
from typing import Optional

import torch
from detectron2.engine import DefaultTrainer, default_setup, hooks
from detectron2.utils import comm
from detectron2.utils.events import JSONWriter, TensorboardXWriter
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger

from ..config import get_cfg
from ..data.build import build_dataset_mapper, build_test_loader, build_train_loader
from ..evaluation import build_evaluator
from ..evaluation.requirements import check_evaluation_requirements
from ..solver import build_lr_scheduler, build_optimizer
from ..utils.checkpoint import SegCheckpointer, require_weights
from .hooks import (
    LossTermsRecorder,
    SegEvalHook,
    SegMetricPrinter,
    SegPeriodicWriter,
    non_finite_parameters,
    report_results,
)
from .launch import broadcast_buffers, cpu_capable_ddp
from .speed import TrainingAutocast, prepare_model_for_speed
from .visualization import visualize_dataset_predictions

logger = logging.getLogger(__name__)

TRAINING_LOG_FILE = "training_metrics.json"
VIS_DIR = "vis"


def build_checkpointer(
    model,
    save_dir: str = "",
    *,
    strict: bool = False,
    resume_fallback: bool = False,
    **checkpointables,
):
    """:class:`~seg_methods.utils.checkpoint.SegCheckpointer` for ``model`` (and trainer state).

    Args:
        model (nn.Module): model to save/load.
        save_dir (str): folder of checkpoints and ``last_checkpoint``.
        strict (bool): also raise when model keys are missing from the loaded file (evaluation,
            inference). Shape mismatches always raise, naming the keys.
        resume_fallback (bool): when resuming from a truncated last checkpoint, use the newest
            readable earlier one instead of raising.
        checkpointables: extra objects saved/loaded with the model (e.g. ``trainer=``).
    """
    return SegCheckpointer(
        model, save_dir, strict=strict, resume_fallback=resume_fallback, **checkpointables
    )


def add_weights_arguments(parser):
    """Add seg_methods' weight-loading flags to a ``train_net.py``-style argument parser.

    ``--random-weights``: allow ``--eval-only`` without ``MODEL.WEIGHTS`` (random weights).
    ``--resume-fallback``: with ``--resume``, fall back to the previous checkpoint when the last
    one cannot be read.

    Returns:
        the parser.
    """
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="with --eval-only: evaluate randomly initialised weights when MODEL.WEIGHTS is "
        "empty (refused otherwise)",
    )
    parser.add_argument(
        "--resume-fallback",
        action="store_true",
        help="with --resume: if the last checkpoint is truncated or corrupt, resume from the "
        "newest readable earlier model_XXXXXXX.pth",
    )
    return parser


def resolve_device(cfg) -> str:
    """Make ``cfg`` runnable on this machine (``cfg`` must not be frozen).

    ``MODEL.DEVICE`` "cuda*" becomes "cpu" when CUDA is unavailable, and ``SOLVER.AMP`` is
    turned off on the CPU (detectron2's AMPTrainer requires CUDA); each change is logged as a
    warning. Returns the device used.
    """
    log = logging.getLogger("seg_methods")
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        log.warning(f"MODEL.DEVICE={cfg.MODEL.DEVICE} but CUDA is not available: using the CPU.")
        cfg.MODEL.DEVICE = "cpu"
    if cfg.MODEL.DEVICE == "cpu" and cfg.SOLVER.AMP.ENABLED:
        log.warning("SOLVER.AMP.ENABLED=True needs CUDA: training in float32 on the CPU.")
        cfg.SOLVER.AMP.ENABLED = False
    return cfg.MODEL.DEVICE


def _runnable_config(cfg):
    """``cfg`` if :func:`resolve_device` would not change it, else a changed copy."""
    probe = cfg.clone()
    probe.defrost()
    resolve_device(probe)
    if probe == cfg:
        return cfg
    if cfg.is_frozen():
        probe.freeze()
    return probe


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` wired to seg_methods' mappers, solver, evaluators and checkpointer.

    Usage::

        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        results = trainer.train()  # last evaluation results (or None)

    A config asking for CUDA or AMP on a machine without CUDA is adapted by
    :func:`resolve_device` (with a warning).
    """

    def __init__(self, cfg):
        # Fail now, not after hours of training, if an evaluator cannot run on the test sets.
        check_evaluation_requirements(cfg)
        # cpu_capable_ddp: with several processes, DefaultTrainer.__init__ wraps the model in
        # DistributedDataParallel; on the CPU that needs seg_methods.engine.launch's wrapping.
        with cpu_capable_ddp():
            super().__init__(_runnable_config(cfg))
        self._autocast = None
        if self.cfg.SPEED.BF16_AUTOCAST:
            model = getattr(self.model, "module", self.model)  # unwrap DDP
            device_type = torch.device(self.cfg.MODEL.DEVICE).type
            self._autocast = TrainingAutocast(
                model, device_type=device_type, modules=self.cfg.SPEED.BF16_AUTOCAST_MODULES
            )

    def build_hooks(self):
        # DefaultTrainer.__init__ creates a DetectionCheckpointer right before calling
        # build_hooks; replace it here so that the PeriodicCheckpointer hook and
        # resume_or_load use the same (Seg)Checkpointer.
        self.checkpointer = build_checkpointer(
            self.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        ret = super().build_hooks()
        eval_idx = [i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook)]
        assert len(eval_idx) == 1, f"expected one EvalHook in DefaultTrainer's hooks, got {ret}"

        def test_and_save_results():
            self._last_eval_results = self.test(self.cfg, self.model)
            return self._last_eval_results

        # the progress line from the first iterations on (see SegPeriodicWriter)
        progress = None
        for i, h in enumerate(ret):
            if type(h) is hooks.PeriodicWriter:
                ret[i] = SegPeriodicWriter(h._writers, period=h._period)
                printers = [w for w in h._writers if isinstance(w, SegMetricPrinter)]
                progress = printers[0].progress if printers else progress
        # evaluations are timed and taken out of the progress line's rate, and added to its ETA
        ret[eval_idx[0]] = SegEvalHook(
            self.cfg.TEST.EVAL_PERIOD,
            test_and_save_results,
            output_dir=self.cfg.OUTPUT_DIR,
            after_eval=[lambda results: self.visualize(self.cfg, self.model)],
            progress=progress,
        )
        return ret

    def build_writers(self):
        """Console progress line (iterations/s, ETA), JSON-lines log and TensorBoard writers."""
        out = self.cfg.OUTPUT_DIR
        PathManager.mkdirs(out)  # default_setup makes it, but Trainer may be used without it
        return [
            SegMetricPrinter(self.max_iter),
            JSONWriter(os.path.join(out, TRAINING_LOG_FILE)),
            TensorboardXWriter(out),
        ]

    _ADVICE = "Lower SOLVER.BASE_LR, enable SOLVER.CLIP_GRADIENTS or check this batch's data."

    def run_step(self):
        """One detectron2 training step, then the divergence checks (see the module docstring).

        Raises:
            FloatingPointError: naming the iteration and the loss terms, when the loss, the
                forward's matching costs or the parameters after the step are NaN or Inf.
        """
        recorder = getattr(self, "_loss_recorder", None)
        if recorder is None:
            recorder = self._loss_recorder = LossTermsRecorder()
            self._trainer.model.register_forward_hook(recorder)
            model = getattr(self.model, "module", self.model)  # unwrap DDP for the names
            self._trainable_parameters = [
                (n, p) for n, p in model.named_parameters() if p.requires_grad
            ]
        previous_terms = recorder.describe()
        recorder.terms = None
        try:
            super().run_step()
        except FloatingPointError as e:
            raise FloatingPointError(self._divergence_message(e, recorder, previous_terms)) from e
        except ValueError as e:
            # scipy.optimize.linear_sum_assignment on a NaN cost (a matcher without its own
            # finite check): the forward met diverged values.
            if "invalid numeric entries" not in str(e):
                raise
            raise FloatingPointError(self._divergence_message(e, recorder, previous_terms)) from e
        finally:
            if self._autocast is not None:  # a forward that raised leaves autocast entered
                self._autocast.reset()
        bad = non_finite_parameters(self._trainable_parameters)
        if bad:
            shown = ", ".join(bad[:10]) + (f", ... ({len(bad) - 10} more)" if len(bad) > 10 else "")
            raise FloatingPointError(
                f"Training stopped: the weights diverged at iteration {self.iter}: after the "
                f"optimizer step {len(bad)} parameter tensor(s) hold NaN or Inf: {shown}. "
                f"Loss terms of iteration {self.iter}: {recorder.describe()}. {self._ADVICE}"
            )

    def _divergence_message(self, error, recorder, previous_terms: str) -> str:
        if recorder.terms is not None:  # the forward finished: the loss itself is not finite
            return (
                f"Training stopped: the loss is NaN or infinite at iteration {self.iter}. "
                f"Loss terms of iteration {self.iter}: {recorder.describe()}. {self._ADVICE} "
                f"Details: {error}"
            )
        last = (
            f"Loss terms of the last completed iteration ({self.iter - 1}): {previous_terms}."
            if self.iter > self.start_iter
            else "No iteration completed in this run."
        )
        return (
            f"Training stopped: NaN or infinite values at iteration {self.iter}, before the loss "
            f"was computed ({type(error).__name__}: {error}). {last} {self._ADVICE}"
        )

    def resume_or_load(self, resume: bool = True, *, fallback: bool = False):
        """detectron2's ``resume_or_load`` with seg_methods' resume checks.

        Args:
            resume (bool): resume from ``OUTPUT_DIR``'s last checkpoint if there is one (exact
                key/shape fit required), else load ``MODEL.WEIGHTS``.
            fallback (bool): if the last checkpoint is truncated or corrupt, resume from the
                newest readable earlier one (``train_net.py --resume-fallback``).
        """
        self.checkpointer.resume_fallback = fallback
        super().resume_or_load(resume=resume)

    def train(self):
        """Run training; returns the results of the last evaluation (None if none ran)."""
        super().train()
        return getattr(self, "_last_eval_results", None)

    # ---------------------------------------------------------------- builders
    @classmethod
    def build_model(cls, cfg):
        """detectron2's ``build_model`` then ``cfg.SPEED``'s channels_last / ``torch.compile``
        (:func:`~seg_methods.engine.speed.prepare_model_for_speed`)."""
        return prepare_model_for_speed(cfg, super().build_model(cfg))

    @classmethod
    def build_train_loader(cls, cfg):
        return build_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder: Optional[str] = None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    # ---------------------------------------------------------------- evaluation
    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """``DefaultTrainer.test`` after giving every process rank 0's buffers.

        With several processes, each evaluates its share of the test set and the evaluators
        gather the predictions; :func:`~seg_methods.engine.launch.broadcast_buffers` first makes
        every rank's BatchNorm statistics those of rank 0, whose weights are the checkpoint's.
        """
        broadcast_buffers(model)
        return super().test(cfg, model, evaluators)

    @classmethod
    def visualize(cls, cfg, model):
        """Draw the first ``cfg.TEST.NUM_VIS_IMAGES`` images of ``cfg.DATASETS.TEST[0]`` to
        ``OUTPUT_DIR/vis`` (ground truth | each prediction). Returns the written paths."""
        if cfg.TEST.NUM_VIS_IMAGES <= 0 or not comm.is_main_process():
            return []
        mapper = build_dataset_mapper(cfg, is_train=False)
        return visualize_dataset_predictions(
            cfg, model, mapper, os.path.join(cfg.OUTPUT_DIR, VIS_DIR)
        )

    @classmethod
    def evaluate(cls, cfg, model):
        """``test`` + ``OUTPUT_DIR/metrics.json`` + metric table + drawings (eval-only path).

        Returns:
            dict: the results of ``DefaultTrainer.test``.
        """
        results = cls.test(cfg, model)
        report_results(results, cfg.OUTPUT_DIR)
        cls.visualize(cfg, model)
        return results


# -------------------------------------------------------------------- entry points
def setup(args):
    """Config from ``args`` (``--config-file``, ``opts``) on top of :func:`get_cfg`, then
    detectron2's ``default_setup`` (output dir, logging, config dump, seeding with
    ``cfg.SEED``) and the "seg_methods" logger.

    Returns:
        CfgNode: the frozen config.
    """
    cfg = get_cfg()
    if args.config_file:
        cfg.merge_from_file(args.config_file, allow_unsafe=False)
    cfg.merge_from_list(args.opts)
    resolve_device(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="seg_methods")
    return cfg


def evaluate_checkpoint(
    cfg,
    resume: bool = False,
    *,
    allow_random_weights: bool = False,
    resume_fallback: bool = False,
):
    """Eval-only: build the model, load ``cfg.MODEL.WEIGHTS`` (or the last checkpoint of
    OUTPUT_DIR with ``resume``) strictly (missing keys raise), evaluate with
    :meth:`Trainer.evaluate`.

    Args:
        cfg (CfgNode): the config.
        resume (bool): evaluate OUTPUT_DIR's last checkpoint if there is one.
        allow_random_weights (bool): evaluate random weights when there is nothing to load
            (``train_net.py --random-weights``); refused otherwise.
        resume_fallback (bool): see :func:`build_checkpointer`.

    Raises:
        RandomWeightsError: nothing to load and ``allow_random_weights`` is False.
        FileNotFoundError: ``MODEL.WEIGHTS`` does not exist.
    """
    model = Trainer.build_model(cfg)
    checkpointer = build_checkpointer(
        model, save_dir=cfg.OUTPUT_DIR, strict=True, resume_fallback=resume_fallback
    )
    if not (resume and checkpointer.has_checkpoint()):
        require_weights(
            cfg.MODEL.WEIGHTS,
            allow_random_weights,
            how_to_allow="pass --random-weights (allow_random_weights=True in Python)",
        )
    checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
    check_evaluation_requirements(cfg)
    return Trainer.evaluate(cfg, model)


def train(cfg, resume: bool = False, *, resume_fallback: bool = False):
    """Train (resuming from OUTPUT_DIR's last checkpoint with ``resume``); returns the last
    evaluation results. ``resume_fallback``: see :meth:`Trainer.resume_or_load`."""
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=resume, fallback=resume_fallback)
    return trainer.train()
