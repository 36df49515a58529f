"""SPEED options (seg_methods.engine.speed): bf16 autocast with float32 criteria, channels_last,
torch.compile wiring, and the Trainer using them."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seg_methods.config import get_cfg
from seg_methods.engine import Trainer
from seg_methods.engine.speed import (
    TrainingAutocast,
    compile_submodules,
    criterion_modules,
    prepare_model_for_speed,
    to_float32,
)
from seg_methods.modeling.criterion.base import WeightedCriterion


class _Criterion(WeightedCriterion):
    """Records the dtypes and the autocast state it ran with; BCE + a matmul-based term."""

    def __init__(self):
        super().__init__({"loss_bce": 1.0, "loss_mm": 1.0})
        self.seen = []

    def forward(self, outputs, targets):
        masks = outputs["pred_masks"]
        self.seen.append(
            (masks.dtype, outputs["aux"][0].dtype, torch.is_autocast_enabled("cpu"), targets.dtype)
        )
        bce = F.binary_cross_entropy_with_logits(masks, targets)
        # a matmul would run in bf16 if autocast were still on inside the criterion
        mm = (masks.flatten(1) @ targets.flatten(1).t()).mean()
        return {"loss_bce": bce, "loss_mm": mm, "mm_dtype": mm.detach()}


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.head = nn.Conv2d(4, 2, 1)
        self.criterion = _Criterion()
        self.conv_dtype = None

    def forward(self, x, targets=None):
        feats = self.backbone(x)
        out = self.head(feats)
        self.conv_dtype = out.dtype
        if not self.training:
            return out
        losses = self.criterion({"pred_masks": out, "aux": [out * 2]}, targets)
        return {k: v for k, v in losses.items() if k.startswith("loss")}


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 8, 8, generator=g), (torch.rand(2, 2, 8, 8, generator=g) > 0.5).float()


def test_bf16_forward_with_float32_criterion_and_losses():
    torch.manual_seed(0)
    model = _Model().train()
    autocast = TrainingAutocast(model, device_type="cpu")
    assert autocast.criteria == [model.criterion]
    x, t = _data()
    losses = model(x, t)
    assert model.conv_dtype == torch.bfloat16  # the convolutions ran in bf16
    masks_dtype, aux_dtype, autocast_on, target_dtype = model.criterion.seen[-1]
    assert (masks_dtype, aux_dtype, autocast_on) == (torch.float32, torch.float32, False)
    assert all(v.dtype == torch.float32 for v in losses.values())
    assert not torch.is_autocast_enabled("cpu")  # left after the forward
    sum(losses.values()).backward()
    assert model.head.weight.grad.dtype == torch.float32

    # the criterion's float32 result equals the criterion run on the bf16 outputs cast to float
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.head(model.backbone(x))
        ref = _Criterion()({"pred_masks": out.float(), "aux": [out.float() * 2]}, t)
    for k in ("loss_bce", "loss_mm"):
        assert torch.equal(losses[k].detach(), ref[k])

    # evaluation is untouched: float32, no autocast
    model.eval()
    with torch.no_grad():
        assert model(x).dtype == torch.float32
    autocast.remove()
    model.train()
    model(x, t)
    assert model.conv_dtype == torch.float32


def test_bf16_region_of_named_submodules_only():
    model = _Model().train()
    autocast = TrainingAutocast(model, device_type="cpu", modules=["backbone", "absent"])
    assert autocast.regions == [model.backbone]
    dtypes = []
    model.backbone[0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    x, t = _data()
    losses = model(x, t)
    assert dtypes == [torch.bfloat16]  # inside the region
    assert model.conv_dtype == torch.float32  # the head after it: float32 inputs, no autocast
    assert model.criterion.seen[-1][:3] == (torch.float32, torch.float32, False)
    assert all(v.dtype == torch.float32 for v in losses.values())
    assert not autocast._stack
    with pytest.raises(ValueError, match="SPEED.BF16_AUTOCAST_MODULES"):
        TrainingAutocast(_Model(), modules=["sem_seg_head"])


def test_autocast_is_left_after_a_failing_forward():
    model = _Model().train()
    autocast = TrainingAutocast(model, device_type="cpu")
    x, _ = _data()
    with pytest.raises(ValueError):  # BCE with a target of the wrong shape raises in the criterion
        model(x, torch.zeros(3))
    assert len(autocast._stack) == 2  # the hooks could not leave the contexts...
    autocast.reset()  # ...reset does (the Trainer calls it)
    assert not autocast._stack and not torch.is_autocast_enabled("cpu")
    assert nn.Conv2d(3, 1, 1)(x).dtype == torch.float32


def test_to_float32_and_criterion_discovery():
    nested = {"a": torch.ones(2, dtype=torch.bfloat16), "b": [torch.ones(1, dtype=torch.int64)]}
    out = to_float32(nested)
    assert out["a"].dtype == torch.float32 and out["b"][0].dtype == torch.int64

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Module()
            self.head.criterion = nn.Module()  # found by name
            self.loss = _Criterion()  # found by type

    m = Outer()
    assert criterion_modules(m) == [m.head.criterion, m.loss]


def test_channels_last_and_compile_keep_parameter_names():
    cfg = get_cfg()
    cfg.SPEED.CHANNELS_LAST = True
    cfg.SPEED.COMPILE.ENABLED = True
    cfg.SPEED.COMPILE.MODULES = ["backbone", "sem_seg_head.pixel_decoder"]  # 2nd one absent
    model = _Model()
    keys = list(model.state_dict())
    prepare_model_for_speed(cfg, model)
    assert list(model.state_dict()) == keys  # in-place compile: no "_orig_mod." prefix
    assert model.backbone[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert model.backbone._compiled_call_impl is not None
    assert model.head._compiled_call_impl is None
    with pytest.raises(ValueError, match="SPEED.COMPILE.MODULES"):
        compile_submodules(_Model(), ["sem_seg_head"])


def test_trainer_trains_with_bf16_channels_last_and_fused_adamw(engine_cfg):
    engine_cfg.DATASETS.TEST = ()
    engine_cfg.SPEED.BF16_AUTOCAST = True
    engine_cfg.SPEED.CHANNELS_LAST = True
    engine_cfg.SPEED.OPTIMIZER_IMPL = "fused"
    trainer = Trainer(engine_cfg)
    assert trainer.optimizer.defaults["fused"] is True
    conv = trainer.model.conv
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    dtypes = []
    conv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    w0 = conv.weight.detach().clone()
    trainer.train()
    assert trainer.iter == 2 and dtypes == [torch.bfloat16, torch.bfloat16]
    assert not torch.equal(w0, conv.weight) and conv.weight.dtype == torch.float32
    assert not torch.is_autocast_enabled("cpu")
