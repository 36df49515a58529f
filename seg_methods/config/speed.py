"""Training-speed switches (``cfg.SPEED.*``), read by :mod:`seg_methods.engine.speed` and the solver.

Each switch is measured by ``benchmarks/train_step.py`` (seconds per training step with the switch
on and off, in one run). Only the fused optimizer is on by default: it computes the same float32
update (rounding-level differences) and measured 1.09-1.15x faster steps for five of the nine
synthetic configs and within 2% for the other four. bf16 autocast, channels_last and
``torch.compile`` are off by default: the first two are not bit-identical to the float32 path
(check bf16's accuracy at equal iterations before turning it on in a recipe), and compiling Mask2Former
took 21 minutes on this shared 2-core machine for no faster step. Configs turn them on. None of
them changes the model's parameters or checkpoint keys.
"""

from detectron2.config import CfgNode as CN


def add_speed_config(cfg):
    """Add ``cfg.SPEED``.

    * ``BF16_AUTOCAST``: run the training forward under ``torch.autocast(<device>,
      dtype=torch.bfloat16)`` (oneDNN bf16 kernels on AVX-512-bf16 CPUs). Criteria (every
      submodule named ``criterion`` or deriving from ``WeightedCriterion``, which includes the
      Hungarian matcher they call) run in float32 with autocast off, and the returned losses are
      float32. Evaluation is not affected.
    * ``CHANNELS_LAST``: convert the model to ``torch.channels_last`` memory format.
    * ``COMPILE.ENABLED``: ``torch.compile`` the submodules named in ``COMPILE.MODULES`` (dotted
      names; the names a meta-architecture lacks are skipped, none found is an error) in place,
      so parameter names and checkpoints are unchanged. ``COMPILE.MODE`` is ``torch.compile``'s
      ``mode``; ``COMPILE.DYNAMIC`` its ``dynamic`` (training sizes vary with the multi-scale
      resize).
    * ``OPTIMIZER_IMPL``: "fused" (default), "foreach", "for-loop" or "default" (PyTorch's
      choice: the per-parameter for-loop on the CPU, foreach on CUDA) implementation of AdamW /
      SGD (same update, different rounding order; "foreach" equals "for-loop" bit for bit on
      the CPU).
    """
    cfg.SPEED = CN()
    cfg.SPEED.BF16_AUTOCAST = False
    cfg.SPEED.BF16_AUTOCAST_MODULES = []
    cfg.SPEED.CHANNELS_LAST = False
    cfg.SPEED.COMPILE = CN()
    cfg.SPEED.COMPILE.ENABLED = False
    cfg.SPEED.COMPILE.MODULES = [
        "backbone",
        "sem_seg_head.pixel_decoder",
        "sem_seg_head.predictor",
    ]
    cfg.SPEED.COMPILE.MODE = "default"
    cfg.SPEED.COMPILE.DYNAMIC = True
    cfg.SPEED.OPTIMIZER_IMPL = "fused"
    return cfg
