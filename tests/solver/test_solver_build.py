"""Optimizer parameter groups, gradient clipping and LR schedules."""

import math

import pytest
import torch
from detectron2.layers.batch_norm import LayerNorm as D2LayerNorm
from torch import nn

from seg_methods.config import get_cfg
from seg_methods.solver import build_lr_scheduler, build_optimizer


class _Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(3, 2))
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, 4))


class _Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.gn = nn.GroupNorm(2, 4)
        self.d2ln = D2LayerNorm(4)
        self.query_feat = nn.Embedding(5, 4)
        self.query_embed = nn.Embedding(5, 4)
        self.level_embed = nn.Parameter(torch.zeros(3, 4))  # raw parameter: decayed, as Mask2Former
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = _Backbone()
        self.head = _Head()
        self.tied = self.head.proj  # shared module: its parameters must appear once


def _cfg(**solver):
    cfg = get_cfg()
    cfg.SOLVER.BASE_LR = 1e-3
    cfg.SOLVER.WEIGHT_DECAY = 0.05
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    for k, v in solver.items():
        setattr(cfg.SOLVER, k, v)
    return cfg


def _hparams(optimizer, model):
    """parameter name -> (lr, weight_decay) as configured in the optimizer."""
    by_param = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            assert p not in by_param, "a parameter appears in two groups"
            by_param[p] = (g["lr"], g["weight_decay"])
    return {n: by_param.get(p) for n, p in model.named_parameters()}


def test_param_groups_lr_multiplier_and_zero_decay():
    model = _Model()
    opt = build_optimizer(_cfg(), model)
    assert isinstance(opt, torch.optim.AdamW)
    hp = _hparams(opt, model)
    expected = {
        "backbone.conv.weight": (1e-4, 0.05),
        "backbone.conv.bias": (1e-4, 0.05),
        "backbone.bn.weight": (1e-4, 0.0),
        "backbone.bn.bias": (1e-4, 0.0),
        "backbone.relative_position_bias_table": (1e-4, 0.0),
        "backbone.absolute_pos_embed": (1e-4, 0.0),
        "head.proj.weight": (1e-3, 0.05),
        "head.proj.bias": (1e-3, 0.05),
        "head.ln.weight": (1e-3, 0.0),
        "head.gn.bias": (1e-3, 0.0),
        "head.d2ln.weight": (1e-3, 0.0),
        "head.query_feat.weight": (1e-3, 0.0),
        "head.query_embed.weight": (1e-3, 0.0),
        "head.level_embed": (1e-3, 0.05),
        "head.frozen.weight": None,  # frozen: not optimized
    }
    for name, (want) in expected.items():
        got = hp[name]
        if want is None:
            assert got is None, name
        else:
            assert got is not None and got[0] == pytest.approx(want[0]) and got[1] == want[1], (
                name,
                got,
            )
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    n_trainable = len({p for p in model.parameters() if p.requires_grad})
    assert n_params == n_trainable
    # parameters sharing hyper-parameters share a group
    assert len(opt.param_groups) == 4


def test_weight_decay_embed_and_norm_are_configurable_and_sgd_works():
    model = _Model()
    cfg = _cfg(OPTIMIZER="SGD", WEIGHT_DECAY_EMBED=0.01, WEIGHT_DECAY_NORM=0.002, MOMENTUM=0.8)
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.8
    hp = _hparams(opt, model)
    assert hp["head.query_feat.weight"][1] == 0.01
    assert hp["backbone.relative_position_bias_table"][1] == 0.01
    assert hp["head.ln.bias"][1] == 0.002


