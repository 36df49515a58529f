"""Divergence stops training with the iteration and the loss terms, whichever method runs.

* a parameter turning NaN in the optimizer step (NaN gradients injected after backward) is
  caught right after that step, before the next forward (and its matching) runs;
* a huge learning rate (finite but enormous weights, non-finite predictions) is caught by the
  matcher's finite check (Mask2Former's shared HungarianMatcher) or, for a matcher without one
  (CMT-DeepLab's PQ-style matching), by translating scipy's error; never a scipy ValueError;
* the fused finite check itself: exact, names the tensors, no false alarm on float overflow.
"""

import os

import pytest
import torch
from detectron2.engine import HookBase
from detectron2.modeling import META_ARCH_REGISTRY
from scipy.optimize import linear_sum_assignment

from seg_methods.config import get_cfg
from seg_methods.engine import Trainer
from seg_methods.engine.hooks import LossTermsRecorder, non_finite_parameters
from seg_methods.modeling.matcher import HungarianMatcher

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = {
    "mask2former": "configs/quick_schedules/mask2former_synthetic_panoptic_instant_test.yaml",
    "cmt_deeplab": "configs/quick_schedules/cmt_deeplab_synthetic_panoptic_instant_test.yaml",
}


class InjectNaNGradient(HookBase):
    """Make one gradient entry of parameter ``name`` NaN in the backward of iteration ``at``
    (a one-shot tensor hook registered before that step)."""

    def __init__(self, name: str, at: int):
        self.name, self.at = name, at

    def before_step(self):
        if self.trainer.iter != self.at:
            return
        model = getattr(self.trainer.model, "module", self.trainer.model)
        param = dict(model.named_parameters())[self.name]
        handle = None

        def poison(grad):
            handle.remove()
            grad = grad.clone()
            grad.view(-1)[0] = float("nan")
            return grad

        handle = param.register_hook(poison)


def _quick_cfg(method, tiny_synthetic, tmp_path, **opts):
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(REPO, QUICK[method]))
    base = {
        "DATASETS.TRAIN": (tiny_synthetic["panoptic_train"],),
        "DATASETS.TEST": (),
        "INPUT.MIN_SIZE_TRAIN": (64,),
        "INPUT.MAX_SIZE_TRAIN": 64,
        "SOLVER.IMS_PER_BATCH": 2,
        "SOLVER.MAX_ITER": 4,
        "SOLVER.WARMUP_ITERS": 0,
        "SOLVER.CHECKPOINT_PERIOD": 1,
        "DATALOADER.NUM_WORKERS": 0,
        "MODEL.DEVICE": "cpu",
        "TEST.NUM_VIS_IMAGES": 0,
        "OUTPUT_DIR": str(tmp_path / "out"),
    }
    base.update(opts)
    for k, v in base.items():
        cfg.merge_from_list([k, v])
    return cfg


def _first_param_name(trainer):
    model = getattr(trainer.model, "module", trainer.model)
    return next(n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("method", sorted(QUICK))
def test_nan_weights_after_the_step_stop_training(method, tiny_synthetic, tmp_path):
    cfg = _quick_cfg(method, tiny_synthetic, tmp_path)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    name = _first_param_name(trainer)
    trainer.register_hooks([InjectNaNGradient(name, at=1)])
    calls = []
    trainer._trainer.model.register_forward_pre_hook(lambda m, i: calls.append(trainer.iter))
    with pytest.raises(FloatingPointError) as e:
        trainer.train()
    msg = str(e.value)
    assert "weights diverged at iteration 1" in msg, msg
    assert name in msg
    assert "Loss terms of iteration 1: loss_" in msg and "=nan" not in msg
    assert calls == [0, 1]  # no forward (and no matching) ran on the NaN weights
    # the diverged weights were not checkpointed
    out = cfg.OUTPUT_DIR
    assert os.path.isfile(os.path.join(out, "model_0000000.pth"))
    assert not os.path.exists(os.path.join(out, "model_0000001.pth"))


@pytest.mark.parametrize("method", sorted(QUICK))
def test_huge_learning_rate_stops_with_iteration_and_loss_terms(method, tiny_synthetic, tmp_path):
    cfg = _quick_cfg(method, tiny_synthetic, tmp_path, **{"SOLVER.BASE_LR": 1e6})
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    try:
        trainer.train()
    except FloatingPointError as e:
        msg = str(e)
    except ValueError as e:  # pragma: no cover - the failure this test guards against
        pytest.fail(f"a ValueError escaped instead of a FloatingPointError: {e}")
    else:
        pytest.fail("training with SOLVER.BASE_LR 1e6 did not stop")
    it = trainer.iter
    assert f"at iteration {it}" in msg, msg
    assert "Loss terms of " in msg and "loss_" in msg, msg
    assert "SOLVER.BASE_LR" in msg


def test_matcher_raises_floating_point_error_on_non_finite_costs():
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=16)
    logits = torch.randn(1, 4, 3)
    logits[0, 2, 1] = float("nan")
    outputs = {"pred_logits": logits, "pred_masks": torch.randn(1, 4, 8, 8)}
    targets = [{"labels": torch.tensor([0, 1]), "masks": torch.rand(2, 8, 8) > 0.5}]
    with pytest.raises(FloatingPointError, match="image 0 .*NaN or Inf"):
        matcher(outputs, targets)
    outputs["pred_logits"] = torch.randn(1, 4, 3)
    assert len(matcher(outputs, targets)[0][0]) == 2  # finite costs still match


@pytest.fixture
def scipy_nan_arch():
    """EngineTestOracle whose loss runs scipy's assignment on a NaN cost from iteration 1."""
    name = "EngineTestScipyNaN"
    if name not in META_ARCH_REGISTRY:
        base = META_ARCH_REGISTRY.get("EngineTestOracle")

        class EngineTestScipyNaN(base):
            def losses(self, logits, batched_inputs):
                out = super().losses(logits, batched_inputs)
                if self.calls >= 2:
                    linear_sum_assignment(torch.full((2, 2), float("nan")).numpy())
                return out

        META_ARCH_REGISTRY.register(EngineTestScipyNaN)
    return name


def test_scipy_error_of_any_matcher_becomes_floating_point_error(engine_cfg, scipy_nan_arch):
    engine_cfg.MODEL.META_ARCHITECTURE = scipy_nan_arch
    engine_cfg.SOLVER.MAX_ITER = 4
    trainer = Trainer(engine_cfg)
    with pytest.raises(FloatingPointError) as e:
        trainer.train()
    msg = str(e.value)
    assert "NaN or infinite values at iteration 1, before the loss was computed" in msg
    assert "invalid numeric entries" in msg
    assert "Loss terms of the last completed iteration (0): loss_ce=" in msg
    assert isinstance(e.value.__cause__, ValueError)


def test_nan_loss_names_iteration_and_terms(engine_cfg):
    engine_cfg.MODEL.META_ARCHITECTURE = "EngineTestNaN"
    engine_cfg.SOLVER.MAX_ITER = 4
    with pytest.raises(FloatingPointError) as e:
        Trainer(engine_cfg).train()
    msg = str(e.value)
    assert "the loss is NaN or infinite at iteration 1" in msg
    assert "Loss terms of iteration 1: loss_ce=nan, loss_mask=" in msg


def test_non_finite_parameters_is_exact():
    a = torch.nn.Parameter(torch.ones(3, 4))
    b = torch.nn.Parameter(torch.full((5,), 3e38))  # finite, but its L2 norm overflows
    c = torch.nn.Parameter(torch.zeros(2))
    d = torch.nn.Parameter(torch.ones(0))  # empty
    named = [("a", a), ("b", b), ("c", c), ("d", d)]
    assert non_finite_parameters(named) == []  # no false alarm on overflow
    with torch.no_grad():
        c[1] = float("-inf")
        a[2, 3] = float("nan")
    assert non_finite_parameters(named) == ["a", "c"]  # in model order


def test_loss_terms_recorder_keeps_training_outputs_only():
    rec = LossTermsRecorder()
    m = torch.nn.Linear(2, 2)
    m.register_forward_hook(lambda mod, i, o: rec(mod, i, {"loss_x": o.sum()}))
    m(torch.ones(1, 2))
    assert rec.describe().startswith("loss_x=")
    m.eval()
    rec.terms = None
    m(torch.ones(1, 2))
    assert rec.terms is None and rec.describe() == "(none recorded)"