def test_name_based_lr_multipliers_longest_substring_wins_and_stack_with_backbone():
    model = _Model()
    cfg = _cfg(LR_MULTIPLIERS=[["proj", 0.5], ["proj.bias", 0.25], ["conv", 0.3]])
    hp = _hparams(build_optimizer(cfg, model), model)
    assert hp["head.proj.weight"][0] == pytest.approx(5e-4)
    # "proj.bias" is longer than "proj": only its factor applies (mmcv's custom_keys rule)
    assert hp["head.proj.bias"][0] == pytest.approx(2.5e-4)
    # on top of BACKBONE_MULTIPLIER
    assert hp["backbone.conv.weight"][0] == pytest.approx(1e-3 * 0.1 * 0.3)
    # weight decay untouched, unmatched names untouched
    assert hp["head.proj.weight"][1] == 0.05 and hp["head.ln.weight"][0] == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "bad", [[["proj"]], [[0.1, "proj"]], [["", 0.1]], [["proj", -1.0]], ["proj"]]
)
def test_bad_lr_multipliers_name_the_key(bad):
    with pytest.raises(ValueError, match="SOLVER.LR_MULTIPLIERS"):
        build_optimizer(_cfg(LR_MULTIPLIERS=bad), _Model())


def test_panoptic_segformer_configs_scale_deformable_offsets_and_reference_points():
    # the official recipe: lr x0.1 on sampling_offsets and reference_points (besides the backbone)
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
    folder = os.path.join(root, "coco/panoptic-segmentation/panoptic_segformer")
    leaves = [f for f in sorted(os.listdir(folder)) if not f.startswith("Base-")]
    assert len(leaves) >= 4
    for rel in leaves:
        cfg = get_cfg()
        cfg.merge_from_file(os.path.join(folder, rel))
        assert sorted(map(tuple, cfg.SOLVER.LR_MULTIPLIERS)) == [
            ("reference_points", 0.1),
            ("sampling_offsets", 0.1),
        ], rel


def test_unknown_optimizer_and_scheduler_names_raise():
    with pytest.raises(KeyError, match="ADAMW"):
        build_optimizer(_cfg(OPTIMIZER="LION"), _Model())
    opt = build_optimizer(_cfg(), _Model())
    with pytest.raises(KeyError, match="WarmupPolyLR"):
        build_lr_scheduler(_cfg(LR_SCHEDULER_NAME="Nope"), opt)


def _grad_step(cfg, scale):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    before = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(cfg, model)
    for p in model.parameters():
        p.grad = torch.full_like(p, scale)
    opt.step()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return model, before, grads


def test_full_model_clipping_bounds_the_total_norm():
    cfg = _cfg(OPTIMIZER="SGD", MOMENTUM=0.0, WEIGHT_DECAY=0.0, BASE_LR=1.0)
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.5
    model, before, grads = _grad_step(cfg, scale=3.0)
    n = grads.numel()  # 4*3 + 3 + 3*2 + 2 = 23
    assert n == 23
    # every gradient was 3.0: global norm 3*sqrt(23) scaled to 0.5 -> each 0.5/sqrt(23)
    assert grads.norm().item() == pytest.approx(0.5, rel=1e-5)
    assert torch.allclose(grads, torch.full_like(grads, 0.5 / math.sqrt(23)), rtol=1e-5)
    # the SGD step used the clipped gradient (lr 1, no momentum/decay)
    for p, b in zip(model.parameters(), before):
        assert torch.allclose(b - p.detach(), torch.full_like(p, 0.5 / math.sqrt(23)), rtol=1e-4)


def test_full_model_clipping_leaves_small_gradients_alone():
    cfg = _cfg(OPTIMIZER="SGD", MOMENTUM=0.0, WEIGHT_DECAY=0.0)
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 100.0
    _, _, grads = _grad_step(cfg, scale=0.01)
    assert torch.allclose(grads, torch.full_like(grads, 0.01))


def test_per_parameter_value_clipping_uses_detectron2():
    cfg = _cfg(OPTIMIZER="SGD", MOMENTUM=0.0, WEIGHT_DECAY=0.0)
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "value"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.25
    _, _, grads = _grad_step(cfg, scale=3.0)
    assert torch.allclose(grads, torch.full_like(grads, 0.25))


def _lrs(cfg, iters):
    model = nn.Linear(2, 2)
    opt = build_optimizer(cfg, model)
    sched = build_lr_scheduler(cfg, opt)
    lrs = []
    for _ in range(iters):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_poly_schedule_values():
    cfg = _cfg(LR_SCHEDULER_NAME="WarmupPolyLR", BASE_LR=0.1, MAX_ITER=10, WARMUP_ITERS=0)
    cfg.SOLVER.POLY_LR_POWER = 0.9
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
    lrs = _lrs(cfg, 10)
    for t in (0, 1, 5, 9):
        assert lrs[t] == pytest.approx(0.1 * (1 - t / 10) ** 0.9, rel=1e-6), t
    assert lrs[5] == pytest.approx(0.1 * 0.5**0.9)


def test_poly_schedule_warmup_and_constant_ending():
    cfg = _cfg(
        LR_SCHEDULER_NAME="WarmupPolyLR",
        BASE_LR=1.0,
        MAX_ITER=10,
        WARMUP_ITERS=2,
        WARMUP_FACTOR=0.5,
        WARMUP_METHOD="linear",
    )
    cfg.SOLVER.POLY_LR_POWER = 1.0
    cfg.SOLVER.POLY_LR_CONSTANT_ENDING = 0.25
    lrs = _lrs(cfg, 10)
    # linear warm-up from factor 0.5: t=0 -> 0.5 * 1.0, t=1 -> 0.75 * 0.9
    assert lrs[0] == pytest.approx(0.5)
    assert lrs[1] == pytest.approx(0.75 * 0.9)
    assert lrs[5] == pytest.approx(0.5)
    # (1 - t/10) < 0.25 from t = 8: the schedule stays at 0.25 * base lr
    assert lrs[8] == pytest.approx(0.25) and lrs[9] == pytest.approx(0.25)
    assert lrs[7] == pytest.approx(0.3)


def test_detectron2_schedules_are_reachable():
    cfg = _cfg(LR_SCHEDULER_NAME="WarmupMultiStepLR", BASE_LR=1.0, MAX_ITER=6, STEPS=(3,))
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.SOLVER.GAMMA = 0.1
    lrs = _lrs(cfg, 6)
    assert lrs[:3] == pytest.approx([1.0] * 3) and lrs[3:] == pytest.approx([0.1] * 3)


def test_cosine_restart_follows_mmcv_policy():
    """mmcv CosineRestart (periods 20k/40k/100k, weights 1/0.5/0.25, min ratio 0) with the linear
    multiplicative warmup, values computed by hand."""
    import math

    from seg_methods.config import get_cfg
    from seg_methods.solver.build import build_lr_scheduler

    cfg = get_cfg()
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupCosineRestartLR"
    cfg.SOLVER.BASE_LR = 1.0
    cfg.SOLVER.WARMUP_ITERS = 1500
    cfg.SOLVER.WARMUP_FACTOR = 1e-6
    cfg.SOLVER.WARMUP_METHOD = "linear"
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_lr_scheduler(cfg, opt)
    lrs = {}
    for it in range(160001):
        if it in (0, 750, 1500, 10000, 20000, 40000, 60000, 160000):
            lrs[it] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    cos = lambda a: 0.5 * (1 + math.cos(math.pi * a))  # noqa: E731
    assert lrs[0] == pytest.approx(1e-6 * cos(0))
    assert lrs[750] == pytest.approx((1e-6 + (1 - 1e-6) * 0.5) * cos(750 / 20000))
    assert lrs[1500] == pytest.approx(cos(1500 / 20000))
    assert lrs[10000] == pytest.approx(0.5)
    assert lrs[20000] == pytest.approx(0.5)  # restart at weight 0.5
    assert lrs[40000] == pytest.approx(0.5 * cos(0.5))
    assert lrs[60000] == pytest.approx(0.25)  # third period starts at weight 0.25
    assert lrs[160000] == pytest.approx(0.0, abs=1e-12)
    assert set(sched.state_dict()) <= {"base_lrs", "last_epoch", "_step_count", "_last_lr"}
    cfg.SOLVER.COSINE_RESTART_WEIGHTS = [1.0]
    with pytest.raises(ValueError, match="COSINE_RESTART"):
        build_lr_scheduler(cfg, opt)
